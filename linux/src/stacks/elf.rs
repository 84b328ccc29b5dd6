//! One ELF file, read once and shared: its load segments (to turn a mapped address into
//! the file's own addresses), its function symbols, its unwind sections, and its DWARF.
//! Images are cached per (device, inode), read again when the file's size or time changed
//! (rewritten in place), bounded in count and bytes.

use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SectionKind, SymbolKind};

use super::gopclntab::{GoFrame, GoPcln};
use super::maps::{self, Mapping};

/// A PT_LOAD segment.
#[derive(Debug, Clone, Copy)]
struct Load {
    offset: u64,
    filesz: u64,
    vaddr: u64,
    executable: bool,
}

#[derive(Debug)]
struct Symbol {
    addr: u64,
    size: u64,
    name: Box<str>,
}

/// Bytes of a section, shared with the whole file (no copy).
#[derive(Clone, Default)]
pub(crate) struct Bytes {
    data: Arc<Vec<u8>>,
    range: Range<usize>,
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.data.get(self.range.clone()).unwrap_or(&[])
    }
}

/// A section's addresses in the file's own address space, and its bytes.
#[derive(Clone)]
pub(crate) struct Section {
    pub svma: Range<u64>,
    pub bytes: Bytes,
}

/// What a CFI unwinder needs of a file.
#[derive(Clone, Default)]
pub(crate) struct UnwindSections {
    pub text: Option<Section>,
    pub eh_frame: Option<Section>,
    pub eh_frame_hdr: Option<Section>,
    /// .debug_frame, decompressed (Go writes its CFI there, not in .eh_frame).
    pub debug_frame: Option<Bytes>,
    pub got: Option<Range<u64>>,
}

pub(crate) struct ElfImage {
    /// Unique to this parse: what caches of things derived from the image are keyed by.
    pub id: u64,
    data: Arc<Vec<u8>>,
    loads: Vec<Load>,
    /// Function symbols of .symtab and .dynsym, by address.
    symbols: Vec<Symbol>,
    pub unwind: UnwindSections,
    pub has_dwarf: bool,
    /// The GNU build ID, and the .gnu_debuglink file name: where separate debug info is.
    pub build_id: Option<Vec<u8>>,
    pub debuglink: Option<String>,
    /// Go's .gopclntab: names and lines without .symtab or DWARF.
    gopclntab: Option<Section>,
}

pub(crate) type Dwarf = addr2line::Context<gimli::EndianArcSlice<gimli::RunTimeEndian>>;

