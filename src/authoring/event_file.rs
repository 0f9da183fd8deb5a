//! Files of events written by hand or exported: JSON lines, one body (even spread over several
//! lines), or a JSON list. One reader for `tripline test`'s events files and `tripline replay`,
//! so that both read the same file the same way; a list is read element by element, so a large
//! export never sits in memory whole.

use serde::de::{Deserializer as _, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;
use std::io::{BufRead, Read};

/// Where an item is, for messages.
#[derive(Debug, Clone, Copy)]
pub enum Position {
    Line(u64),
    Element(u64),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Position::Line(n) => write!(f, "line {n}"),
            Position::Element(n) => write!(f, "item {n}"),
        }
    }
}

/// Calls `each` with the text of every item of the file until it returns `false`. A file
/// starting with `[` is a JSON list read element by element; otherwise JSON lines (each line's
/// text is passed on as it is, even when it is broken), or, when the first line is not JSON by
/// itself, one JSON body spread over several lines. Broken JSON inside a list or a multi-line
/// body ends the read.
pub fn read_items(
    mut reader: impl BufRead,
    mut each: impl FnMut(Position, &[u8]) -> bool,
) -> Result<(), String> {
    let first = loop {
        let buf = reader.fill_buf().map_err(|e| e.to_string())?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let b = buf[i];
                reader.consume(i);
                break Some(b);
            }
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    match first {
        None => Ok(()),
        Some(b'[') => read_list(reader, each),
        Some(_) => {
            let mut line = Vec::new();
            let mut number = 0u64;
            loop {
                line.clear();
                if reader
                    .read_until(b'\n', &mut line)
                    .map_err(|e| e.to_string())?
                    == 0
                {
                    return Ok(());
                }
                number += 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                // A body spread over several lines: read the whole file as JSON values.
                if number == 1 && serde_json::from_slice::<IgnoredAny>(&line).is_err() {
                    break;
                }
                if !each(Position::Line(number), &line) {
                    return Ok(());
                }
            }
            let whole = std::io::Cursor::new(line).chain(reader);
            let mut n = 0;
            for value in serde_json::Deserializer::from_reader(whole).into_iter::<Box<RawValue>>() {
                n += 1;
                match value {
                    Ok(v) => {
                        if !each(Position::Element(n), v.get().as_bytes()) {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(format!("not JSON lines nor JSON: {e}")),
                }
            }
            Ok(())
        }
    }
}

/// Reads a JSON list one element at a time, so a large export never sits in memory whole.
fn read_list(reader: impl Read, each: impl FnMut(Position, &[u8]) -> bool) -> Result<(), String> {
    struct Elements<F>(F);
    impl<'de, F: FnMut(Position, &[u8]) -> bool> Visitor<'de> for Elements<F> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of events")
        }
        fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
            let mut n = 0;
            while let Some(v) = seq.next_element::<Box<RawValue>>()? {
                n += 1;
                if !(self.0)(Position::Element(n), v.get().as_bytes()) {
                    // Stop early: the rest is skipped unread.
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    break;
                }
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_reader(reader);
    de.deserialize_seq(Elements(each))
        .map_err(|e| format!("the JSON list is broken: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(text: &str) -> (Vec<String>, Result<(), String>) {
        let mut seen = Vec::new();
        let result = read_items(text.as_bytes(), |p, text| {
            seen.push(match serde_json::from_slice::<serde_json::Value>(text) {
                Ok(v) => format!("{p}: {v}"),
                Err(_) => format!("{p}: broken"),
            });
            true
        });
        (seen, result)
    }

    #[test]
    fn reads_json_lines_lists_and_pretty_bodies() {
        let (seen, r) = items("{\"a\":1}\n\n{oops\n{\"b\":2}\n");
        assert_eq!(
            seen,
            ["line 1: {\"a\":1}", "line 3: broken", "line 4: {\"b\":2}"]
        );
        assert!(r.is_ok());
        let (seen, _) = items("  [ {\"a\":1},\n {\"b\":2} ]");
        assert_eq!(seen, ["item 1: {\"a\":1}", "item 2: {\"b\":2}"]);
        let (seen, _) = items("{\n  \"a\": 1\n}\n{\"b\": 2}");
        assert_eq!(seen, ["item 1: {\"a\":1}", "item 2: {\"b\":2}"]);
        let (_, r) = items("[ {\"a\":1}, oops ]");
        assert!(r.unwrap_err().starts_with("the JSON list is broken"));
    }
}
