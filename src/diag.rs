//! Problems found in rule and template files, located by file, line and column.
//!
//! Everything that reads a rule or template reports byte spans; this module is the one place that
//! turns a span into `file:line:col`, and the one that decides how a problem is printed.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in one file, in words a rule author can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as the user named it (relative paths stay relative).
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when we can tell.
    pub hint: Option<String>,
    /// The offending line of the file, for printing with a caret.
    pub source_line: String,
}

impl Diagnostic {
    /// A problem at byte `span` of `source`, the text of `file`.
    pub fn at(file: &Path, source: &str, span: Range<usize>, message: impl Into<String>) -> Self {
        let start = span.start.min(source.len());
        let before = &source[..floor_char_boundary(source, start)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Diagnostic::at_line(file, source, line, column, message)
    }

    /// A problem at a known 1-based `line` and `column` of `source` (for parsers that report
    /// positions rather than byte offsets, like Handlebars).
    pub fn at_line(
        file: &Path,
        source: &str,
        line: usize,
        column: usize,
        message: impl Into<String>,
    ) -> Self {
        // Only the text up to the line is looked at, so that the many problems of a long file
        // cost little each.
        let bytes = source.as_bytes();
        let start = match line {
            0 | 1 => Some(0),
            n => memchr::memchr_iter(b'\n', bytes).nth(n - 2).map(|i| i + 1),
        };
        let (line, column, start) = match start {
            Some(start) if start < source.len() => (line, column, start),
            _ if source.is_empty() => (line, column, 0),
            // A parser may point just past the end (an unclosed block): show the last line.
            _ => {
                let text = source.strip_suffix('\n').unwrap_or(source);
                let start = memchr::memrchr(b'\n', text.as_bytes()).map_or(0, |i| i + 1);
                let lines = memchr::memchr_iter(b'\n', text.as_bytes()).count() + 1;
                (lines, line_text(source, start).chars().count() + 1, start)
            }
        };
        Diagnostic {
            file: file.to_path_buf(),
            line,
            column,
            message: message.into(),
            hint: None,
            source_line: line_text(source, start).to_string(),
        }
    }

    /// A problem with a file as a whole (it cannot be read, or it is missing).
    pub fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        Diagnostic::at_line(file, "", 1, 1, message)
    }

    /// Adds a hint on how to fix the problem.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The problem with the offending line and a caret under the column, for terminals. A long
    /// line is cut to a window around the column.
    pub fn render(&self) -> String {
        const WINDOW: usize = 60;
        let mut out = self.to_string();
        if !self.source_line.is_empty() {
            let skip = self.column.saturating_sub(WINDOW + 1);
            let shown: String = self
                .source_line
                .chars()
                .skip(skip)
                .take(2 * WINDOW)
                .collect();
            let more = self.source_line.chars().count() > skip + 2 * WINDOW;
            let (lead, tail) = (
                if skip > 0 { "..." } else { "" },
                if more { "..." } else { "" },
            );
            let gutter = self.line.to_string().len();
            out.push_str(&format!(
                "\n{:gutter$} |\n{} | {lead}{shown}{tail}\n{:gutter$} | {:>col$}",
                "",
                self.line,
                "",
                "^",
                col = self.column - skip + lead.len()
            ));
        }
        out
    }
}

/// `file:line:col: message (hint)` — the form used in logs and at `GET /rules`.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

/// Something a load noticed that does not stop it, such as an entry of the rules folder that is
/// named like a rule file but is a folder or a named pipe (it is skipped). Shown wherever problems
/// are: by `tripline check`, in the log and at `GET /rules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub file: PathBuf,
    pub message: String,
}

/// `file: message`.
impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

/// The line of `source` that starts at byte `start`, without its line break.
fn line_text(source: &str, start: usize) -> &str {
    let rest = &source[start..];
    let line = memchr::memchr(b'\n', rest.as_bytes()).map_or(rest, |i| &rest[..i]);
    line.strip_suffix('\r').unwrap_or(line)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The problems found in one user file, each pointing at its place in it.
pub struct Problems<'a> {
    pub file: &'a Path,
    pub source: &'a str,
    pub list: Vec<Diagnostic>,
}

impl<'a> Problems<'a> {
    pub fn new(file: &'a Path, source: &'a str) -> Problems<'a> {
        Problems {
            file,
            source,
            list: Vec::new(),
        }
    }

    /// Adds a problem at the byte range `span` of the file.
    pub fn add(&mut self, span: Range<usize>, message: impl Into<String>, hint: Option<String>) {
        let mut d = Diagnostic::at(self.file, self.source, span, message);
        d.hint = hint;
        self.list.push(d);
    }
}

