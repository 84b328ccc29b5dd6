//! CFI unwinding of a copied user stack: the modules are the process's executable file
//! mappings with their .eh_frame (or Go's .debug_frame); memory is read only from the copy.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use super::elf::{self, Bytes, ElfImage};
use super::maps::{self, Mapping};
use super::{UnwindError, UserRegs};

/// The deepest stack returned.
pub const MAX_FRAMES: usize = 128;

type Module = framehop::Module<Bytes>;

/// Modules built for an (image, load bias, start, end): building one indexes a
/// .debug_frame, which is worth doing once.
type ModuleKey = (u64, u64, u64, u64);
static MODULES: LazyLock<Mutex<HashMap<ModuleKey, Module>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The most modules kept built.
const MAX_MODULES: usize = 256;

fn module(pid: u32, m: &Mapping, image: &Arc<ElfImage>) -> Option<Module> {
    let base = image.base_avma(m)?;
    let key = (image.id, base, m.start, m.end);
    let mut cache = MODULES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(module) = cache.get(&key) {
        return Some(module.clone());
    }
    let u = &image.unwind;
    let info = framehop::ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: u.text.as_ref().map(|s| s.svma.clone()),
        text: u.text.as_ref().map(|s| s.bytes.clone()),
        got_svma: u.got.clone(),
        eh_frame_svma: u.eh_frame.as_ref().map(|s| s.svma.clone()),
        eh_frame: u.eh_frame.as_ref().map(|s| s.bytes.clone()),
        eh_frame_hdr_svma: u.eh_frame_hdr.as_ref().map(|s| s.svma.clone()),
        eh_frame_hdr: u.eh_frame_hdr.as_ref().map(|s| s.bytes.clone()),
        debug_frame: u.debug_frame.clone(),
        ..Default::default()
    };
    let module = Module::new(format!("{pid}:{}", m.path), m.start..m.end, base, info);
    if cache.len() >= MAX_MODULES {
        cache.clear();
    }
    cache.insert(key, module.clone());
    Some(module)
}

/// Read the u64 at `addr` from the stack copy that starts at `sp`.
fn read_copy(stack: &[u8], sp: u64, addr: u64) -> Result<u64, ()> {
    let at = usize::try_from(addr.checked_sub(sp).ok_or(())?).map_err(|_| ())?;
    let bytes = stack.get(at..at.checked_add(8).ok_or(())?).ok_or(())?;
    Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
}

/// Return addresses, innermost first (the instruction pointer first), unwound with the
/// CFI of the process's files from `stack`, a copy of memory from `regs.sp` on. Stops at
/// the end of the copy, at a null or non-code return address, or after [`MAX_FRAMES`].
pub fn unwind_cfi(pid: u32, regs: &UserRegs, stack: &[u8]) -> Result<Vec<u64>, UnwindError> {
    let mappings = maps::read(pid).map_err(|e| UnwindError::Maps { pid, source: e })?;
    unwind_with(pid, &mappings, regs, stack)
}

#[cfg(target_arch = "x86_64")]
fn unwind_with(
    pid: u32,
    mappings: &[Mapping],
    regs: &UserRegs,
    stack: &[u8],
) -> Result<Vec<u64>, UnwindError> {
    use framehop::Unwinder;
    use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};

    if regs.ip == 0 {
        return Err(UnwindError::NoInstructionPointer);
    }
    let mut unwinder = UnwinderX86_64::<Bytes>::new();
    for m in mappings.iter().filter(|m| m.executable && m.file_backed()) {
        if let Ok(image) = elf::image(pid, m)
            && let Some(module) = module(pid, m, &image)
        {
            unwinder.add_module(module);
        }
    }
    let mut cache = CacheX86_64::<_>::new();
    let mut read = |addr: u64| read_copy(stack, regs.sp, addr);
    let mut frames = unwinder.iter_frames(
        regs.ip,
        UnwindRegsX86_64::new(regs.ip, regs.sp, regs.bp),
        &mut cache,
        &mut read,
    );
    let executable = |addr: u64| maps::find(mappings, addr).is_some_and(|m| m.executable);
    let mut out = Vec::new();
    // The copy's end, a null or non-code return address, or an unwind error ends the stack.
    while out.len() < MAX_FRAMES {
        match frames.next() {
            Ok(Some(frame)) => {
                let addr = frame.address();
                if !out.is_empty() && !executable(addr) {
                    break;
                }
                out.push(addr);
            }
            Ok(None) | Err(_) => break,
        }
    }
    Ok(out)
}

#[cfg(not(target_arch = "x86_64"))]
fn unwind_with(
    _pid: u32,
    _mappings: &[Mapping],
    _regs: &UserRegs,
    _stack: &[u8],
) -> Result<Vec<u64>, UnwindError> {
    Err(UnwindError::UnsupportedArch(std::env::consts::ARCH))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn reads_only_inside_the_copy() {
        let stack: Vec<u8> = (0u8..32).collect();
        assert_eq!(read_copy(&stack, 0x1000, 0x1000), Ok(0x0706050403020100));
        assert_eq!(read_copy(&stack, 0x1000, 0x1018).map(|v| v as u8), Ok(24));
        assert_eq!(read_copy(&stack, 0x1000, 0x1019), Err(()));
        assert_eq!(read_copy(&stack, 0x1000, 0xff8), Err(()));
        assert_eq!(read_copy(&stack, 0x1000, u64::MAX), Err(()));
    }

    /// Garbage registers and stack bytes end the walk cleanly.
    #[test]
    fn garbage_stacks_end_cleanly() {
        let pid = std::process::id();
        let mappings = maps::read(pid).unwrap_or_default();
        let ip = unwind_with as *const () as u64;
        let stack: Vec<u8> = (0..4096u32)
            .flat_map(|i| (i.wrapping_mul(2654435761)).to_le_bytes())
            .collect();
        for sp in [0, 8, 0x7fff_0000_0000, u64::MAX - 7] {
            let regs = UserRegs {
                ip,
                sp,
                bp: sp.wrapping_add(16),
            };
            let out = unwind_with(pid, &mappings, &regs, &stack).unwrap_or_default();
            assert!(out.len() <= MAX_FRAMES);
            assert_eq!(out.first(), Some(&ip));
        }
        let regs = UserRegs {
            ip: 0,
            sp: 0,
            bp: 0,
        };
        assert!(unwind_with(pid, &mappings, &regs, &[]).is_err());
    }
}
