//! User stacks of real programs blocked in read(2) on their stdin (a pipe this test holds
//! open): registers from /proc/PID/task/TID/syscall, the stack copied from /proc/PID/mem
//! from sp on, as the BPF capture of `explain --where` copies it. Then [`unwind_cfi`] and
//! [`Symbolizer`] must give the program's own path, checked frame by frame against
//! binutils' `addr2line` (and the perf map for Node).
//!
//! Reading another process's syscall registers and memory needs ptrace access: root.

mod capture;

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use capture::{addr2line, base, dir, run, show, spawn_blocked, unwind_and_symbolize, which};
use cwreap_linux::stacks::{self, Frame, Symbolizer, is_library_frame};

const C_SOURCE: &str = r#"#include <stdio.h>
#include <unistd.h>

volatile int sink;

__attribute__((noinline)) int leaf_read_eof(int fd)
{
	char buf[64];
	ssize_t n = read(fd, buf, sizeof buf); /* MARK:eof_read */
	sink += (int)n;
	return (int)n + sink;
}

__attribute__((noinline)) int descend(int depth, int fd)
{
	if (depth == 0)
		return leaf_read_eof(fd) + 1; /* MARK:leaf_call */
	int r = descend(depth - 1, fd); /* MARK:descend_call */
	sink += r;
	return r + depth;
}

int main(int argc, char **argv)
{
	(void)argv;
	int r = descend(16, argc - 1); /* MARK:main_call */
	printf("%d\n", r);
	return 0;
}
"#;

const GO_SOURCE: &str = r#"package main

import (
	"fmt"
	"syscall"
)

//go:noinline
func readUntilEOF(fd int) int {
	buf := make([]byte, 64)
	n, _ := syscall.Read(fd, buf) // MARK:eof_read
	return n
}

func main() {
	n := readUntilEOF(0) // MARK:main_call
	fmt.Println(n)
}
"#;

const RUST_SOURCE: &str = r#"use std::io::Read;

#[inline(never)]
fn handle_client(input: &mut std::io::Stdin) -> usize {
    let mut buf = [0u8; 64];
    input.read(&mut buf).unwrap_or(0) // MARK:eof_read
}

fn main() {
    let n = handle_client(&mut std::io::stdin()); // MARK:main_call
    println!("{n}");
}
"#;

const JS_SOURCE: &str = r#"'use strict';
const fs = require('fs');

function readForever() {
  const buf = Buffer.alloc(64);
  return fs.readSync(0, buf, 0, 64, null); // MARK:eof_read
}

console.log(readForever());
"#;

/// The 1-based line of `MARK:name` in `source`.
fn line_of(source: &str, name: &str) -> u32 {
    let mark = format!("MARK:{name}");
    let i = source.lines().position(|l| l.contains(&mark));
    let i = i.unwrap_or_else(|| panic!("no {mark} in the source"));
    u32::try_from(i + 1).expect("line number")
}

/// Write the C source and compile it with gcc and `flags` into `name`.
fn gcc(name: &str, flags: &[&str]) -> (PathBuf, PathBuf) {
    // A directory per build: tests build at once (they run alone only once built).
    let d = dir().join(format!("{name}.d"));
    std::fs::create_dir_all(&d).expect("create the build directory");
    let src = d.join("stacks_leaf.c");
    std::fs::write(&src, C_SOURCE).expect("write the C source");
    let bin = d.join(name);
    run(
        &format!("gcc {flags:?}"),
        Command::new(which("gcc"))
            .args(flags)
            .args(["-O2", "-g", "-fomit-frame-pointer", "-Wall", "-o"])
            .arg(&bin)
            .arg(&src),
    );
    (src, bin)
}

