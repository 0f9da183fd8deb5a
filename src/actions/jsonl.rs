//! The `[jsonl]` action: project an event onto a whitelist of fields and append it as one line
//! of a JSONL file in the data directory.
//!
//! Only the listed fields are written, under the names the rule gives them, so nothing else from
//! the event can leak into the file. Only the committer thread writes, a batch of whole lines at
//! a time, synced before the batch is acknowledged; files stay open across reloads.

use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use crate::event::Event;
use crate::rules::path::FieldPath;

/// A compiled `[jsonl]` table.
#[derive(Debug, Clone)]
pub struct JsonlAction {
    /// The output file, relative to the data directory (checked to stay inside it).
    pub file: PathBuf,
    /// The output keys in the order the rule lists them.
    pub fields: Vec<OutputField>,
}

/// One output key.
#[derive(Debug, Clone)]
pub struct OutputField {
    pub key: String,
    pub from: FieldPath,
    pub trim: bool,
    pub max_chars: Option<usize>,
    /// Written when the event does not have the field (JSON null unless the rule says otherwise).
    pub default: Value,
}

impl JsonlAction {
    /// The line this event becomes, newline included.
    pub fn project(&self, event: &Event) -> String {
        let mut out = Map::with_capacity(self.fields.len());
        for field in &self.fields {
            let value = match field.from.lookup(event) {
                Some(Value::String(s)) => Value::String(field.shape_text(s)),
                Some(other) => other.clone(),
                None => field.default.clone(),
            };
            out.insert(field.key.clone(), value);
        }
        let mut line = Value::Object(out).to_string();
        line.push('\n');
        line
    }
}

impl OutputField {
    /// Trims, then cuts to `max_chars` characters (Unicode scalar values; never half of one).
    fn shape_text(&self, s: &str) -> String {
        let s = if self.trim { s.trim() } else { s };
        match self.max_chars.and_then(|max| s.char_indices().nth(max)) {
            Some((cut, _)) => s[..cut].to_string(),
            None => s.to_string(),
        }
    }
}

/// Why an output path is refused when the rule loads.
#[derive(Debug, PartialEq, Eq)]
pub struct UnsafePath(pub String);

