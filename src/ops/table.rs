//! Aligned text tables, the default output of the listing verbs: a header
//! line, then one line per row, each column starting at the same offset on
//! every line (two spaces between columns), so people can read them and
//! `awk`/`column` can still split them. Scripts use `-o json` instead.

/// A table being filled; the first row is the header.
#[derive(Debug, Clone)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

/// Spaces between two columns.
const GAP: usize = 2;

impl Table {
    /// A table with these column names (upper case by convention).
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|name| cell(name)).collect()],
        }
    }

    /// Adds a row. Missing cells are `-`; control characters (a tab or a
    /// newline in a key from etcd) become spaces, so a row stays one line.
    pub fn row<S: AsRef<str>>(&mut self, cells: &[S]) {
        let width = self.rows[0].len();
        let mut row: Vec<String> = cells.iter().take(width).map(|c| cell(c.as_ref())).collect();
        row.resize(width, "-".to_string());
        self.rows.push(row);
    }

    /// The table as text, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let columns = self.rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|column| {
                self.rows
                    .iter()
                    .map(|row| row[column].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (column, text) in row.iter().enumerate() {
                line.push_str(text);
                if column + 1 < columns {
                    let pad = widths[column] - text.chars().count() + GAP;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// One line's worth of `text`: control characters become spaces, and an
/// empty cell is `-` so every column has something to line up on.
fn cell(text: &str) -> String {
    if text.is_empty() {
        return "-".to_string();
    }
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_start_at_the_same_offset_on_every_line() {
        let mut table = Table::new(&["SERVICE", "PORT", "NOTE"]);
        table.row(&["web", "8080", "two words"]);
        table.row(&["a-much-longer-name", "5", ""]);
        table.row(&["tab\there"]);
        assert_eq!(
            table.render(),
            "SERVICE             PORT  NOTE\n\
             web                 8080  two words\n\
             a-much-longer-name  5     -\n\
             tab here            -     -\n"
        );
    }
}