/// The C program's stack: libc's read (folded), then leaf_read_eof at the read, 17 frames
/// of descend, and main; with `lines`, each frame's file:line as addr2line says.
fn check_c(bin: &Path, lines: bool) {
    let _alone = crate::alone();
    let b = spawn_blocked(&mut Command::new(bin));
    let syms = unwind_and_symbolize(&b);
    assert!(
        syms[0].iter().all(is_library_frame),
        "the read wrapper is a library frame"
    );
    let app: Vec<(usize, &Frame)> = syms
        .iter()
        .enumerate()
        .flat_map(|(i, fs)| fs.iter().map(move |f| (i, f)))
        .filter(|(_, f)| !is_library_frame(f))
        .collect();
    let names: Vec<&str> = app
        .iter()
        .map(|(_, f)| f.function.as_deref().unwrap_or("??"))
        .collect();
    let mut want = vec!["leaf_read_eof"];
    want.extend(std::iter::repeat_n("descend", 17));
    want.push("main");
    assert_eq!(names, want, "application frames, innermost first");
    for (i, f) in &app {
        let tool = addr2line(b.pid, bin, f.addr);
        let outer = tool.last().expect("addr2line answers");
        assert_eq!(
            Some(outer.0.as_str()),
            f.function.as_deref(),
            "frame #{i} vs addr2line"
        );
        if lines {
            let want = outer.1.clone().expect("addr2line gives a line");
            let got = (
                f.file.as_deref().map(base).unwrap_or_default().to_string(),
                f.line,
            );
            assert_eq!(got, (want.0, Some(want.1)), "frame #{i} vs addr2line");
        } else {
            assert_eq!(
                (&f.file, f.line),
                (&None, None),
                "frame #{i}: no line without DWARF"
            );
        }
    }
    if lines {
        let at = |k: usize| (app[k].1.file.as_deref().map(base), app[k].1.line);
        assert_eq!(
            at(0),
            (Some("stacks_leaf.c"), Some(line_of(C_SOURCE, "eof_read")))
        );
        assert_eq!(
            at(1),
            (Some("stacks_leaf.c"), Some(line_of(C_SOURCE, "leaf_call")))
        );
        assert_eq!(
            at(2),
            (
                Some("stacks_leaf.c"),
                Some(line_of(C_SOURCE, "descend_call"))
            )
        );
        assert_eq!(
            at(18),
            (Some("stacks_leaf.c"), Some(line_of(C_SOURCE, "main_call")))
        );
    }
}

#[test]
#[ignore = "needs root: reads another process's syscall registers and memory"]
fn c_pie_without_frame_pointers_unwinds_to_the_read_line() {
    let (_, bin) = gcc("leaf-pie", &["-pie", "-fPIE"]);
    check_c(&bin, true);
}

#[test]
#[ignore = "needs root: reads another process's syscall registers and memory"]
fn c_non_pie_without_frame_pointers_unwinds_to_the_read_line() {
    let (_, bin) = gcc("leaf-nopie", &["-no-pie", "-fno-pie"]);
    check_c(&bin, true);
}

#[test]
#[ignore = "needs root: reads another process's syscall registers and memory"]
fn c_stripped_of_debug_info_gives_names_without_lines() {
    let (_, bin) = gcc("leaf-stripped", &["-pie", "-fPIE"]);
    run("strip -g", Command::new(which("strip")).arg("-g").arg(&bin));
    check_c(&bin, false);
}

/// Debug info moved to a file of its own (`objcopy --only-keep-debug`, then
/// `--add-gnu-debuglink`), as distributions ship it: found beside the binary, lines back.
#[test]
#[ignore = "needs root: reads another process's syscall registers and memory"]
fn c_with_a_separate_debug_file_gets_its_lines_back() {
    let (_, bin) = gcc("leaf-debuglink", &["-pie", "-fPIE"]);
    let debug = bin.with_extension("debug");
    let objcopy = which("objcopy");
    run(
        "objcopy --only-keep-debug",
        Command::new(&objcopy)
            .arg("--only-keep-debug")
            .arg(&bin)
            .arg(&debug),
    );
    run("strip -g", Command::new(which("strip")).arg("-g").arg(&bin));
    run(
        "objcopy --add-gnu-debuglink",
        Command::new(&objcopy)
            .current_dir(dir())
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(&bin),
    );
    check_c(&bin, true);
}

/// The frames of `syms` (every level) for which `pred` holds.
fn frames_where(syms: &[Vec<Frame>], pred: impl Fn(&Frame) -> bool) -> Vec<&Frame> {
    syms.iter().flatten().filter(|f| pred(f)).collect()
}

/// The first application frame, and how many frames precede it.
fn first_app(syms: &[Vec<Frame>]) -> (usize, &Frame) {
    syms.iter()
        .flatten()
        .enumerate()
        .find(|(_, f)| !is_library_frame(f))
        .unwrap_or_else(|| panic!("no application frame:\n{}", show(syms)))
}