/// The closest of `candidates` to `word`, if one is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// A TOML or structure error (serde's words) in a user's words: a rule file, a test file or
/// `tripline.toml`.
pub fn toml_diagnostic(file: &Path, source: &str, e: &toml::de::Error) -> Diagnostic {
    let span = e.span().unwrap_or(0..0);
    let raw = e.message().trim().to_string();
    if let Some((word, expected)) = parse_unknown_field(&raw) {
        let hint = match did_you_mean(&word, expected.iter().map(String::as_str)) {
            Some(close) => format!(
                "did you mean `{close}`? Allowed here: {}",
                expected.join(", ")
            ),
            None => format!("allowed here: {}", expected.join(", ")),
        };
        return Diagnostic::at(file, source, span, format!("unknown key `{word}`")).with_hint(hint);
    }
    if let Some(rest) = raw.strip_prefix("missing field `") {
        let key = rest.trim_end_matches('`');
        return Diagnostic::at(
            file,
            source,
            span,
            format!("the key `{key}` is missing here"),
        );
    }
    let message = raw
        .replace("invalid type: string ", "wrong kind of value: got text ")
        .replace(
            "invalid type: integer ",
            "wrong kind of value: got the number ",
        )
        .replace(
            "invalid type: floating point ",
            "wrong kind of value: got the number ",
        )
        .replace("invalid type: boolean ", "wrong kind of value: got ")
        .replace("invalid type: ", "wrong kind of value: got ")
        .replace("expected i64", "expected a whole number")
        .replace("expected f64", "expected a number")
        .replace("expected a boolean", "expected true or false")
        .replace("expected a string", "expected text in quotes")
        .replace("expected a sequence", "expected a list like [\"a\", \"b\"]");
    let message = match message.find("expected struct ") {
        Some(at) => format!(
            "{}expected a table like {{ key = \"value\" }}",
            &message[..at]
        ),
        None => message,
    };
    Diagnostic::at(file, source, span, message)
}

/// `unknown field `x`, expected one of `a`, `b`` → (x, [a, b]).
fn parse_unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (word, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    Some((word.to_string(), expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters() {
        let src = "a = 1\nnäme = \"x\"\n";
        let at = src.find('=').unwrap();
        let d = Diagnostic::at(Path::new("r.toml"), src, at..at + 1, "m");
        assert_eq!((d.line, d.column), (1, 3));
        let at = src.rfind('=').unwrap();
        let d = Diagnostic::at(Path::new("r.toml"), src, at..at + 1, "m");
        assert_eq!((d.line, d.column), (2, 6));
        assert_eq!(d.source_line, "näme = \"x\"");
        assert_eq!(d.to_string(), "r.toml:2:6: m");
    }

    #[test]
    fn a_position_past_the_end_points_at_the_last_line() {
        for (source, expected) in [
            ("a\nbc\n", (2, 3, "bc")),
            ("a\nbc", (2, 3, "bc")),
            ("a\r\nbc\r\n", (2, 3, "bc")),
            ("\n", (1, 1, "")),
        ] {
            let d = Diagnostic::at_line(Path::new("t.hbs"), source, 9, 4, "m");
            assert_eq!(
                (d.line, d.column, d.source_line.as_str()),
                expected,
                "{source:?}"
            );
        }
        let d = Diagnostic::at_line(Path::new("t.hbs"), "a\r\nbc\r\nd", 2, 2, "m");
        assert_eq!((d.line, d.column, d.source_line.as_str()), (2, 2, "bc"));
        let d = Diagnostic::whole_file(Path::new("t.hbs"), "m");
        assert_eq!((d.line, d.column, d.source_line.as_str()), (1, 1, ""));
    }

    #[test]
    fn render_puts_caret_under_column() {
        let d =
            Diagnostic::at(Path::new("r.toml"), "x = 1\nabc = 2", 8..9, "bad").with_hint("fix it");
        assert_eq!(
            d.render(),
            "r.toml:2:3: bad (fix it)\n  |\n2 | abc = 2\n  |   ^"
        );
    }

    #[test]
    fn render_cuts_long_lines_around_the_column() {
        let line = format!("{}X{}", "a".repeat(500), "b".repeat(500));
        let d = Diagnostic::at(Path::new("r.toml"), &line, 500..501, "bad");
        let rendered = d.render();
        let lines: Vec<&str> = rendered.lines().collect();
        assert!(lines[2].len() < 140, "{}", lines[2]);
        let caret = lines[3].find('^').unwrap();
        assert_eq!(&lines[2][caret..caret + 1], "X");
    }

    #[test]
    fn did_you_mean_finds_close_words_only() {
        let keys = ["at_least", "per"];
        assert_eq!(did_you_mean("at_lest", keys), Some("at_least"));
        assert_eq!(did_you_mean("pre", keys), Some("per"));
        assert_eq!(did_you_mean("template", keys), None);
    }
}
