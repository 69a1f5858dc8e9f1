//! The terminal: plain lines, or a panel redrawn in place under scrolling notes.

use std::{
    fmt::Write as _,
    io::{self, Write as _},
};

pub(crate) fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

pub(crate) fn fmt_cpu(v: Option<f64>) -> String {
    v.map_or("-".into(), |c| format!("{c:.0}%"))
}

pub(crate) fn fmt_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.0}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

pub(crate) fn spark(fraction: f64) -> char {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if fraction <= 0.0 {
        return ' ';
    }
    BARS[((fraction * 8.0).ceil() as usize).clamp(1, 8) - 1]
}

pub(crate) struct View {
    /// Redraw a panel in place (a terminal), or print plain lines.
    pub(crate) panel: bool,
    color: bool,
    /// Lines of the panel on screen now.
    drawn: usize,
    last: Vec<String>,
}

impl View {
    pub(crate) fn new(panel: bool) -> View {
        let color = panel && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        View { panel, color, drawn: 0, last: Vec::new() }
    }

    pub(crate) fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    pub(crate) fn header(&mut self) {
        if self.panel {
            print!("\x1b[?25l"); // hide the cursor while redrawing
        } else {
            println!("one line per second of load; instance changes and scaling decisions as they happen:");
        }
        let _ = io::stdout().flush();
    }

    fn erase(&mut self, out: &mut String) {
        if self.drawn > 0 {
            let _ = write!(out, "\r\x1b[{}A\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    /// A line that stays (scrolls above the panel).
    pub(crate) fn note(&mut self, t: f64, text: &str) {
        self.line(&format!("[+{t:>5.1}s] {text}"));
    }

    pub(crate) fn line(&mut self, text: &str) {
        if self.panel {
            let mut out = String::new();
            self.erase(&mut out);
            let width = term_width();
            // Wrap long notes by hand, so the panel's line count stays exact.
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(width.saturating_sub(1).max(20)) {
                out.extend(chunk);
                out.push('\n');
            }
            let last = std::mem::take(&mut self.last);
            self.render(&mut out, &last);
            self.last = last;
            print!("{out}");
        } else {
            println!("{text}");
        }
        let _ = io::stdout().flush();
    }

    fn render(&mut self, out: &mut String, lines: &[String]) {
        let width = term_width().saturating_sub(1).max(20);
        for l in lines {
            out.push_str(&truncate_visible(l, width));
            out.push('\n');
        }
        self.drawn = lines.len();
    }

    pub(crate) fn draw(&mut self, lines: Vec<String>) {
        let mut out = String::new();
        self.erase(&mut out);
        self.render(&mut out, &lines);
        self.last = lines;
        print!("{out}");
        let _ = io::stdout().flush();
    }

    /// Leave the last panel on screen and the cursor visible.
    pub(crate) fn finish(&mut self) {
        if self.panel {
            // Not print!: this also runs while unwinding.
            let mut out = io::stdout();
            let _ = out.write_all(b"\x1b[?25h");
            let _ = out.flush();
            self.panel = false;
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        self.finish();
    }
}

pub(crate) fn term_width() -> usize {
    // SAFETY: TIOCGWINSZ fills a winsize; a zeroed one is a valid out-parameter.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on stdout's descriptor.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if rc == 0 && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        100
    }
}

/// At most `width` visible characters of `s` (ANSI sequences do not count).
pub(crate) fn truncate_visible(s: &str, width: usize) -> String {
    let mut out = String::new();
    let mut visible = 0;
    let mut chars = s.chars().peekable();
    let mut cut = false;
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            out.push(c);
            for c in chars.by_ref() {
                out.push(c);
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        if visible == width {
            cut = true;
            break;
        }
        out.push(c);
        visible += 1;
    }
    if cut && out.contains('\x1b') {
        out.push_str("\x1b[0m");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_skips_escapes() {
        assert_eq!(truncate_visible("\x1b[32mabcdef\x1b[0m", 3), "\x1b[32mabc\x1b[0m");
        assert_eq!(truncate_visible("abc", 5), "abc");
    }
}