/// Build the Go program with `ldflags`, run it until it blocks in read, unwind and
/// symbolize: the first application frame and main.main.
fn go_stack(name: &str, ldflags: &str) -> (PathBuf, Vec<Vec<Frame>>, u32, capture::Blocked) {
    let d = dir().join("gosrc");
    std::fs::create_dir_all(&d).expect("create the Go source directory");
    std::fs::write(d.join("main.go"), GO_SOURCE).expect("write main.go");
    let bin = dir().join(name);
    run(
        "go build",
        Command::new(which("go"))
            .current_dir(&d)
            .env("GOCACHE", dir().join("gocache"))
            .env("GOPATH", dir().join("gopath"))
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            .env_remove("GOFLAGS")
            .arg("build")
            .arg(format!("-ldflags={ldflags}"))
            .arg("-o")
            .arg(&bin)
            .arg("main.go"),
    );
    let b = spawn_blocked(&mut Command::new(&bin));
    let syms = unwind_and_symbolize(&b);
    let pid = b.pid;
    (bin, syms, pid, b)
}

/// `go tool addr2line`'s function and line for `addr` (a return address) of a non-PIE Go
/// binary (it reads .gopclntab).
fn go_addr2line(bin: &Path, addr: u64) -> (String, Option<u32>) {
    let mut child = Command::new(which("go"))
        .args(["tool", "addr2line"])
        .arg(bin)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run go tool addr2line");
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, format!("{:#x}\n", addr - 1).as_bytes())
        .expect("write the address");
    drop(stdin);
    let out = child.wait_with_output().expect("go tool addr2line output");
    assert!(out.status.success(), "go tool addr2line failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let func = lines.next().unwrap_or("").to_string();
    let line = lines
        .next()
        .and_then(|p| p.rsplit_once(':')?.1.parse().ok());
    (func, line)
}

#[test]
#[ignore = "needs root: reads another process's syscall registers and memory"]
fn go_blocked_read_names_the_function_and_its_main_go_line() {
    let _alone = crate::alone();
    let (bin, syms, pid, _b) = go_stack("stacks-go", "");
    let (_, leaf) = first_app(&syms);
    assert_eq!(
        leaf.function.as_deref(),
        Some("main.readUntilEOF"),
        "{}",
        show(&syms)
    );
    assert_eq!(leaf.file.as_deref().map(base), Some("main.go"));
    assert_eq!(leaf.line, Some(line_of(GO_SOURCE, "eof_read")));
    let main = frames_where(&syms, |f| f.function.as_deref() == Some("main.main"));
    assert_eq!(main.len(), 1, "main.main once:\n{}", show(&syms));
    assert_eq!(main[0].line, Some(line_of(GO_SOURCE, "main_call")));
    for f in [leaf, main[0]] {
        let tool = addr2line(pid, &bin, f.addr);
        let outer = tool.last().expect("addr2line answers");
        assert_eq!(
            Some(outer.0.as_str()),
            f.function.as_deref(),
            "vs addr2line"
        );
        assert_eq!(outer.1.as_ref().map(|p| p.1), f.line, "vs addr2line");
    }
}

/// Built with -w (no DWARF, so no CFI either) and with -s -w (no .symtab either, the usual
/// container build): frame pointers unwind it and .gopclntab names the functions, as `go
/// tool addr2line` does, with main.main's line; the leaf's call is inlined code
/// (syscall.Read), whose line is not given.
#[test]
#[ignore = "needs root: reads another process's syscall registers and memory"]
fn go_without_dwarf_or_symbols_still_names_the_functions() {
    let _alone = crate::alone();
    for (name, flags) in [("stacks-go-w", "-w"), ("stacks-go-sw", "-s -w")] {
        let (bin, syms, _, _b) = go_stack(name, flags);
        let (_, leaf) = first_app(&syms);
        assert_eq!(
            leaf.function.as_deref(),
            Some("main.readUntilEOF"),
            "{}",
            show(&syms)
        );
        assert_eq!(leaf.line, None, "{flags}: inlined code has no line");
        assert_eq!(go_addr2line(&bin, leaf.addr).0, "main.readUntilEOF");
        let main = frames_where(&syms, |f| f.function.as_deref() == Some("main.main"));
        assert_eq!(main.len(), 1, "main.main once:\n{}", show(&syms));
        let (func, line) = go_addr2line(&bin, main[0].addr);
        assert_eq!(func, "main.main");
        assert_eq!(
            main[0].line,
            Some(line_of(GO_SOURCE, "main_call")),
            "{flags}"
        );
        assert_eq!(main[0].line, line, "{flags}: vs go tool addr2line");
        assert_eq!(main[0].file.as_deref().map(base), Some("main.go"));
    }
}

