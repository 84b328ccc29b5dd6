//! Each known way around the checker, planted into a copy of this tree: a real import
//! cycle written in a form the checker once missed, or a real `unsafe` violation. Every
//! plant is legal Rust (`cargo check` accepts the cycles; the lint tables reject some of the
//! `unsafe` ones, which is the point of them), and the checker must name each one.

use std::path::{Path, PathBuf};

/// One change to a copied file.
pub enum Edit {
    /// Add `text` at the end of the file.
    Append(&'static str, &'static str),
    /// Write a new file.
    Create(&'static str, &'static str),
    /// Add `text` at the end of the file, this many times.
    Repeat(&'static str, &'static str, usize),
}

pub struct Plant {
    pub name: &'static str,
    pub edits: &'static [Edit],
    /// What the checker's findings must contain. `{file|needle}` stands for `file:N`,
    /// N being the first line of the planted file that contains `needle`.
    pub expect: &'static [&'static str],
    /// `cargo check --workspace --lib` accepts it (the bypass is real code).
    pub compiles: bool,
}

/// What the checker reads, copied: the sources, the tests and benchmarks, the fuzz targets
/// and the manifests (and Cargo.lock, the test kit and the BPF object the kernel crate
/// embeds, for `cargo check` on a copy).
const COPIED: [&str; 11] = [
    "src",
    "linux/src",
    "linux/bpf",
    "testkit",
    "tests",
    "benches",
    "fuzz/fuzz_targets",
    "Cargo.toml",
    "Cargo.lock",
    "linux/Cargo.toml",
    "fuzz/Cargo.toml",
];

/// Copy what the checker reads from `from` into a fresh `to`.
pub fn copy_tree(from: &Path, to: &Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).unwrap_or_else(|e| panic!("remove {}: {e}", to.display()));
    }
    for item in COPIED {
        copy(&from.join(item), &to.join(item));
    }
}