impl ElfImage {
    /// Parse `data`; an error names what is wrong with it. Never panics on bad input.
    pub fn parse(data: Vec<u8>) -> Result<ElfImage, String> {
        let data = Arc::new(data);
        let file = object::File::parse(&data[..]).map_err(|e| format!("not an ELF file: {e}"))?;
        let loads = file
            .segments()
            .filter_map(|s| {
                let (offset, filesz) = s.file_range();
                let executable = match s.flags() {
                    object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                    _ => false,
                };
                let load = Load {
                    offset,
                    filesz,
                    vaddr: s.address(),
                    executable,
                };
                Some(load).filter(|_| filesz > 0)
            })
            .collect::<Vec<_>>();
        let mut symbols: Vec<Symbol> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.address() != 0)
            .filter_map(|s| {
                let name = s.name().ok().filter(|n| !n.is_empty())?;
                Some(Symbol {
                    addr: s.address(),
                    size: s.size(),
                    name: name.into(),
                })
            })
            .collect();
        // Stable: at one address the .symtab name (listed first) wins over .dynsym's.
        symbols.sort_by_key(|s| s.addr);
        symbols.dedup_by_key(|s| s.addr);
        let section = |name: &str| {
            let s = file.section_by_name(name)?;
            let (off, size) = s.file_range()?;
            let start = usize::try_from(off).ok()?;
            let end = start.checked_add(usize::try_from(size).ok()?)?;
            (end <= data.len()).then(|| Section {
                svma: s.address()..s.address().saturating_add(s.size()),
                bytes: Bytes {
                    data: data.clone(),
                    range: start..end,
                },
            })
        };
        let debug_frame = file
            .section_by_name(".debug_frame")
            .and_then(|s| s.uncompressed_data().ok())
            .map(|d| Bytes {
                range: 0..d.len(),
                data: Arc::new(d.into_owned()),
            });
        let unwind = UnwindSections {
            text: section(".text"),
            eh_frame: section(".eh_frame"),
            eh_frame_hdr: section(".eh_frame_hdr"),
            debug_frame,
            got: file
                .section_by_name(".got")
                .map(|s| s.address()..s.address() + s.size()),
        };
        let gopclntab = section(".gopclntab");
        let has_dwarf = file.section_by_name(".debug_info").is_some()
            && file.section_by_name(".debug_line").is_some();
        let build_id = file.build_id().ok().flatten().map(<[u8]>::to_vec);
        let debuglink = file
            .gnu_debuglink()
            .ok()
            .flatten()
            .and_then(|(name, _crc)| std::str::from_utf8(name).ok())
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .map(str::to_string);
        drop(file);
        static IDS: AtomicU64 = AtomicU64::new(1);
        Ok(ElfImage {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            data,
            loads,
            symbols,
            unwind,
            has_dwarf,
            build_id,
            debuglink,
            gopclntab,
        })
    }

    /// The file's own address (as in its symbols and DWARF) of `addr`, mapped by `m`.
    pub fn svma(&self, m: &Mapping, addr: u64) -> Option<u64> {
        m.contains(addr).then_some(())?;
        addr.checked_sub(self.base_avma(m)?)
    }

    /// The process address at which the file's address 0 would be, for mapping `m`
    /// (0 for a non-PIE executable, the load bias otherwise). The segment is the one the
    /// mapping holds most of, those of the mapping's kind (executable or not) first: a
    /// mapping starts on a page boundary, often inside the segment before (lld lays out
    /// segments whose file offsets and addresses differ by a page).
    pub fn base_avma(&self, m: &Mapping) -> Option<u64> {
        let end = m.offset.saturating_add(m.end - m.start);
        let overlap = |l: &Load| {
            let from = l.offset.max(m.offset);
            l.offset
                .saturating_add(l.filesz)
                .min(end)
                .saturating_sub(from)
        };
        let load = self
            .loads
            .iter()
            .filter(|l| overlap(l) > 0)
            .max_by_key(|l| (l.executable == m.executable, overlap(l)))?;
        Some(
            m.start
                .wrapping_sub(m.offset)
                .wrapping_add(load.offset)
                .wrapping_sub(load.vaddr),
        )
    }

    /// The Go function holding `svma`, from .gopclntab, with its line outside inlined code.
    pub fn go_frame(&self, svma: u64) -> Option<GoFrame> {
        let table = self.gopclntab.as_ref()?;
        let text = self.unwind.text.as_ref().map_or(0, |t| t.svma.start);
        GoPcln::parse(&table.bytes, text)?.lookup(svma)
    }

    /// The function symbol holding `svma`, demangled.
    pub fn symbol(&self, svma: u64) -> Option<String> {
        let i = self.symbols.partition_point(|s| s.addr <= svma);
        let s = self.symbols.get(i.checked_sub(1)?)?;
        let inside = if s.size > 0 {
            svma < s.addr.saturating_add(s.size)
        } else {
            // No size: trust it up to the next symbol, within the .text section.
            self.unwind
                .text
                .as_ref()
                .is_some_and(|t| t.svma.contains(&svma))
        };
        inside.then(|| demangle(&s.name, None))
    }

    /// The DWARF of this file, parsed (each caller keeps its own: it is not shared).
    pub fn dwarf(&self) -> Option<Dwarf> {
        if !self.has_dwarf {
            return None;
        }
        let file = object::File::parse(&self.data[..]).ok()?;
        let endian = if file.is_little_endian() {
            gimli::RunTimeEndian::Little
        } else {
            gimli::RunTimeEndian::Big
        };
        let load = |id: gimli::SectionId| -> Result<_, gimli::Error> {
            let bytes: Arc<[u8]> = file
                .section_by_name(id.name())
                .filter(|s| s.kind() != SectionKind::UninitializedData)
                .and_then(|s| s.uncompressed_data().ok())
                .map(|d| Arc::from(&d[..]))
                .unwrap_or_else(|| Arc::from(&[][..]));
            Ok(gimli::EndianArcSlice::new(bytes, endian))
        };
        let dwarf = gimli::Dwarf::load(load).ok()?;
        addr2line::Context::from_dwarf(dwarf).ok()
    }
}

