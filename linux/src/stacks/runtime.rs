//! Which frames belong to libraries and runtimes (folded in reports, so the first frame
//! shown is the application's), and which runtimes give no usable frames without a flag.

use super::{Frame, maps, perfmap};

/// Files whose code is never the application's.
const LIBRARY_FILES: &[&str] = &[
    "libc.so",
    "libc-",
    "libc.musl",
    "ld-linux",
    "ld-musl",
    "ld64.so",
    "libpthread",
    "libdl",
    "librt",
    "libm.so",
    "libstdc++",
    "libc++",
    "libgcc_s",
    "libuv",
    "libssl",
    "libcrypto",
    "libjvm.so",
    "libjava.so",
    "libnio.so",
    "libnet.so",
    "libpython",
    "libnode",
];

/// Function name prefixes of language runtimes and standard libraries: Go's runtime and
/// poller, Rust's std and async runtimes, V8 and Node internals, the JVM and JDK.
const LIBRARY_FUNCTIONS: &[&str] = &[
    // Go
    "runtime.",
    "runtime/",
    "internal/",
    "syscall.",
    "net.(*netFD)",
    "net.(*conn)",
    "os.(*File)",
    "io.Read",
    "io.Copy",
    "bufio.",
    // Rust
    "std::",
    "core::",
    "alloc::",
    "<std::",
    "<&std::",
    "<core::",
    "<alloc::",
    "tokio::",
    "<tokio::",
    "mio::",
    "<mio::",
    // C libraries linked statically
    "__libc_",
    "__GI_",
    "_start",
    "__restore_rt",
    // V8, Node, the JVM
    "Builtin:",
    "Builtins_",
    "Stub:",
    "BytecodeHandler:",
    "RegExp:",
    "node::",
    "v8::",
    "uv_",
    "uv__",
    "Interpreter",
    "StubRoutines",
    "java.",
    "jdk.",
    "sun.",
];

/// Whether `f` is library or runtime code: folded when showing where the application is.
pub fn is_library_frame(f: &Frame) -> bool {
    let file = f.module.rsplit('/').next().unwrap_or(&f.module);
    if LIBRARY_FILES.iter().any(|p| file.starts_with(p)) || file == "[vdso]" || is_interpreter(file)
    {
        return true;
    }
    // Node's own JavaScript (`node:fs`, `node:internal/...`), named by its perf map.
    if f.file
        .as_deref()
        .is_some_and(|file| file.starts_with("node:"))
    {
        return true;
    }
    f.function.as_deref().is_some_and(|name| {
        // `<&mut std::io::Stdin as std::io::Read>::read` is std's, like `std::io::...`.
        let name = name.trim_start_matches(['<', '&', '*']);
        let name = name
            .strip_prefix("mut ")
            .or(name.strip_prefix("dyn "))
            .unwrap_or(name);
        LIBRARY_FUNCTIONS.iter().any(|p| name.starts_with(p))
    })
}

/// Interpreters and VMs whose own native frames are never the application's.
fn is_interpreter(file: &str) -> bool {
    file == "node" || file == "nodejs" || file == "java" || file.starts_with("python")
}

