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

use crate::ingest::event::Event;
use crate::ingest::path::FieldPath;

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

/// The longest name of one file or folder most file systems accept, in bytes.
const MAX_NAME_BYTES: usize = 255;
/// The longest output path accepted, in bytes, relative to the data folder: well under the
/// operating system's limit for the whole path (4096 on Linux), leaving room for the data folder.
const MAX_PATH_BYTES: usize = 1024;

/// Whether `name` (the first part of an output path) is one tripline keeps for itself in the data
/// folder: the database, the email folder, and every name starting with `.tripline` (the
/// readiness probe's files, for one).
pub fn is_reserved(name: &std::ffi::OsStr) -> bool {
    name == crate::store::redb::FILE_NAME
        || name == "outbox"
        || name.to_string_lossy().starts_with(".tripline")
}

/// Checks a rule's output path in full: as written ([`output_path`]) and against what is in the
/// data folder now ([`output_place`]). Returns the path with `.` parts removed. What this accepts,
/// the service can create and append to.
pub fn check_output_path(data_dir: &Path, file: &str) -> Result<PathBuf, UnsafePath> {
    let clean = output_path(file)?;
    output_place(data_dir, &clean, file)?;
    Ok(clean)
}

/// Checks a rule's output path as written: relative, no `..`, short enough, no NUL, not one of
/// tripline's own names. Returns it with `.` parts removed.
pub fn output_path(file: &str) -> Result<PathBuf, UnsafePath> {
    if file.trim().is_empty() {
        return Err(UnsafePath("the file name is empty".into()));
    }
    if file.contains('\0') {
        return Err(UnsafePath(
            "the file name holds a NUL character, which no file name can have".into(),
        ));
    }
    if file.len() > MAX_PATH_BYTES {
        return Err(UnsafePath(format!(
            "the path is {} bytes long; at most {MAX_PATH_BYTES} are allowed",
            file.len()
        )));
    }
    let path = Path::new(file);
    let mut clean = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) if p.len() > MAX_NAME_BYTES => {
                return Err(UnsafePath(format!(
                    "the name `{}...` is {} bytes long; file systems allow at most {MAX_NAME_BYTES} per file or folder name",
                    p.to_string_lossy().chars().take(20).collect::<String>(),
                    p.len()
                )));
            }
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
    if clean
        .components()
        .next()
        .is_some_and(|first| is_reserved(first.as_os_str()))
    {
        return Err(UnsafePath(format!(
            "`{}`, `outbox/` and names starting with `.tripline` are tripline's own: choose another name",
            crate::store::redb::FILE_NAME
        )));
    }
    Ok(clean)
}

