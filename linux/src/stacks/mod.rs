//! User stacks for `explain --where`: where in a program a socket's EOF was read.
//!
//! - [`unwind_cfi`] walks a copy of the top of a thread's user stack with the `.eh_frame`
//!   (or Go's `.debug_frame`) CFI of the process's files, for code built without frame
//!   pointers; it reads memory only from the copy.
//! - [`Symbolizer`] turns addresses into functions, files and lines: /proc/PID/maps gives
//!   the file and its offset (PIE and shared libraries), the file is read through
//!   /proc/PID/map_files (so containers work), then DWARF with inlined frames, else
//!   `.symtab`/`.dynsym` (Rust and C++ demangled), with a separate debug file (build ID,
//!   .gnu_debuglink) standing in for a stripped file's, and Go's .gopclntab for Go
//!   binaries built `-s -w`; else the JIT's perf map.
//! - [`is_library_frame`] says which frames to fold (libc, Go's runtime and poller, Rust's
//!   std, libuv, V8 and JVM internals); [`runtime_frames_note`] names the flag a runtime
//!   needs before its frames can be named.
//! - [`stopped_thread_regs`] reads [`UserRegs`] of a thread stopped under ptrace, for a
//!   capture without BPF (and the tests).
//!
//! Files are parsed once per (device, inode), in bounded caches. Bad files, maps and stacks
//! give frames without a function, never a panic.

mod elf;
mod gopclntab;
mod maps;
mod perfmap;
mod regs;
mod runtime;
mod symbolize;
mod unwind;

pub use regs::stopped_thread_regs;
pub use runtime::{is_library_frame, runtime_frames_note};
pub use symbolize::Symbolizer;
pub use unwind::{MAX_FRAMES, unwind_cfi};

/// The user registers of a thread, as captured with its stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("cannot read /proc/{pid}/maps: {source}")]
    Maps {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("no instruction pointer: the registers were not captured")]
    NoInstructionPointer,
    #[error("CFI unwinding is not supported on {0}")]
    UnsupportedArch(&'static str),
}

/// One frame of a symbolized stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    /// Demangled; `None` when neither DWARF, symbols nor a perf map name it.
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The file mapped at the address (as the process sees it), `[perf-map]` for a JIT
    /// frame named by a perf map, `[anon]`, `[vdso]`..., or `[unmapped]`.
    pub module: String,
    /// An inlined call inside the next frame of the same address.
    pub inlined: bool,
    /// The address as given.
    pub addr: u64,
}