fn copy(from: &Path, to: &Path) {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    if from.is_dir() {
        let entries =
            std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
        for entry in entries {
            let entry = entry.expect("directory entry");
            copy(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    }
}

impl Plant {
    /// Apply the edits to the copy at `root`.
    pub fn apply(&self, root: &Path) {
        for edit in self.edits {
            match edit {
                Edit::Append(file, text) => append(root, file, text),
                Edit::Repeat(file, text, n) => append(root, file, &text.repeat(*n)),
                Edit::Create(file, text) => write(&root.join(file), text),
            }
        }
    }

    /// The expected findings, with `{file|needle}` replaced by `file:line` in the copy at
    /// `root`.
    pub fn expected(&self, root: &Path) -> Vec<String> {
        self.expect
            .iter()
            .map(|e| {
                let mut out = String::new();
                let mut rest = *e;
                while let Some(open) = rest.find('{') {
                    let close = rest[open..]
                        .find('}')
                        .map(|c| open + c)
                        .expect("a closing }");
                    let (file, needle) =
                        rest[open + 1..close].split_once('|').expect("file|needle");
                    out.push_str(&rest[..open]);
                    out.push_str(&format!("{file}:{}", line_of(root, file, needle)));
                    rest = &rest[close + 1..];
                }
                out.push_str(rest);
                out
            })
            .collect()
    }
}

fn append(root: &Path, file: &str, text: &str) {
    let path = root.join(file);
    let mut old =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    if !old.ends_with('\n') {
        old.push('\n');
    }
    write(&path, &format!("{old}{text}"));
}

fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn line_of(root: &Path, file: &str, needle: &str) -> usize {
    let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    text.lines()
        .position(|l| l.contains(needle))
        .map(|k| k + 1)
        .unwrap_or_else(|| panic!("{file}: no line contains {needle:?}"))
}

/// Where the copies go.
pub fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("layering")
        .join(name)
}

/// The other end of most planted cycles: an item of the daemon's policy module that names
/// an item of the planted file.
const POLICY: &str = "src/daemon/policy.rs";

pub const PLANTS: &[Plant] = &[
    Plant {
        name: "use super::",
        edits: &[
            Edit::Append(
                "src/daemon/metrics.rs",
                "use super::policy::PlantedPolicy;\n\
                 pub struct PlantedMetrics(pub Option<PlantedPolicy>);\n",
            ),
            Edit::Append(
                POLICY,
                "pub struct PlantedPolicy(pub Option<Box<crate::daemon::metrics::PlantedMetrics>>);\n",
            ),
        ],
        expect: &[
            "import cycle: src/daemon/metrics.rs -> src/daemon/policy.rs -> src/daemon/metrics.rs",
            "{src/daemon/metrics.rs|use super::policy::PlantedPolicy} -> src/daemon/policy.rs: \
             `use super::policy::PlantedPolicy`",
            "{src/daemon/policy.rs|pub struct PlantedPolicy} -> src/daemon/metrics.rs: \
             `crate::daemon::metrics::PlantedMetrics`",
        ],
        compiles: true,
    },
    Plant {
        name: "use super::super::",
        edits: &[
            Edit::Append(
                "src/shared/config/model.rs",
                "use super::super::values::PlantedValues;\n\
                 pub struct PlantedModel(pub Option<PlantedValues>);\n",
            ),
            Edit::Append(
                "src/shared/values.rs",
                "pub struct PlantedValues(pub Option<Box<crate::shared::config::model::PlantedModel>>);\n",
            ),
        ],
        expect: &[
            "import cycle: src/shared/config/model.rs -> src/shared/values.rs -> \
             src/shared/config/model.rs",
            "{src/shared/config/model.rs|use super::super::values} -> src/shared/values.rs: \
             `use super::super::values::PlantedValues`",
        ],
        compiles: true,
    },
    Plant {
        name: "super::super:: from below a non-mod-rs file",
        edits: &[
            Edit::Append(
                "linux/src/netlink/request.rs",
                "pub struct PlantedRequest(pub Option<super::super::secure_fs::PlantedOs>);\n",
            ),
            Edit::Append(
                "linux/src/secure_fs.rs",
                "pub struct PlantedOs(pub Option<Box<crate::netlink::PlantedNetlink>>);\n",
            ),
            Edit::Append(
                "linux/src/netlink.rs",
                "pub struct PlantedNetlink(pub Option<Box<request::PlantedRequest>>);\n",
            ),
        ],
        expect: &[
            "import cycle: linux/src/netlink.rs -> linux/src/netlink/request.rs -> \
             linux/src/secure_fs.rs -> linux/src/netlink.rs",
            "{linux/src/netlink/request.rs|PlantedRequest} -> linux/src/secure_fs.rs: \
             `super::super::secure_fs::PlantedOs`",
        ],
        compiles: true,
    },
    Plant {
        name: "use crate as root",
        edits: &[
            Edit::Append(
                "src/shared/values.rs",
                "use crate as root;\n\
                 pub struct PlantedValues(pub Option<root::daemon::policy::PlantedPolicy>);\n",
            ),
            Edit::Append(
                POLICY,
                "pub struct PlantedPolicy(pub Option<Box<crate::shared::values::PlantedValues>>);\n",
            ),
        ],
        expect: &[
            "{src/shared/values.rs|use crate as root}: `use crate as root` gives a crate or \
             module a second name",
            "import cycle: src/daemon/policy.rs -> src/shared/values.rs -> src/daemon/policy.rs",
            "{src/shared/values.rs|root::daemon} -> src/daemon/policy.rs: \
             `root::daemon::policy::PlantedPolicy`",
        ],
        compiles: true,
    },
    Plant {
        name: "use super::super as name",
        edits: &[
            Edit::Append(
                "src/shared/config/model.rs",
                "use super::super as room;\n\
                 pub struct PlantedModel(pub Option<room::values::PlantedValues>);\n",
            ),
            Edit::Append(
                "src/shared/values.rs",
                "pub struct PlantedValues(pub Option<Box<crate::shared::config::model::PlantedModel>>);\n",
            ),
        ],
        expect: &[
            "{src/shared/config/model.rs|use super::super as room}: `use super::super as room` \
             gives a crate or module a second name",
            "import cycle: src/shared/config/model.rs -> src/shared/values.rs -> \
             src/shared/config/model.rs",
        ],
        compiles: true,
    },
    Plant {
        name: "use crate::*",
        edits: &[
            Edit::Append(
                "src/shared/usage.rs",
                "use crate::*;\n\
                 pub struct PlantedUsage(pub Option<daemon::policy::PlantedPolicy>);\n",
            ),
            Edit::Append(
                POLICY,
                "pub struct PlantedPolicy(pub Option<Box<crate::shared::usage::PlantedUsage>>);\n",
            ),
        ],
        expect: &[
            "import cycle: src/daemon/policy.rs -> src/shared/usage.rs -> src/daemon/policy.rs",
            "{src/shared/usage.rs|pub struct PlantedUsage} -> src/daemon/policy.rs: \
             `daemon::policy::PlantedPolicy`",
        ],
        compiles: true,
    },
    Plant {
        name: "glob import of a module",
        edits: &[
            Edit::Append(
                "src/shared/values.rs",
                "use crate::daemon::cycle_report::*;\n\
                 pub struct PlantedValues(pub Option<PlantedReport>);\n",
            ),
            Edit::Append(
                "src/daemon/cycle_report.rs",
                "pub struct PlantedReport(pub Option<Box<crate::shared::values::PlantedValues>>);\n",
            ),
        ],
        expect: &[
            "import cycle: src/daemon/cycle_report.rs -> src/shared/values.rs -> \
             src/daemon/cycle_report.rs",
            "{src/shared/values.rs|use crate::daemon::cycle_report::*} -> \
             src/daemon/cycle_report.rs: `use crate::daemon::cycle_report::*",
        ],
        compiles: true,
    },
    Plant {
        name: "pub use in lib.rs",
        edits: &[
            Edit::Append("src/lib.rs", "pub use daemon::policy::PlantedPolicy;\n"),
            Edit::Append(
                "src/shared/values.rs",
                "pub struct PlantedValues(pub Option<crate::PlantedPolicy>);\n",
            ),
            Edit::Append(
                POLICY,
                "pub struct PlantedPolicy(pub Option<Box<crate::shared::values::PlantedValues>>);\n",
            ),
        ],
        expect: &[
            "import cycle: src/daemon/policy.rs -> src/shared/values.rs -> src/daemon/policy.rs",
            "{src/shared/values.rs|crate::PlantedPolicy} -> src/daemon/policy.rs: \
             `crate::PlantedPolicy`",
        ],
        compiles: true,
    },
    Plant {
        name: "extern crate self as cwreap",
        edits: &[
            Edit::Append("src/lib.rs", "extern crate self as cwreap;\n"),
            Edit::Append(
                "src/shared/values.rs",
                "pub struct PlantedValues(pub Option<cwreap::daemon::policy::PlantedPolicy>);\n",
            ),
            Edit::Append(
                POLICY,
                "pub struct PlantedPolicy(pub Option<Box<crate::shared::values::PlantedValues>>);\n",
            ),
        ],
        expect: &[
            "{src/lib.rs|extern crate self}: `extern crate self` gives the crate a second name",
            "import cycle: src/daemon/policy.rs -> src/shared/values.rs -> src/daemon/policy.rs",
            "{src/shared/values.rs|cwreap::daemon} -> src/daemon/policy.rs: \
             `cwreap::daemon::policy::PlantedPolicy`",
        ],
        compiles: true,
    },
    Plant {
        name: "production code in tests.rs",
        edits: &[
            Edit::Append("src/shared/mod.rs", "pub mod tests;\n"),
            Edit::Create(
                "src/shared/tests.rs",
                "//! Not test code: declared without #[cfg(test)].\n\
                 pub struct PlantedTests(pub Option<crate::daemon::policy::PlantedPolicy>);\n",
            ),
            Edit::Append(
                POLICY,
                "pub struct PlantedPolicy(pub Option<Box<crate::shared::tests::PlantedTests>>);\n",
            ),
        ],
        expect: &[
            "src/shared/tests.rs: a file named tests.rs must be test code, declared \
             `#[cfg(test)] mod tests;`",
            "import cycle: src/daemon/policy.rs -> src/shared/tests.rs -> src/daemon/policy.rs",
            "{src/shared/tests.rs|PlantedTests} -> src/daemon/policy.rs: \
             `crate::daemon::policy::PlantedPolicy`",
        ],
        compiles: true,
    },
    Plant {
        name: "the command line uses the daemon",
        edits: &[Edit::Append(
            "src/cli/plan.rs",
            "pub fn planted() -> u64 {\n    crate::daemon::policy::SELECT_FD_SETSIZE\n}\n",
        )],
        expect: &[
            "{src/cli/plan.rs|crate::daemon::policy::SELECT_FD_SETSIZE} -> src/daemon/policy.rs: \
             `crate::daemon::policy::SELECT_FD_SETSIZE`: src/cli/ may not use src/daemon/ \
             (rooms: cli and daemon use shared; neither uses the other; shared uses neither)",
        ],
        compiles: true,
    },
    Plant {
        name: "#[path] module",
        edits: &[
            Edit::Append(
                "src/shared/mod.rs",
                "#[path = \"../daemon/planted.rs\"]\npub mod planted;\n",
            ),
            Edit::Create(
                "src/daemon/planted.rs",
                "//! In daemon/, but the module shared::planted: `super` is shared.\n\
                 use super::values::PlantedValues;\n\
                 pub struct PlantedPath(pub Option<PlantedValues>);\n",
            ),
            Edit::Append(
                "src/shared/values.rs",
                "pub struct PlantedValues(pub Option<Box<crate::shared::planted::PlantedPath>>);\n",
            ),
        ],
        expect: &[
            "import cycle: src/daemon/planted.rs -> src/shared/values.rs -> \
             src/daemon/planted.rs",
            "{src/daemon/planted.rs|use super::values} -> src/shared/values.rs: \
             `use super::values::PlantedValues`",
            "{src/shared/values.rs|pub struct PlantedValues} -> src/daemon/planted.rs: \
             `crate::shared::planted::PlantedPath`: src/shared/ may not use src/daemon/ \
             (rooms: cli and daemon use shared; neither uses the other; shared uses neither)",
        ],
        compiles: true,
    },
    Plant {
        name: "module alias imported in a function body",
        edits: &[
            Edit::Append(
                "src/shared/selector.rs",
                "pub struct PlantedSelector;\n\
                 pub fn planted() -> bool {\n\
                 \x20   use crate::daemon::policy as p;\n\
                 \x20   p::PlantedPolicy(None).0.is_none()\n\
                 }\n",
            ),
            Edit::Append(
                POLICY,
                "pub struct PlantedPolicy(pub Option<Box<crate::shared::selector::PlantedSelector>>);\n",
            ),
        ],
        expect: &[
            "import cycle: src/daemon/policy.rs -> src/shared/selector.rs -> \
             src/daemon/policy.rs",
            "{src/shared/selector.rs|p::PlantedPolicy} -> src/daemon/policy.rs: \
             `p::PlantedPolicy`",
        ],
        compiles: true,
    },
    Plant {
        name: "path inside a macro call",
        edits: &[
            Edit::Append(
                "src/shared/usage.rs",
                "pub struct PlantedUsage;\n\
                 pub fn planted() -> usize {\n\
                 \x20   vec![crate::daemon::policy::PlantedPolicy(None)].len()\n\
                 }\n",
            ),
            Edit::Append(
                POLICY,
                "pub struct PlantedPolicy(pub Option<Box<crate::shared::usage::PlantedUsage>>);\n",
            ),
        ],
        expect: &[
            "import cycle: src/daemon/policy.rs -> src/shared/usage.rs -> src/daemon/policy.rs",
            "{src/shared/usage.rs|vec![} -> src/daemon/policy.rs: \
             `crate::daemon::policy::PlantedPolicy`",
        ],
        compiles: true,
    },
    Plant {
        name: "macro_rules! called by its bare name",
        edits: &[
            Edit::Append(
                "src/shared/mod.rs",
                "macro_rules! planted_macro {\n\
                 \x20   () => {\n\
                 \x20       0usize\n\
                 \x20   };\n\
                 }\n\
                 pub mod planted_child;\n\
                 pub fn planted() -> Option<planted_child::PlantedChild> {\n\
                 \x20   None\n\
                 }\n",
            ),
            Edit::Create(
                "src/shared/planted_child.rs",
                "//! Calls a macro of its parent, in scope here without a path.\n\
                 pub struct PlantedChild(pub usize);\n\
                 pub fn planted() -> PlantedChild {\n\
                 \x20   PlantedChild(planted_macro!())\n\
                 }\n",
            ),
        ],
        expect: &[
            "import cycle: src/shared/mod.rs -> src/shared/planted_child.rs -> src/shared/mod.rs",
            "{src/shared/planted_child.rs|planted_macro!} -> src/shared/mod.rs: `planted_macro!`",
        ],
        compiles: true,
    },
    Plant {
        name: "the kernel crate names tracing",
        edits: &[Edit::Append(
            "linux/src/tcp.rs",
            "pub fn planted() {\n\
             \x20   tracing::info!(\"planted\");\n\
             }\n",
        )],
        expect: &["{linux/src/tcp.rs|tracing::info}: `tracing` in the kernel crate"],
        // cwreap-linux does not depend on tracing.
        compiles: false,
    },
    Plant {
        name: "a file past 600 lines",
        edits: &[
            Edit::Repeat(
                "src/shared/usage.rs",
                "/// Planted, to make the file long.\n",
                600,
            ),
            Edit::Append("src/shared/usage.rs", "pub struct PlantedLong;\n"),
        ],
        expect: &[
            "src/shared/usage.rs: ",
            " lines outside #[cfg(test)] (at most 600)",
        ],
        compiles: true,
    },
    Plant {
        name: "unsafe in benches/",
        edits: &[Edit::Append(
            "benches/inject.rs",
            "#[allow(dead_code)]\n\
             fn planted(x: &u8) -> u8 {\n\
             \x20   unsafe { *(x as *const u8) }\n\
             }\n",
        )],
        expect: &["{benches/inject.rs|unsafe {}: `unsafe` outside cwreap-linux"],
        // The workspace's lint table forbids it: benches/ no longer builds.
        compiles: false,
    },
    Plant {
        name: "unsafe impl without a SAFETY note",
        edits: &[Edit::Append(
            "linux/src/tcp.rs",
            "pub struct PlantedPtr(pub *mut u8);\n\
             unsafe impl Send for PlantedPtr {}\n",
        )],
        expect: &["{linux/src/tcp.rs|unsafe impl}: `unsafe` without a `// SAFETY:` note above it"],
        compiles: true,
    },
    Plant {
        name: "one SAFETY note over three unsafe blocks",
        edits: &[Edit::Append(
            "linux/src/tcp.rs",
            "/// Three ids.\n\
             pub fn planted_ids() -> u64 {\n\
             \x20   // SAFETY: getpid, getppid and getuid take no argument and cannot fail.\n\
             \x20   let ids = [unsafe { libc::getpid() } as u64, unsafe { libc::getppid() } as u64,\n\
             \x20       unsafe { libc::getuid() } as u64];\n\
             \x20   ids.iter().sum()\n\
             }\n",
        )],
        expect: &[
            "{linux/src/tcp.rs|let ids}: `unsafe` shares the SAFETY note of line",
            "{linux/src/tcp.rs|libc::getuid}: `unsafe` shares the SAFETY note of line",
        ],
        compiles: true,
    },
];
