//! Which output paths a `[jsonl]` rule may write: inside the data folder, never through a link,
//! never over tripline's own files. Checked when rules load, and again before a file is opened.

use std::path::{Component, Path, PathBuf};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::jsonl::files::JsonlFiles;

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
}