#[test]
#[ignore = "needs root: reads another process's syscall registers and memory"]
fn rust_blocked_read_names_the_demangled_handler() {
    let _alone = crate::alone();
    let src = dir().join("stacks_rust.rs");
    std::fs::write(&src, RUST_SOURCE).expect("write the Rust source");
    let bin = dir().join("stacks-rust");
    run(
        "rustc -g",
        Command::new("rustc")
            .args(["-g", "--edition", "2021", "-o"])
            .arg(&bin)
            .arg(&src),
    );
    let b = spawn_blocked(&mut Command::new(&bin));
    let syms = unwind_and_symbolize(&b);
    let (_, leaf) = first_app(&syms);
    assert_eq!(
        leaf.function.as_deref(),
        Some("stacks_rust::handle_client"),
        "{}",
        show(&syms)
    );
    assert_eq!(leaf.file.as_deref().map(base), Some("stacks_rust.rs"));
    assert_eq!(leaf.line, Some(line_of(RUST_SOURCE, "eof_read")));
    let main = frames_where(&syms, |f| {
        f.function.as_deref() == Some("stacks_rust::main")
    });
    assert_eq!(main.len(), 1, "stacks_rust::main once:\n{}", show(&syms));
    // addr2line -C demangles to the same name, with the hash.
    let tool = addr2line(b.pid, &bin, leaf.addr);
    let outer = tool.last().expect("addr2line answers");
    assert!(
        outer.0.starts_with("stacks_rust::handle_client"),
        "addr2line says {outer:?}"
    );
}

/// The JIT's perf map entry holding `addr` (a return address), as the file says.
fn perf_map_entry(pid: u32, addr: u64) -> Option<String> {
    let mut text = String::new();
    File::open(format!("/tmp/perf-{pid}.map"))
        .and_then(|mut f| f.read_to_string(&mut text))
        .ok()?;
    text.lines().rev().find_map(|l| {
        let mut f = l.splitn(3, ' ');
        let start = u64::from_str_radix(f.next()?, 16).ok()?;
        let size = u64::from_str_radix(f.next()?, 16).ok()?;
        (start < addr && addr - 1 < start + size).then(|| f.next().unwrap_or("").to_string())
    })
}

#[test]
#[ignore = "needs root: reads another process's syscall registers and memory"]
fn node_with_perf_basic_prof_names_the_js_function() {
    let _alone = crate::alone();
    let script = dir().join("stacks_node.js");
    std::fs::write(&script, JS_SOURCE).expect("write the script");
    let mut cmd = Command::new(which("node"));
    // Node writes its isolate-*-v8.log where it runs: in the build directory.
    cmd.current_dir(dir())
        .args(["--perf-basic-prof", "--interpreted-frames-native-stack"])
        .arg(&script);
    let b = spawn_blocked(&mut cmd);
    let syms = unwind_and_symbolize(&b);
    let js = frames_where(&syms, |f| f.function.as_deref() == Some("readForever"));
    assert!(!js.is_empty(), "no readForever frame:\n{}", show(&syms));
    let f = js[0];
    assert_eq!(
        first_app(&syms).1,
        f,
        "the first frame not folded is the JS function"
    );
    assert_eq!(f.module, "[perf-map]");
    assert_eq!(f.file.as_deref().map(base), Some("stacks_node.js"));
    assert!(!is_library_frame(f));
    let entry = perf_map_entry(b.pid, f.addr).expect("the perf map holds the address");
    assert!(entry.contains("readForever"), "the perf map says {entry}");
    assert_eq!(
        stacks::runtime_frames_note(b.pid),
        None,
        "a perf map is there"
    );
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", b.pid));
}

