//! Which runtime a process runs, told from what its executable and memory map show, and
//! what a JVM's collections say of a socket nobody watches. Pure: `commands::explain` reads
//! the clues ([`cwreap_linux::kernel::ProcRead::runtime_clues`] and `jvm_gc`).
//!
//! The tests, cheapest that hold: a JVM maps `libjvm.so`; Node is an executable named
//! `node` (or maps `libnode.so`, as distribution builds do); CPython maps `libpython3.X.so`
//! or is an executable named `python*` (Debian's is static); a Go binary has Go's own ELF
//! sections (`.go.buildinfo`, `.note.go.buildid`, `.gopclntab`), kept by `-ldflags=-s -w`
//! and by strip, since the runtime needs them. Anything else is `other`; a process whose
//! map could not be read in time is `unknown`.

use serde::Serialize;

use cwreap_linux::procfs::{JvmGc, RuntimeClues};

/// The runtime of a process, as far as its executable and memory map tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    Jvm,
    Node,
    Python,
    Go,
    /// Native code or a runtime explain does not know (C, C++, Rust, ...).
    Other,
    /// Its memory map could not be read (in time).
    Unknown,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Jvm => "jvm",
            Runtime::Node => "node",
            Runtime::Python => "python",
            Runtime::Go => "go",
            Runtime::Other => "other",
            Runtime::Unknown => "unknown",
        }
    }
}

/// A runtime and what told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    pub runtime: Runtime,
    /// `libjvm.so in its memory map`, `its executable has a .go.buildinfo section`, ...
    pub clue: String,
}

/// The last part of a path, without the ` (deleted)` the kernel adds to a replaced file.
fn base_name(path: &str) -> &str {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.rsplit('/').next().unwrap_or(path)
}

/// The sections only the Go linker writes.
const GO_SECTIONS: [&str; 3] = [".go.buildinfo", ".note.go.buildid", ".gopclntab"];

/// The runtime `clues` show.
pub fn identify(clues: &RuntimeClues) -> Identified {
    let found = |runtime, clue: String| Identified { runtime, clue };
    let mapped = || clues.mapped.iter().map(|p| base_name(p));
    if mapped().any(|n| n == "libjvm.so") {
        return found(Runtime::Jvm, "libjvm.so in its memory map".into());
    }
    let exe = base_name(&clues.exe);
    if exe == "node" || exe == "nodejs" {
        return found(Runtime::Node, format!("its executable is {exe}"));
    }
    if let Some(lib) = mapped().find(|n| n.starts_with("libnode.so")) {
        return found(Runtime::Node, format!("{lib} in its memory map"));
    }
    if let Some(lib) = mapped().find(|n| n.starts_with("libpython")) {
        return found(Runtime::Python, format!("{lib} in its memory map"));
    }
    if exe.starts_with("python") {
        return found(Runtime::Python, format!("its executable is {exe}"));
    }
    let sections = clues.exe_sections.as_deref().unwrap_or_default();
    if let Some(s) = GO_SECTIONS
        .iter()
        .find(|s| sections.iter().any(|n| n == *s))
    {
        return found(Runtime::Go, format!("its executable has a {s} section"));
    }
    found(
        Runtime::Other,
        "none of the runtimes explain knows shows in its executable and memory map".into(),
    )
}

/// The runtime of a process whose clues could not be read, and why.
pub fn unknown(why: impl Into<String>) -> Identified {
    Identified {
        runtime: Runtime::Unknown,
        clue: why.into(),
    }
}

/// The full collections of a JVM (every object examined, so every unreachable Socket
/// found), from its perf data: collectors named `... full collection ...` (Serial,
/// Parallel, G1). A JVM whose collectors have no such name (ZGC, Shenandoah) tells nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FullGc {
    /// Full collections since the JVM started.
    pub full_collections: u64,
    /// How long ago the last one started and ended, when one has run and ended.
    #[serde(skip)]
    pub last_started_ms_ago: Option<u64>,
    pub last_ended_ms_ago: Option<u64>,
}

