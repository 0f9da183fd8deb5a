//! The open output files, appended to durably by the committer thread.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::path::check_output_path;

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
/// The committer opens them to check that its rules' files can be written; the appender
/// (`pipeline/appender.rs`), with its own, writes them.
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

    /// The data folder the files are in.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
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

    /// At most `max` bytes of `file` from `offset` on.
    pub fn read_from(&mut self, file: &Path, offset: u64, max: u64) -> io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = File::open(self.data_dir.join(file))?;
        f.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::new();
        f.take(max).read_to_end(&mut bytes)?;
        Ok(bytes)
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
    use crate::actions::jsonl::path::check_output_path;

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
