//! Addresses to frames: file and DWARF (inlined frames too), else ELF symbols, else the
//! perf map of a JIT.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use super::Frame;
use super::elf::{self, Dwarf, ElfImage};
use super::maps::{self, Mapping};
use super::perfmap::{self, PerfMap};

/// Parsed DWARF kept for this many files, and perf maps for this many processes.
const MAX_DWARF: usize = 32;
const MAX_PERF_MAPS: usize = 64;
/// Addresses whose frames are kept (then all are dropped and found again).
const MAX_FOUND: usize = 1 << 16;

type Stamp = Option<(u64, SystemTime)>;

#[derive(Default)]
struct Debug {
    dwarf: Option<Dwarf>,
    file: Option<ElfImage>,
}

/// Turns a process's code addresses into functions, files and lines. It keeps each file's
/// parsed DWARF and the frames found (bounded), so a stack costs lookups, not parses.
#[derive(Default)]
pub struct Symbolizer {
    /// By image (one parse of a file): its DWARF, or its separate debug file's (with that
    /// file, whose symbols stand in for stripped ones), and the last use.
    dwarf: HashMap<u64, (Debug, u64)>,
    /// By pid, with the size and time of the file when read.
    perf_maps: HashMap<u32, (Stamp, Arc<PerfMap>)>,
    /// Frames already found, by (image, file address): stacks repeat.
    found: HashMap<(u64, u64), Vec<Frame>>,
    tick: u64,
    dwarf_parses: u64,
}