/// What a JVM's counters say of its full collections; None when it has no full collector.
pub fn full_gc(gc: &JvmGc) -> Option<FullGc> {
    let full: Vec<_> = gc
        .collectors
        .iter()
        .filter(|c| c.name.to_ascii_lowercase().contains("full collection"))
        .collect();
    if full.is_empty() {
        return None;
    }
    let ago = |ticks: i64| -> u64 {
        let d = i128::from(gc.now_ticks.saturating_sub(ticks).max(0));
        u64::try_from(d * 1000 / i128::from(gc.frequency.max(1))).unwrap_or(u64::MAX)
    };
    // The one that ran last; an unfinished one (its start after its end) has no end yet.
    let last = full
        .iter()
        .filter(|c| c.invocations > 0)
        .max_by_key(|c| c.last_entry_ticks);
    let ended = last.filter(|c| c.last_exit_ticks >= c.last_entry_ticks);
    Some(FullGc {
        full_collections: full
            .iter()
            .map(|c| u64::try_from(c.invocations).unwrap_or(0))
            .sum(),
        last_started_ms_ago: ended.map(|c| ago(c.last_entry_ticks)),
        last_ended_ms_ago: ended.map(|c| ago(c.last_exit_ticks)),
    })
}

/// The JVM's clock is sampled every 50 ms: a start time read from it may be that late.
const SAMPLED_MS: u64 = 100;
/// After a collection finds a Socket unreachable, its Cleaner thread closes the fd: give it
/// this long before a socket still open counts as having survived.
pub const CLEANER_GRACE_MS: u64 = 1000;

/// Whether a full collection that started after the socket entered CLOSE_WAIT (at least
/// `age_min_ms` ago) has ended, long enough ago for the Cleaner: then a Socket still open
/// is still referenced.
pub fn survived_full_gc(full: &FullGc, age_min_ms: u64) -> bool {
    match (full.last_started_ms_ago, full.last_ended_ms_ago) {
        (Some(started), Some(ended)) => {
            started.saturating_add(SAMPLED_MS) < age_min_ms && ended >= CLEANER_GRACE_MS
        }
        _ => false,
    }
}

