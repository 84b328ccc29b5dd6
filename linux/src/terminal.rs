//! The terminal an output goes to, if any, and its size (TIOCGWINSZ): the command line
//! keeps its first screen to one screen, and writes no terminal escapes into a pipe.

use std::os::fd::AsFd;

/// Rows and columns of a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub rows: u16,
    pub cols: u16,
}

/// What a terminal that does not say its size is taken to be (a VT100's screen, which
/// is also what a pseudo-terminal nobody sized reports as 0 × 0).
pub const DEFAULT: Size = Size { rows: 24, cols: 80 };

/// `None` when `fd` is not a terminal (a pipe, a file); else its size, or [`DEFAULT`] for
/// a dimension the terminal reports as 0.
pub fn size(fd: impl AsFd) -> Option<Size> {
    let fd = fd.as_fd();
    if !rustix::termios::isatty(fd) {
        return None;
    }
    let ws = rustix::termios::tcgetwinsize(fd).ok();
    let pick = |v: Option<u16>, default: u16| v.filter(|n| *n > 0).unwrap_or(default);
    Some(Size {
        rows: pick(ws.map(|w| w.ws_row), DEFAULT.rows),
        cols: pick(ws.map(|w| w.ws_col), DEFAULT.cols),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_is_no_terminal() {
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        assert_eq!(size(&r), None);
        assert_eq!(size(&w), None);
    }
}