/// The separate debug file of `image` (mapped by `m` in `pid`), as the process sees its
/// files: by build ID under /usr/lib/debug/.build-id, else by .gnu_debuglink beside the
/// file, in its .debug directory, or under /usr/lib/debug. A file with another build ID
/// is not it.
pub(crate) fn debug_file(pid: u32, m: &Mapping, image: &ElfImage) -> Option<ElfImage> {
    let root = format!("/proc/{pid}/root");
    let mut candidates = Vec::new();
    if let Some(id) = image.build_id.as_deref().filter(|id| id.len() > 1) {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let (head, tail) = hex.split_at(2);
        candidates.push(format!(
            "{root}/usr/lib/debug/.build-id/{head}/{tail}.debug"
        ));
    }
    if let Some(link) = &image.debuglink {
        let dir = m.path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        candidates.push(format!("{root}{dir}/{link}"));
        candidates.push(format!("{root}{dir}/.debug/{link}"));
        candidates.push(format!("{root}/usr/lib/debug{dir}/{link}"));
    }
    candidates.into_iter().find_map(|path| {
        let md = std::fs::metadata(&path).ok()?;
        if !md.is_file() || md.len() > 1 << 30 {
            return None;
        }
        let debug = ElfImage::parse(std::fs::read(&path).ok()?).ok()?;
        let same = match (&debug.build_id, &image.build_id) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        (same && debug.has_dwarf).then_some(debug)
    })
}

/// Demangle a Rust or C++ symbol; other names are returned as they are. `lang` is the DWARF
/// language of the unit, when known.
pub(crate) fn demangle(name: &str, lang: Option<gimli::DwLang>) -> String {
    let rust = match lang {
        Some(gimli::DW_LANG_Rust) => true,
        Some(_) => false,
        None => name.starts_with("_R") || (name.starts_with("_ZN") && name.contains("17h")),
    };
    if rust && let Ok(d) = rustc_demangle::try_demangle(name) {
        return format!("{d:#}");
    }
    if name.starts_with("_Z")
        && let Ok(sym) = cpp_demangle::Symbol::new(name)
        && let Ok(d) = sym.demangle()
    {
        return d;
    }
    name.to_string()
}

/// A file's image, or why it has none.
pub(crate) type Loaded = Result<Arc<ElfImage>, Arc<str>>;

/// Images by (device, inode), with their last use: the files that are not ELF too, so
/// each is read once.
struct Cache {
    images: HashMap<(u64, u64), Entry>,
    tick: u64,
}

struct Entry {
    loaded: Loaded,
    /// Size and time of the file when read (see [`maps::stamp`]).
    stamp: Option<(u64, i64, i64)>,
    used: u64,
}

/// At most this many files, and this many bytes of them, stay cached.
const MAX_IMAGES: usize = 64;
const MAX_BYTES: usize = 256 << 20;

static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(|| {
    Mutex::new(Cache {
        images: HashMap::new(),
        tick: 0,
    })
});