/// Whether a collection may yet close a socket: an fd nothing watches in a JVM (a Socket
/// registered with a selector is reachable from it) that no full collection is known to
/// have survived, or any in Go (a net.Conn nothing references is closed by its
/// finalizer, and whether a collection ever runs is not visible from outside). CPython
/// closes a socket object at its last reference, so one still open is referenced; Node
/// handles and native fds have no collector.
pub fn gc_may_close(
    runtime: Runtime,
    watched: bool,
    full: Option<&FullGc>,
    age_min_ms: u64,
) -> bool {
    match runtime {
        Runtime::Jvm => !watched && !full.is_some_and(|f| survived_full_gc(f, age_min_ms)),
        Runtime::Go => true,
        Runtime::Node | Runtime::Python | Runtime::Other | Runtime::Unknown => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cwreap_linux::procfs::Collector;

    fn clues(exe: &str, libs: &[&str], sections: Option<&[&str]>) -> RuntimeClues {
        RuntimeClues {
            exe: exe.into(),
            mapped: std::iter::once(exe)
                .chain(libs.iter().copied())
                .map(str::to_owned)
                .collect(),
            exe_sections: sections.map(|s| s.iter().map(|n| (*n).to_owned()).collect()),
        }
    }

    #[test]
    fn runtimes_from_the_executable_and_the_map() {
        let elf: &[&str] = &["", ".interp", ".text", ".got", ".gnu.version", ".data"];
        let cases: [(RuntimeClues, Runtime, &str); 9] = [
            (
                clues(
                    "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
                    &["/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so"],
                    Some(elf),
                ),
                Runtime::Jvm,
                "libjvm.so in its memory map",
            ),
            (
                clues(
                    "/usr/bin/node",
                    &["/usr/lib/x86_64-linux-gnu/libc.so.6"],
                    Some(elf),
                ),
                Runtime::Node,
                "its executable is node",
            ),
            (
                clues("/usr/bin/node (deleted)", &[], None),
                Runtime::Node,
                "its executable is node",
            ),
            (
                clues(
                    "/usr/bin/nodejs-app",
                    &["/usr/lib/x86_64-linux-gnu/libnode.so.108"],
                    Some(elf),
                ),
                Runtime::Node,
                "libnode.so.108 in its memory map",
            ),
            (
                clues("/usr/bin/python3.11", &[], Some(elf)),
                Runtime::Python,
                "its executable is python3.11",
            ),
            (
                clues(
                    "/usr/bin/uwsgi-core",
                    &["/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"],
                    Some(elf),
                ),
                Runtime::Python,
                "libpython3.11.so.1.0 in its memory map",
            ),
            (
                clues(
                    "/srv/api",
                    &[],
                    Some(&["", ".text", ".gopclntab", ".go.buildinfo", ".noptrdata"]),
                ),
                Runtime::Go,
                "its executable has a .go.buildinfo section",
            ),
            (
                // Stripped of .go.buildinfo by an old toolchain: the build id note stays.
                clues("/srv/api", &[], Some(&["", ".text", ".note.go.buildid"])),
                Runtime::Go,
                "its executable has a .note.go.buildid section",
            ),
            (
                clues(
                    "/usr/sbin/leaky-c",
                    &["/usr/lib/x86_64-linux-gnu/libc.so.6"],
                    Some(elf),
                ),
                Runtime::Other,
                "none of the runtimes explain knows shows in its executable and memory map",
            ),
        ];
        for (c, runtime, clue) in cases {
            assert_eq!(
                identify(&c),
                Identified {
                    runtime,
                    clue: clue.into()
                },
                "{c:?}"
            );
        }
        // Unreadable sections: not Go, whatever else.
        assert_eq!(
            identify(&clues("/srv/api", &[], None)).runtime,
            Runtime::Other
        );
        assert_eq!(unknown("x").runtime, Runtime::Unknown);
    }

    fn collector(name: &str, n: i64, entry: i64, exit: i64) -> Collector {
        Collector {
            name: name.into(),
            invocations: n,
            last_entry_ticks: entry,
            last_exit_ticks: exit,
        }
    }

    /// A JVM clock of 1000 ticks a second (1 tick = 1 ms), now at 100 s.
    fn jvm(collectors: Vec<Collector>) -> JvmGc {
        JvmGc {
            frequency: 1000,
            now_ticks: 100_000,
            collectors,
        }
    }

    #[test]
    fn full_collections_and_what_they_prove() {
        let young = collector("G1 young collection pauses", 40, 99_000, 99_010);
        // None ran: nothing survived one.
        let none = full_gc(&jvm(vec![
            young.clone(),
            collector("G1 full collection pauses", 0, 0, 0),
        ]))
        .expect("a full collector");
        assert_eq!(
            none,
            FullGc {
                full_collections: 0,
                last_started_ms_ago: None,
                last_ended_ms_ago: None
            }
        );
        assert!(!survived_full_gc(&none, 60_000));
        // One started 10 s ago and took 50 ms.
        let one = full_gc(&jvm(vec![
            young.clone(),
            collector("Serial full collection pauses", 2, 90_000, 90_050),
        ]))
        .expect("a full collector");
        assert_eq!(
            (
                one.full_collections,
                one.last_started_ms_ago,
                one.last_ended_ms_ago
            ),
            (2, Some(10_000), Some(9_950))
        );
        // In CLOSE_WAIT for a minute: it ran since, and the socket is still open.
        assert!(survived_full_gc(&one, 60_000));
        // For 5 s only: the collection was before, it proves nothing.
        assert!(!survived_full_gc(&one, 5_000));
        // Ended less than the Cleaner's grace ago: not yet.
        let just = full_gc(&jvm(vec![collector(
            "G1 full collection pauses",
            1,
            99_500,
            99_600,
        )]))
        .expect("a full collector");
        assert!(!survived_full_gc(&just, 60_000));
        // One running now (started after the last end): no end to count on.
        let running = full_gc(&jvm(vec![collector(
            "Serial full collection pauses",
            3,
            99_900,
            80_000,
        )]))
        .expect("a full collector");
        assert_eq!(running.last_ended_ms_ago, None);
        assert!(!survived_full_gc(&running, 60_000));
        // Collectors without full collections (ZGC's names): nothing to tell.
        assert_eq!(
            full_gc(&jvm(vec![collector("ZGC Cycles", 5, 90_000, 91_000)])),
            None
        );
    }

    #[test]
    fn which_sockets_a_collection_may_close() {
        let ran = FullGc {
            full_collections: 1,
            last_started_ms_ago: Some(10_000),
            last_ended_ms_ago: Some(9_900),
        };
        // A JVM: unwatched and not known to have survived one.
        assert!(gc_may_close(Runtime::Jvm, false, None, 60_000));
        assert!(gc_may_close(Runtime::Jvm, false, Some(&ran), 5_000));
        assert!(!gc_may_close(Runtime::Jvm, false, Some(&ran), 60_000));
        // Registered with a selector: reachable from it.
        assert!(!gc_may_close(Runtime::Jvm, true, None, 60_000));
        // Go: cannot tell, so it may.
        assert!(gc_may_close(Runtime::Go, true, None, 60_000));
        // No collector closes these.
        for rt in [
            Runtime::Python,
            Runtime::Node,
            Runtime::Other,
            Runtime::Unknown,
        ] {
            assert!(!gc_may_close(rt, false, None, 60_000), "{rt:?}");
        }
    }
}
