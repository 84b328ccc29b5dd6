//! Logs cut down for failure messages, so a failing test prints a short log, not
//! thousands of lines.

/// A log cut down for a failure message: runs of lines that differ only in their digits
/// (timestamps, pids, counts) are folded into their first line with a count, and at most
/// 50 lines are kept (the first 10 and the last 39, with a marker between).
pub fn fold_log(lines: &[String]) -> String {
    const MAX: usize = 50;
    const HEAD: usize = 10;
    let shape = |l: &str| -> String {
        l.chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect()
    };
    let mut folded: Vec<(String, usize)> = Vec::new();
    let mut last_shape = String::new();
    for line in lines {
        let s = shape(line);
        match folded.last_mut() {
            Some((_, n)) if s == last_shape => *n += 1,
            _ => {
                folded.push((line.clone(), 1));
                last_shape = s;
            }
        }
    }
    let show = |(l, n): &(String, usize)| {
        if *n > 1 {
            format!("{l}    [x{n} similar lines]")
        } else {
            l.clone()
        }
    };
    let mut out: Vec<String> = Vec::new();
    if folded.len() <= MAX {
        out.extend(folded.iter().map(show));
    } else {
        let tail = MAX - HEAD - 1;
        out.extend(folded[..HEAD].iter().map(show));
        out.push(format!(
            "[... {} more lines ...]",
            folded.len() - HEAD - tail
        ));
        out.extend(folded[folded.len() - tail..].iter().map(show));
    }
    out.join("\n")
}

/// [`fold_log`] of a text's lines.
pub fn fold(text: &str) -> String {
    fold_log(&text.lines().map(str::to_owned).collect::<Vec<_>>())
}
