//! A results table: aligned text for the terminal, Markdown for the file.

/// A header row and rows of cells; every row as wide as the header.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(head: &[&str]) -> Table {
        Table { head: head.iter().map(|s| (*s).to_owned()).collect(), rows: Vec::new() }
    }

    /// A row; missing cells are left empty, extra ones are an error of the
    /// caller's.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        assert!(
            cells.len() <= self.head.len(),
            "a row of {} cells in a table of {} columns",
            cells.len(),
            self.head.len()
        );
        let mut cells = cells;
        cells.resize(self.head.len(), String::new());
        self.rows.push(cells);
    }

    fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in w.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        w
    }

    /// Columns padded to their widest cell, a rule under the header.
    pub(crate) fn text(&self) -> String {
        let w = self.widths();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells.iter().zip(&w).map(|(c, w)| format!("{c:<w$}")).collect();
            padded.join("  ").trim_end().to_owned() + "\n"
        };
        let rule: Vec<String> = w.iter().map(|w| "-".repeat(*w)).collect();
        let mut out = line(&self.head) + &line(&rule);
        for r in &self.rows {
            out += &line(r);
        }
        out
    }

    /// A GitHub-flavoured Markdown table; `|` in a cell is escaped.
    pub(crate) fn markdown(&self) -> String {
        let w = self.widths();
        let line = |cells: &[String]| {
            let cells: Vec<String> =
                cells.iter().zip(&w).map(|(c, w)| format!("{:<w$}", c.replace('|', "\\|"))).collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let rule: Vec<String> = w.iter().map(|w| "-".repeat(*w)).collect();
        let mut out = line(&self.head) + &line(&rule);
        for r in &self.rows {
            out += &line(r);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut t = Table::new(&["Configuration", "Theirs", "Ours"]);
        t.row(vec!["1 VM (30 users)".into(), "62.5%".into(), "48.10%".into()]);
        t.row(vec!["a|b".into(), "100%".into()]);
        t
    }

    #[test]
    fn text_tables_are_aligned_under_a_rule() {
        assert_eq!(
            sample().text(),
            "Configuration    Theirs  Ours\n\
             ---------------  ------  ------\n\
             1 VM (30 users)  62.5%   48.10%\n\
             a|b              100%\n"
        );
    }

    #[test]
    fn markdown_tables_escape_bars_and_fill_short_rows() {
        assert_eq!(
            sample().markdown(),
            "| Configuration   | Theirs | Ours   |\n\
             | --------------- | ------ | ------ |\n\
             | 1 VM (30 users) | 62.5%  | 48.10% |\n\
             | a\\|b            | 100%   |        |\n"
        );
    }

    #[test]
    #[should_panic(expected = "a row of 4 cells in a table of 3 columns")]
    fn a_row_too_wide_is_refused() {
        sample().row(vec![String::new(); 4]);
    }
}