/// The version in a name like `python3.11` or `libpython3.11.so.1.0`.
fn python_version(name: &str) -> Option<(u32, u32)> {
    let at = name.find("python")? + "python".len();
    let rest = name.get(at..)?;
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// A sentence for a process whose runtime gives no usable frames as it runs, naming the
/// flag or command that would give them; `None` for native code, or a runtime that
/// already writes a perf map.
pub fn runtime_frames_note(pid: u32) -> Option<String> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let exe = exe
        .to_string_lossy()
        .trim_end_matches(" (deleted)")
        .to_string();
    let exe_name = exe.rsplit('/').next().unwrap_or(&exe).to_string();
    let mappings = maps::read(pid).unwrap_or_default();
    let maps_file = |prefix: &str| {
        mappings
            .iter()
            .filter_map(|m| m.path.rsplit('/').next())
            .find(|f| f.starts_with(prefix))
            .map(str::to_string)
    };
    let has_perf_map =
        || std::fs::metadata(perfmap::path(pid)).is_ok_and(|m| m.is_file() && m.len() > 0);
    if exe_name.starts_with("python") || maps_file("libpython").is_some() {
        let version =
            python_version(&exe_name).or_else(|| python_version(&maps_file("libpython")?));
        return match version {
            Some((3, minor)) if minor < 12 => Some(format!(
                "Python 3.{minor} gives no Python frames to a native stack (only the \
                 interpreter loop); Python 3.12 and later give them when started with \
                 `-X perf` (or PYTHONPERFSUPPORT=1)"
            )),
            _ if has_perf_map() => None,
            Some((major, minor)) => Some(format!(
                "Python {major}.{minor} shows Python frames only when started with `-X perf` \
                 (or PYTHONPERFSUPPORT=1), which writes /tmp/perf-PID.map"
            )),
            None => Some(
                "Python shows Python frames only from 3.12 on, started with `-X perf` (or \
                 PYTHONPERFSUPPORT=1)"
                    .to_string(),
            ),
        };
    }
    if (exe_name == "node" || exe_name == "nodejs" || maps_file("libnode").is_some())
        && !has_perf_map()
    {
        return Some(
            "Node gives no JavaScript function names without a perf map: start it with \
             `--perf-basic-prof` (or `--perf-basic-prof-only-functions`)"
                .to_string(),
        );
    }
    if maps_file("libjvm.so").is_some() && !has_perf_map() {
        return Some(format!(
            "the JVM gives no Java method names without a perf map: run `jcmd {pid} \
             Compiler.perfmap` (JDK 17 and later) before capturing"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: Option<&str>, module: &str) -> Frame {
        Frame {
            function: function.map(str::to_string),
            file: None,
            line: None,
            module: module.to_string(),
            inlined: false,
            addr: 0x1000,
        }
    }

    #[test]
    fn folds_libraries_and_runtimes_only() {
        let lib = |f: Option<&str>, m: &str| is_library_frame(&frame(f, m));
        assert!(lib(Some("read"), "/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(lib(None, "/lib64/ld-linux-x86-64.so.2"));
        assert!(lib(Some("uv__read"), "/usr/lib/libuv.so.1"));
        assert!(lib(Some("internal/poll.(*FD).Read"), "/srv/gosrv"));
        assert!(lib(Some("net.(*conn).Read"), "/srv/gosrv"));
        assert!(lib(Some("runtime.goexit"), "/srv/gosrv"));
        assert!(lib(
            Some("<std::net::tcp::TcpStream as std::io::Read>::read"),
            "/srv/rs"
        ));
        assert!(lib(Some("Builtin:CallFunction"), "[perf-map]"));
        assert!(lib(Some("node::StreamBase::ReadStart"), "/usr/bin/node"));
        assert!(lib(None, "/usr/bin/python3.11"));
        assert!(!lib(Some("main.handleConn"), "/srv/gosrv"));
        assert!(!lib(
            Some("net/http.(*connReader).backgroundRead"),
            "/srv/gosrv"
        ));
        assert!(!lib(Some("leaky::handle_client"), "/srv/rs"));
        assert!(!lib(Some("onData"), "[perf-map]"));
        let node_js = Frame {
            file: Some("node:fs".into()),
            ..frame(Some("readSync"), "[perf-map]")
        };
        assert!(is_library_frame(&node_js));
        assert!(!lib(Some("serve_client"), "/srv/cserver"));
    }

    #[test]
    fn reads_python_versions() {
        assert_eq!(python_version("python3.11"), Some((3, 11)));
        assert_eq!(python_version("libpython3.12.so.1.0"), Some((3, 12)));
        assert_eq!(python_version("python3"), None);
        assert_eq!(python_version("node"), None);
    }

    #[test]
    fn native_processes_need_no_note() {
        assert_eq!(runtime_frames_note(std::process::id()), None);
        assert_eq!(runtime_frames_note(u32::MAX), None);
    }
}