impl Symbolizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times a file's DWARF was parsed (once per file while it stays cached).
    pub fn dwarf_parses(&self) -> u64 {
        self.dwarf_parses
    }

    /// Frames for each address of `pid`, each list innermost first: inlined frames, then
    /// the function that holds the code; never empty (an unknown address gives a frame
    /// with no function, and the module). Every address is taken as a return address (the
    /// instruction pointer of a thread in a system call is one too): it is looked up one
    /// byte back, in the call instruction, and the frame's `addr` is the address given.
    pub fn symbolize(&mut self, pid: u32, addrs: &[u64]) -> Vec<Vec<Frame>> {
        let mappings = maps::read(pid).unwrap_or_default();
        let mut perf: Option<Arc<PerfMap>> = None;
        // Each mapping's image, looked up once for this stack.
        let mut images: HashMap<u64, elf::Loaded> = HashMap::new();
        addrs
            .iter()
            .map(|&addr| {
                let probe = addr.saturating_sub(1);
                match maps::find(&mappings, probe) {
                    Some(m) if m.file_backed() => {
                        let image = images.entry(m.start).or_insert_with(|| elf::image(pid, m));
                        self.in_file(pid, image, m, addr, probe)
                    }
                    other => {
                        let map = perf.get_or_insert_with(|| self.perf_map(pid)).clone();
                        let module = match other {
                            None => "[unmapped]".to_string(),
                            Some(m) if m.path.is_empty() => "[anon]".to_string(),
                            Some(m) => m.path.clone(),
                        };
                        vec![jit_frame(&map, addr, probe, module)]
                    }
                }
            })
            .collect()
    }

    fn in_file(
        &mut self,
        pid: u32,
        image: &elf::Loaded,
        m: &Mapping,
        addr: u64,
        probe: u64,
    ) -> Vec<Frame> {
        let unknown = || Frame {
            function: None,
            file: None,
            line: None,
            module: m.path.clone(),
            inlined: false,
            addr,
        };
        let Ok(image) = image else {
            return vec![unknown()];
        };
        let Some(svma) = image.svma(m, probe) else {
            return vec![unknown()];
        };
        let key = (image.id, svma);
        if let Some(found) = self.found.get(&key) {
            let mut frames = found.clone();
            for f in &mut frames {
                f.addr = addr;
                f.module.clone_from(&m.path);
            }
            return frames;
        }
        let mut frames = self.dwarf_frames(pid, m, image, svma, addr);
        let symbol = || {
            let debug = self.dwarf.get(&image.id).and_then(|d| d.0.file.as_ref());
            image.symbol(svma).or_else(|| debug?.symbol(svma))
        };
        match frames.last_mut() {
            Some(outer) if outer.function.is_none() => outer.function = symbol(),
            Some(_) => {}
            None => frames.push(match image.go_frame(svma) {
                Some(go) => Frame {
                    function: Some(go.function),
                    file: go.file,
                    line: go.line,
                    ..unknown()
                },
                None => Frame {
                    function: symbol(),
                    ..unknown()
                },
            }),
        }
        if self.found.len() >= MAX_FOUND {
            self.found.clear();
        }
        self.found.insert(key, frames.clone());
        frames
    }

    /// The DWARF frames of `svma`, innermost first, from the file or its debug file.
    fn dwarf_frames(
        &mut self,
        pid: u32,
        m: &Mapping,
        image: &ElfImage,
        svma: u64,
        addr: u64,
    ) -> Vec<Frame> {
        self.tick += 1;
        let tick = self.tick;
        let key = image.id;
        if !self.dwarf.contains_key(&key) {
            if self.dwarf.len() >= MAX_DWARF
                && let Some(old) = self.dwarf.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k)
            {
                self.dwarf.remove(&old);
            }
            self.dwarf_parses += 1;
            let debug = match image.dwarf() {
                Some(dwarf) => Debug {
                    dwarf: Some(dwarf),
                    file: None,
                },
                None => {
                    let file = elf::debug_file(pid, m, image);
                    Debug {
                        dwarf: file.as_ref().and_then(ElfImage::dwarf),
                        file,
                    }
                }
            };
            self.dwarf.insert(key, (debug, tick));
        }
        let Some((debug, used)) = self.dwarf.get_mut(&key) else {
            return Vec::new();
        };
        *used = tick;
        let Some(ctx) = &debug.dwarf else {
            return Vec::new();
        };
        let mut frames = Vec::new();
        if let Ok(mut iter) = ctx.find_frames(svma).skip_all_loads() {
            while let Ok(Some(f)) = iter.next() {
                let function = f.function.as_ref().and_then(|n| {
                    let raw = n.raw_name().ok()?;
                    Some(elf::demangle(&raw, n.language))
                });
                let (file, line) = f
                    .location
                    .map(|l| (l.file.map(str::to_string), l.line))
                    .unwrap_or((None, None));
                frames.push(Frame {
                    function,
                    file,
                    line,
                    module: m.path.clone(),
                    inlined: true,
                    addr,
                });
                if frames.len() >= 64 {
                    break;
                }
            }
        }
        if let Some(outer) = frames.last_mut() {
            outer.inlined = false;
        }
        frames
    }

    /// The perf map of `pid`, read again when the file changed (a JIT appends to it).
    fn perf_map(&mut self, pid: u32) -> Arc<PerfMap> {
        let path = perfmap::path(pid);
        let stamp = std::fs::metadata(&path)
            .ok()
            .map(|md| (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
        if let Some((seen, map)) = self.perf_maps.get(&pid)
            && *seen == stamp
        {
            return map.clone();
        }
        let map = Arc::new(match stamp {
            Some(_) => std::fs::read(&path)
                .map(|b| PerfMap::parse(&String::from_utf8_lossy(&b)))
                .unwrap_or_default(),
            None => PerfMap::default(),
        });
        if self.perf_maps.len() >= MAX_PERF_MAPS {
            self.perf_maps.clear();
        }
        self.perf_maps.insert(pid, (stamp, map.clone()));
        map
    }
}

fn jit_frame(map: &PerfMap, addr: u64, probe: u64, module: String) -> Frame {
    match map.lookup(probe) {
        Some(name) => {
            let (function, file, line) = perfmap::split_name(name);
            Frame {
                function: Some(function),
                file,
                line,
                module: "[perf-map]".to_string(),
                inlined: false,
                addr,
            }
        }
        None => Frame {
            function: None,
            file: None,
            line: None,
            module,
            inlined: false,
            addr,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn marker_function_for_symbolizer() -> u64 {
        std::hint::black_box(marker_function_for_symbolizer as *const () as u64)
    }

    /// This test process's own code: a function of this file, with a line.
    #[test]
    fn symbolizes_this_process() {
        let addr = marker_function_for_symbolizer() + 1;
        let mut s = Symbolizer::new();
        let frames = s.symbolize(std::process::id(), &[addr, 0, 1]);
        assert_eq!(frames.len(), 3);
        let outer = frames[0].last().expect("never empty");
        let name = outer.function.as_deref().unwrap_or_default();
        assert!(
            name.ends_with("marker_function_for_symbolizer"),
            "{frames:?}"
        );
        assert!(
            outer
                .file
                .as_deref()
                .unwrap_or_default()
                .ends_with("symbolize.rs")
        );
        assert!(outer.line.is_some());
        assert!(frames[1].len() == 1 && frames[1][0].function.is_none());
        assert_eq!(frames[2][0].module, "[unmapped]");
    }

    /// A symbolizer can move to another thread (a task of the daemon).
    #[test]
    fn symbolizer_is_send() {
        fn send<T: Send>(_: &T) {}
        send(&Symbolizer::new());
    }

    #[test]
    fn jit_frames_come_from_the_perf_map() {
        let map = PerfMap::parse("1000 100 JS:*onData /srv/server.js:7:3\n");
        let f = jit_frame(&map, 0x1050, 0x104f, "[anon]".into());
        assert_eq!(f.function.as_deref(), Some("onData"));
        assert_eq!(
            (f.file.as_deref(), f.line),
            (Some("/srv/server.js"), Some(7))
        );
        assert_eq!(f.module, "[perf-map]");
        let f = jit_frame(&map, 0x2000, 0x1fff, "[anon]".into());
        assert_eq!((f.function, f.module.as_str()), (None, "[anon]"));
    }
}