/// Checks `clean` (as [`output_path`] returned it from `file`) against what is in `data_dir`
/// now: no part of it is a file where a folder must be, the file itself is not a folder, a named
/// pipe, a link or anything else than a regular file, and no link along the way leads out of the
/// data folder. What is in the folder can change while the service runs: a rule whose file fails
/// this then fails on its own (see the committer).
pub fn output_place(data_dir: &Path, clean: &Path, file: &str) -> Result<(), UnsafePath> {
    if let Ok(root) = data_dir.canonicalize() {
        let mut at = root.clone();
        let parts: Vec<_> = clean.components().collect();
        for (i, part) in parts.iter().enumerate() {
            at.push(part);
            let shown = || at.strip_prefix(&root).unwrap_or(&at).display().to_string();
            let last = i + 1 == parts.len();
            match at.symlink_metadata() {
                Ok(meta) if meta.file_type().is_symlink() => match at.canonicalize() {
                    // Lines are only appended to the file itself (a link could be changed to
                    // point anywhere meanwhile), so the file must not be a link.
                    Ok(_) if last => {
                        return Err(UnsafePath(format!(
                            "`{}` is a link: name the file it points to instead",
                            shown()
                        )));
                    }
                    Ok(target) if target.starts_with(&root) => {}
                    Ok(_) => {
                        return Err(UnsafePath(format!(
                            "`{}` is a link that leads outside the data folder",
                            shown()
                        )));
                    }
                    Err(_) => {
                        return Err(UnsafePath(format!(
                            "`{}` is a link to something that does not exist",
                            shown()
                        )));
                    }
                },
                Ok(_) => {}
                Err(_) => break,
            }
            // Following a link inside the folder, what is there must fit its place.
            match (at.metadata(), last) {
                (Ok(meta), false) if !meta.is_dir() => {
                    return Err(UnsafePath(format!(
                        "`{}` is a file, so it cannot hold `{file}`: choose another folder",
                        shown()
                    )));
                }
                (Ok(meta), true) if meta.is_dir() => {
                    return Err(UnsafePath(format!("`{file}` is a folder, not a file")));
                }
                (Ok(meta), true) if !meta.is_file() => {
                    return Err(UnsafePath(format!(
                        "`{file}` exists and is not a regular file (a named pipe or a device?): lines can only be appended to a file"
                    )));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Whether an error opening an output file is the rule's own (its path cannot be a file here),
/// as opposed to the machine's (a full or failing disk, no file descriptors or memory left),
/// which is worth retrying: those fail the batch with a 503 instead.
pub fn is_path_error(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    let machine = matches!(
        e.kind(),
        StorageFull | QuotaExceeded | Interrupted | WouldBlock | TimedOut | OutOfMemory
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOSPC | libc::EDQUOT)
    );
    !machine
}

/// Open JSONL files, shared by every rule set so that a reload never reopens or loses a file.
/// Used by the committer thread only.
pub struct JsonlFiles {
    data_dir: PathBuf,
    files: HashMap<PathBuf, File>,
    /// The name each open file was opened by, by its device and inode: two names for one file
    /// (through a link, or a file system that ignores case) would each keep their own length
    /// and cut off the other's lines.
    names: HashMap<(u64, u64), PathBuf>,
}

impl JsonlFiles {
    /// Files under `data_dir`.
    pub fn new(data_dir: &Path) -> JsonlFiles {
        JsonlFiles {
            data_dir: data_dir.to_path_buf(),
            files: HashMap::new(),
            names: HashMap::new(),
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
    /// after. If anything fails, what was written is cut off again, so no partial line stays; if
    /// even that fails, the error says so (the next append compares the file with its recorded
    /// length first, so such lines are still never kept).
    pub fn append_durably(&mut self, file: &Path, text: &str) -> io::Result<(u64, u64)> {
        let f = self.open(file)?;
        let before = f.metadata()?.len();
        let result = f.write_all(text.as_bytes()).and_then(|()| f.sync_data());
        match result {
            Ok(()) => Ok((before, f.metadata()?.len())),
            Err(e) => match f.set_len(before) {
                Ok(()) => Err(e),
                Err(cut) => Err(io::Error::new(
                    e.kind(),
                    format!("{e}; and the lines written could not be cut off ({cut})"),
                )),
            },
        }
    }

    /// Cuts `file` back to `len` bytes (lines past it were never acknowledged).
    pub fn truncate(&mut self, file: &Path, len: u64) -> io::Result<()> {
        let f = self.open(file)?;
        f.set_len(len)?;
        f.sync_data()
    }

    /// Opens `file` for appending, creating it (and its folders) if needed. A new file's folder
    /// entries are synced, so that a crash cannot lose the file once lines in it are
    /// acknowledged.
    pub fn open(&mut self, file: &Path) -> io::Result<&mut File> {
        if !self.files.contains_key(file) {
            // The rule was checked when it loaded; check again in case a link appeared since.
            let text = file.to_string_lossy();
            check_output_path(&self.data_dir, &text)
                .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.0))?;
            let path = self.data_dir.join(file);
            let existed = path.exists();
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut options = OpenOptions::new();
            options.append(true).create(true);
            // Refuse to open the final path component if it is a symbolic link, and never wait
            // on a named pipe put there since the check.
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
            }
            let opened = options.open(&path)?;
            let meta = opened.metadata()?;
            if !meta.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file: lines can only be appended to a file",
                ));
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                let inode = (meta.dev(), meta.ino());
                if let Some(other) = self.names.get(&inode) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "it is the same file as `{}` (through a link): rules writing to one file must name it the same way",
                            other.display()
                        ),
                    ));
                }
                self.names.insert(inode, file.to_path_buf());
            }
            if !existed {
                // Every folder from the new file up to the data folder: some may be new too.
                for dir in path.ancestors().skip(1) {
                    File::open(dir)?.sync_all()?;
                    if dir == self.data_dir {
                        break;
                    }
                }
            }
            self.files.insert(file.to_path_buf(), opened);
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
        assert!(check_output_path(&data, ".tripline-ready-check").is_err());
        std::os::unix::fs::symlink(dir.path(), data.join("out")).unwrap();
        let e = check_output_path(&data, "out/x.jsonl").unwrap_err();
        assert!(e.0.contains("outside the data folder"), "{e:?}");
        std::fs::create_dir(data.join("inside")).unwrap();
        std::os::unix::fs::symlink(data.join("inside"), data.join("ok")).unwrap();
        assert!(check_output_path(&data, "ok/x.jsonl").is_ok());
    }

    #[test]
    fn paths_the_service_cannot_write_are_refused_when_the_rule_loads() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let refused = |file: &str| check_output_path(data, file).unwrap_err().0;
        assert!(refused(&"a".repeat(300)).contains("at most 255"));
        assert!(refused(&format!("{}/x.jsonl", "d/".repeat(600))).contains("at most 1024"));
        assert!(refused("a\0b.jsonl").contains("NUL"));
        std::fs::write(data.join("training_data.jsonl"), "").unwrap();
        assert!(refused("training_data.jsonl/x.jsonl").contains("is a file"));
        std::fs::create_dir(data.join("folder.jsonl")).unwrap();
        assert!(refused("folder.jsonl").contains("is a folder"));
        let fifo = std::ffi::CString::new(data.join("pipe.jsonl").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(refused("pipe.jsonl").contains("not a regular file"));
        // What is accepted opens, folders included.
        let mut files = JsonlFiles::new(data);
        let ok = check_output_path(data, "new/deeper/x.jsonl").unwrap();
        files.append_durably(&ok, "{}\n").unwrap();
        assert_eq!(std::fs::read_to_string(data.join(&ok)).unwrap(), "{}\n");
    }

    #[test]
    fn one_file_reached_by_two_names_is_refused_for_the_second() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        std::fs::create_dir(data.join("d1")).unwrap();
        std::os::unix::fs::symlink(data.join("d1"), data.join("d2")).unwrap();
        let mut files = JsonlFiles::new(data);
        files
            .append_durably(Path::new("d1/x.jsonl"), "a\n")
            .unwrap();
        let e = files.open(Path::new("d2/x.jsonl")).unwrap_err();
        assert!(e.to_string().contains("same file as `d1/x.jsonl`"), "{e}");
        assert!(is_path_error(&e));
        // A link as the file itself is refused when the rule loads.
        std::os::unix::fs::symlink(data.join("d1/x.jsonl"), data.join("alias.jsonl")).unwrap();
        let refused = check_output_path(data, "alias.jsonl").unwrap_err().0;
        assert!(refused.contains("is a link"), "{refused}");
        std::os::unix::fs::symlink(data.join("nowhere"), data.join("dangling")).unwrap();
        let refused = check_output_path(data, "dangling/x.jsonl").unwrap_err().0;
        assert!(refused.contains("does not exist"), "{refused}");
    }

    #[test]
    fn only_a_full_or_failing_disk_is_not_the_paths_fault() {
        use std::io::ErrorKind;
        assert!(!is_path_error(&io::Error::from(ErrorKind::StorageFull)));
        assert!(!is_path_error(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(!is_path_error(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!is_path_error(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(is_path_error(&io::Error::from_raw_os_error(
            libc::ENAMETOOLONG
        )));
        assert!(is_path_error(&io::Error::from_raw_os_error(libc::ENOTDIR)));
        assert!(is_path_error(&io::Error::from(ErrorKind::PermissionDenied)));
    }
}
