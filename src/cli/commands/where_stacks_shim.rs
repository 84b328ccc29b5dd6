//! Stand-in for `cwreap_linux::stacks` (symbols and CFI unwinding) with the same interface:
#![allow(dead_code)] // the interface in full, as the real module has it
//! addresses stay unnamed and nothing is unwound. Replaced by the real module.

#[derive(Debug, Clone, Copy)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

#[derive(Debug)]
pub struct UnwindError;

pub fn unwind_cfi(_pid: u32, _regs: &UserRegs, _stack: &[u8]) -> Result<Vec<u64>, UnwindError> {
    Err(UnwindError)
}

#[derive(Debug, Clone)]
pub struct Frame {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: String,
    pub inlined: bool,
    pub addr: u64,
}

#[derive(Debug, Default)]
pub struct Symbolizer;

impl Symbolizer {
    pub fn new() -> Self {
        Symbolizer
    }

    pub fn symbolize(&mut self, _pid: u32, addrs: &[u64]) -> Vec<Vec<Frame>> {
        addrs
            .iter()
            .map(|&addr| {
                vec![Frame {
                    function: None,
                    file: None,
                    line: None,
                    module: "[unknown]".into(),
                    inlined: false,
                    addr,
                }]
            })
            .collect()
    }
}

pub fn is_library_frame(_f: &Frame) -> bool {
    false
}

pub fn runtime_frames_note(_pid: u32) -> Option<String> {
    None
}