/// The cost of a 23-frame stack (the C program's), cold (files read, DWARF parsed) and
/// warm, over 1000 stacks: printed, not judged by time; DWARF is parsed once per file.
#[test]
#[ignore = "needs root: reads another process's syscall registers and memory"]
fn thousand_stacks_parse_each_file_once() {
    let (_, bin) = gcc("leaf-cost", &["-pie", "-fPIE"]);
    let _alone = crate::alone();
    let b = spawn_blocked(&mut Command::new(&bin));
    let mut sym = Symbolizer::new();
    let t = Instant::now();
    let addrs = stacks::unwind_cfi(b.pid, &b.regs, &b.stack).expect("unwind");
    let unwound = t.elapsed();
    let first = sym.symbolize(b.pid, &addrs);
    let cold = t.elapsed();
    let parses = sym.dwarf_parses();
    assert!(addrs.len() >= 20, "a deep stack: {}", show(&first));
    assert!(parses >= 1, "the program's DWARF was parsed");
    let (mut unwinding, mut symbolizing) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..1000 {
        let t = Instant::now();
        let again = stacks::unwind_cfi(b.pid, &b.regs, &b.stack).expect("unwind");
        unwinding += t.elapsed();
        let t = Instant::now();
        let frames = sym.symbolize(b.pid, &again);
        symbolizing += t.elapsed();
        assert_eq!(again, addrs);
        assert_eq!(frames, first);
    }
    assert_eq!(sym.dwarf_parses(), parses, "no file's DWARF parsed again");
    eprintln!(
        "{} frames: cold {:?} (unwind {:?}, symbolize {:?}); warm per stack: unwind {:?}, \
         symbolize {:?}",
        addrs.len(),
        cold,
        unwound,
        cold - unwound,
        unwinding / 1000,
        symbolizing / 1000
    );
}

/// The version `python3 --version` prints, as (major, minor).
fn python_version() -> (u32, u32) {
    let out = run(
        "python3 --version",
        Command::new(which("python3")).arg("--version"),
    );
    let v = out.trim().trim_start_matches("Python ");
    let mut parts = v
        .split('.')
        .map(|p| p.parse::<u32>().expect("a version number"));
    (parts.next().expect("major"), parts.next().expect("minor"))
}

#[test]
#[ignore = "needs root: reads another process's syscall registers and memory"]
fn runtimes_without_usable_frames_are_named_with_their_flag() {
    let _alone = crate::alone();
    let mut py = Command::new(which("python3"));
    py.args(["-c", "import sys; sys.stdin.buffer.read(1)"]);
    let b = spawn_blocked(&mut py);
    let note = stacks::runtime_frames_note(b.pid).expect("a note for Python");
    let (major, minor) = python_version();
    assert!(note.contains(&format!("Python {major}.{minor}")), "{note}");
    assert!(note.contains("-X perf"), "{note}");
    drop(b);

    let mut node = Command::new(which("node"));
    node.args([
        "-e",
        "require('fs').readSync(0, Buffer.alloc(1), 0, 1, null)",
    ]);
    let b = spawn_blocked(&mut node);
    let note = stacks::runtime_frames_note(b.pid).expect("a note for Node without a perf map");
    assert!(note.contains("--perf-basic-prof"), "{note}");
    drop(b);

    let src = dir().join("Blocked.java");
    std::fs::write(
        &src,
        "public class Blocked { public static void main(String[] a) throws Exception { \
         System.in.read(); } }\n",
    )
    .expect("write Blocked.java");
    let mut java = Command::new(which("java"));
    java.args(["-XX:+UseSerialGC", "-Xmx64m"]).arg(&src);
    let b = spawn_blocked(&mut java);
    let note = stacks::runtime_frames_note(b.pid).expect("a note for the JVM");
    let jcmd = format!("jcmd {} Compiler.perfmap", b.pid);
    assert!(note.contains(&jcmd), "{note}");
    // The command named gives the perf map, and then no note.
    run(
        &jcmd,
        Command::new(which("jcmd"))
            .arg(b.pid.to_string())
            .arg("Compiler.perfmap"),
    );
    assert_eq!(stacks::runtime_frames_note(b.pid), None, "after {jcmd}");
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", b.pid));
}
