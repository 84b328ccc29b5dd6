//! Running a program on a pseudo-terminal of a given size, as a person at a terminal would,
//! through util-linux `script(1)`: what it wrote there, line by line.

use std::path::Path;
use std::process::{Command, Stdio};

/// What a program wrote on its terminal (stdout and stderr both, as a screen shows them),
/// with the terminal's `\r\n` turned back into `\n`, and its exit code.
#[derive(Debug, Clone)]
pub struct Screenful {
    pub text: String,
    pub code: Option<i32>,
}

impl Screenful {
    pub fn lines(&self) -> Vec<&str> {
        self.text.lines().collect()
    }
}

/// A word for `sh -c`, single-quoted.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Whether `script(1)` is here (Debian: bsdutils).
pub fn have_script() -> bool {
    Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Run `program args` with stdout and stderr on a new pseudo-terminal of `rows` × `cols`
/// and `env` added to the environment. Panics when `script` cannot run (check
/// [`have_script`] first).
pub fn on_terminal(
    rows: u16,
    cols: u16,
    program: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Screenful {
    let mut line = format!("stty rows {rows} cols {cols}; exec");
    for w in std::iter::once(program.to_string_lossy().as_ref()).chain(args.iter().copied()) {
        line.push(' ');
        line.push_str(&quote(w));
    }
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &line, "/dev/null"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run script(1)");
    Screenful {
        text: String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n"),
        code: out.status.code(),
    }
}