/// The image of the file behind `m` (file-backed), from the cache or read through /proc.
pub(crate) fn image(pid: u32, m: &Mapping) -> Loaded {
    let key = (m.dev, m.inode);
    let stamp = maps::stamp(pid, m);
    {
        let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        cache.tick += 1;
        let tick = cache.tick;
        if let Some(e) = cache.images.get_mut(&key)
            && (stamp.is_none() || e.stamp == stamp)
        {
            e.used = tick;
            return e.loaded.clone();
        }
    }
    // A file that cannot be read now (the process exited, a permission) may be read
    // through another process later: only what was read and is not ELF is remembered.
    let data = maps::read_file(pid, m).map_err(|e| Arc::<str>::from(format!("{}: {e}", m.path)))?;
    let loaded = ElfImage::parse(data)
        .map(Arc::new)
        .map_err(|e| Arc::<str>::from(format!("{}: {e}", m.path)));
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    let used = cache.tick;
    cache.images.insert(
        key,
        Entry {
            loaded: loaded.clone(),
            stamp,
            used,
        },
    );
    let size = |c: &Cache| -> usize {
        c.images
            .values()
            .filter_map(|e| e.loaded.as_ref().ok())
            .map(|i| i.data.len())
            .sum()
    };
    while cache.images.len() > MAX_IMAGES || (cache.images.len() > 1 && size(&cache) > MAX_BYTES) {
        let oldest = cache
            .images
            .iter()
            .min_by_key(|(_, e)| e.used)
            .map(|(k, _)| *k);
        match oldest {
            Some(k) => cache.images.remove(&k),
            None => break,
        };
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_rust_and_cpp_and_leaves_c_alone() {
        assert_eq!(
            demangle("_ZN4test7handler17h0123456789abcdefE", None),
            "test::handler"
        );
        assert_eq!(demangle("_ZN3foo3barEv", None), "foo::bar()");
        assert_eq!(demangle("read", None), "read");
        assert_eq!(demangle("_Zgarbage", None), "_Zgarbage");
    }

    /// A file rewritten in place keeps its inode: the cache sees the new size and time
    /// and reads it again.
    #[test]
    fn a_file_rewritten_in_place_is_read_again() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("cwreap-stacks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let path = dir.join("rewritten");
        std::fs::write(&path, b"not an ELF file").unwrap_or_default();
        let md = std::fs::metadata(&path).expect("the file just written");
        let m = Mapping {
            start: 0x10,
            end: 0x20,
            executable: true,
            offset: 0,
            dev: md.dev(),
            inode: md.ino(),
            path: path.to_string_lossy().into_owned(),
        };
        let pid = std::process::id();
        assert!(image(pid, &m).is_err(), "not ELF");
        let exe = std::fs::read("/proc/self/exe").unwrap_or_default();
        std::fs::write(&path, &exe).expect("rewrite in place");
        assert_eq!(
            std::fs::metadata(&path).map(|m| m.ino()).ok(),
            Some(m.inode)
        );
        let first = image(pid, &m).expect("an ELF file now");
        let again = image(pid, &m).expect("cached");
        assert_eq!(first.id, again.id, "unchanged: the same image");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Truncated and corrupted copies of a real ELF file: parsing and lookups never panic.
    #[test]
    fn truncated_and_garbage_files_do_not_panic() {
        let exe = std::fs::read("/proc/self/exe").unwrap_or_default();
        assert!(!exe.is_empty(), "cannot read /proc/self/exe");
        let m = Mapping {
            start: 0x1000,
            end: 0x100000,
            executable: true,
            offset: 0,
            dev: 1,
            inode: 1,
            path: "/x".into(),
        };
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), b"\x7fELF".to_vec(), vec![0xff; 4096]];
        for len in [16, 64, 100, 512, 4096, exe.len() / 3, exe.len() / 2] {
            cases.push(exe[..len.min(exe.len())].to_vec());
        }
        for _ in 0..40 {
            let mut bad = exe[..exe.len().min(1 << 20)].to_vec();
            for _ in 0..64 {
                let len = bad.len().max(1) as u64;
                let i = (rand() % len) as usize;
                if let Some(b) = bad.get_mut(i) {
                    *b = rand() as u8;
                }
            }
            cases.push(bad);
        }
        for data in cases {
            if let Ok(image) = ElfImage::parse(data) {
                for addr in (0x1000..0x100000).step_by(0x777) {
                    if let Some(svma) = image.svma(&m, addr) {
                        let _ = image.symbol(svma);
                    }
                }
                let _ = image.base_avma(&m);
                if let Some(dwarf) = image.dwarf() {
                    for probe in (0..0x200000).step_by(0x1357) {
                        if let Ok(mut frames) = dwarf.find_frames(probe).skip_all_loads() {
                            while let Ok(Some(_)) = frames.next() {}
                        }
                    }
                }
            }
        }
    }
}