/// Checks a rule's output path: relative, no `..`, and no symbolic link along the way that
/// leads out of `data_dir`. Returns the path with `.` parts removed.
pub fn check_output_path(data_dir: &Path, file: &str) -> Result<PathBuf, UnsafePath> {
    let path = Path::new(file);
    if file.trim().is_empty() {
        return Err(UnsafePath("the file name is empty".into()));
    }
    let mut clean = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => clean.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(UnsafePath(
                    "`..` is not allowed: files stay inside the data folder".into(),
                ));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnsafePath(
                    "the file must be relative to the data folder, not an absolute path".into(),
                ));
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(UnsafePath("the file name is empty".into()));
    }
    let first = clean.components().next().map(|c| c.as_os_str().to_owned());
    if first.is_some_and(|f| f == "tripline.redb" || f == "outbox") {
        return Err(UnsafePath(
            "`tripline.redb` and `outbox/` are tripline's own: choose another name".into(),
        ));
    }
    if let Ok(root) = data_dir.canonicalize() {
        let mut at = root.clone();
        for part in clean.components() {
            at.push(part);
            match at.symlink_metadata() {
                Ok(meta) if meta.file_type().is_symlink() => match at.canonicalize() {
                    Ok(target) if target.starts_with(&root) => {}
                    _ => {
                        return Err(UnsafePath(format!(
                            "`{}` is a link that leads outside the data folder",
                            at.strip_prefix(&root).unwrap_or(&at).display()
                        )));
                    }
                },
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if at.is_dir() {
            return Err(UnsafePath(format!("`{file}` is a folder, not a file")));
        }
    }
    Ok(clean)
}

/// Open JSONL files, shared by every rule set so that a reload never reopens or loses a file.
/// Used by the committer thread only.
pub struct JsonlFiles {
    data_dir: PathBuf,
    files: HashMap<PathBuf, File>,
}

impl JsonlFiles {
    /// Files under `data_dir`.
    pub fn new(data_dir: &Path) -> JsonlFiles {
        JsonlFiles {
            data_dir: data_dir.to_path_buf(),
            files: HashMap::new(),
        }
    }

    /// The current length of `file` (0 if it does not exist yet).
    pub fn len(&self, file: &Path) -> io::Result<u64> {
        match std::fs::metadata(self.data_dir.join(file)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Appends `text` (whole lines) to `file` and syncs it to disk. Returns the length before and
    /// after. If anything fails, what was written is cut off again, so no partial line stays.
    pub fn append_durably(&mut self, file: &Path, text: &str) -> io::Result<(u64, u64)> {
        let f = self.open(file)?;
        let before = f.metadata()?.len();
        let result = f.write_all(text.as_bytes()).and_then(|()| f.sync_data());
        match result {
            Ok(()) => Ok((before, f.metadata()?.len())),
            Err(e) => {
                let _ = f.set_len(before);
                Err(e)
            }
        }
    }

    /// Cuts `file` back to `len` bytes (lines past it were never acknowledged).
    pub fn truncate(&mut self, file: &Path, len: u64) -> io::Result<()> {
        let f = self.open(file)?;
        f.set_len(len)?;
        f.sync_data()
    }

    fn open(&mut self, file: &Path) -> io::Result<&mut File> {
        if !self.files.contains_key(file) {
            // The rule was checked when it loaded; check again in case a link appeared since.
            let text = file.to_string_lossy();
            check_output_path(&self.data_dir, &text)
                .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.0))?;
            let path = self.data_dir.join(file);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut options = OpenOptions::new();
            options.append(true).create(true);
            // Refuse to open the final path component if it is a symbolic link.
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.custom_flags(libc::O_NOFOLLOW);
            }
            self.files.insert(file.to_path_buf(), options.open(&path)?);
        }
        Ok(self.files.get_mut(file).expect("inserted above"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(key: &str, from: &str, trim: bool, max_chars: Option<usize>) -> OutputField {
        OutputField {
            key: key.into(),
            from: FieldPath::parse(from).unwrap(),
            trim,
            max_chars,
            default: Value::Null,
        }
    }

    #[test]
    fn projects_only_listed_fields_in_order() {
        let event = Event {
            name: json!("x"),
            uuid: Value::Null,
            distinct_id: json!("d"),
            timestamp: json!("2025-01-01T00:00:00Z"),
            time: "2025-01-01T00:00:00Z".parse().unwrap(),
            properties: json!({"r": "  héllo wörld  ", "secret": "s"}),
            person_properties: json!({}),
            source: Value::Null,
        };
        let mut with_default = field("gone", "properties.nope", false, None);
        with_default.default = json!("n/a");
        let action = JsonlAction {
            file: "x.jsonl".into(),
            fields: vec![
                field("who", "distinct_id", false, None),
                field("reason", "properties.r", true, Some(7)),
                field("missing", "properties.nope", false, None),
                with_default,
            ],
        };
        assert_eq!(
            action.project(&event),
            "{\"who\":\"d\",\"reason\":\"héllo w\",\"missing\":null,\"gone\":\"n/a\"}\n"
        );
    }

    #[test]
    fn truncation_counts_characters_not_bytes() {
        let f = field("k", "event", false, Some(3));
        assert_eq!(f.shape_text("🏠🛏️é"), "🏠🛏\u{fe0f}");
        assert_eq!(f.shape_text("ab"), "ab");
    }

    #[test]
    fn output_paths_stay_inside_the_data_folder() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        assert_eq!(
            check_output_path(&data, "./a/b.jsonl").unwrap(),
            PathBuf::from("a/b.jsonl")
        );
        assert!(check_output_path(&data, "../x.jsonl").is_err());
        assert!(check_output_path(&data, "a/../../x.jsonl").is_err());
        assert!(check_output_path(&data, "/etc/passwd").is_err());
        assert!(check_output_path(&data, "").is_err());
        assert!(check_output_path(&data, "tripline.redb").is_err());
        assert!(check_output_path(&data, "./outbox/1.eml").is_err());
        std::os::unix::fs::symlink(dir.path(), data.join("out")).unwrap();
        let e = check_output_path(&data, "out/x.jsonl").unwrap_err();
        assert!(e.0.contains("outside the data folder"), "{e:?}");
        std::fs::create_dir(data.join("inside")).unwrap();
        std::os::unix::fs::symlink(data.join("inside"), data.join("ok")).unwrap();
        assert!(check_output_path(&data, "ok/x.jsonl").is_ok());
    }
}
