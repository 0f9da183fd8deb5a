//! Reading the files a user gives tripline (rules, tests and their events, templates, the
//! configuration file, secret files) and listing the folders that hold them.
//!
//! Such a file may be anything a path can name. A named pipe would make a plain read wait
//! forever for a writer, and with it `tripline check`, the start of the service or its reload
//! task; a huge file would stall a load. So a file is opened without waiting (`O_NONBLOCK`), the
//! opened handle is checked to be a regular file, its size is checked against a [`Bound`] for
//! its kind, at most that many bytes are read, and the text must be UTF-8. Each refusal says
//! what is wrong in plain words. A folder listing returns the regular files whose names fit,
//! and a warning for each entry that fits by name but is something else.

use std::fmt;
use std::fs::{FileType, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::diag::Warning;

/// How large a kind of file may be, and what that kind is called in messages. The bounds are
/// far above what a person writes by hand; they only keep one mistaken file from stalling a load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub bytes: u64,
    pub what: &'static str,
}

/// A rule file (`rules/*.toml`). The longest shipped rule is about 1 KiB.
pub const RULE_FILE: Bound = Bound {
    bytes: 1 << 20,
    what: "a rule file",
};

/// A test file (`rules/*.test.toml`).
pub const TEST_FILE: Bound = Bound {
    bytes: 1 << 20,
    what: "a test file",
};

/// The events file a test case names (`file = "..."`): a saved webhook body or JSON lines.
/// The service takes bodies of 1 MiB by default.
pub const TEST_EVENTS_FILE: Bound = Bound {
    bytes: 16 << 20,
    what: "a test's events file",
};

/// An email template (`templates/*.hbs`). A marketing HTML email with inline CSS can be over
/// 100 KiB; mail programs cut off much shorter messages (Gmail at 102 KB).
pub const TEMPLATE: Bound = Bound {
    bytes: 512 << 10,
    what: "a template",
};

/// The configuration file (`tripline.toml`).
pub const CONFIG_FILE: Bound = Bound {
    bytes: 1 << 20,
    what: "the configuration file",
};

/// A file holding a secret (a token or signing secret).
pub const SECRET_FILE: Bound = Bound {
    bytes: 64 << 10,
    what: "a secret file",
};

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The path names something other than a regular file: this says what.
    #[error("{}", .0.describe())]
    NotAFile(NotAFile),
    #[error("this is {}; {} may be at most {}", human_size(*.size), .bound.what, human_size(.bound.bytes))]
    TooLarge { size: u64, bound: Bound },
    #[error(
        "this is not UTF-8 text: line {line} holds bytes that are not (save the file as UTF-8)"
    )]
    NotText { line: usize },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What a path names when it is not a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAFile {
    NamedPipe,
    Folder,
    Socket,
    Device,
    /// A symbolic link whose target does not exist.
    DanglingLink,
    Other,
}

impl NotAFile {
    fn of(t: &FileType) -> NotAFile {
        if t.is_fifo() {
            NotAFile::NamedPipe
        } else if t.is_dir() {
            NotAFile::Folder
        } else if t.is_socket() {
            NotAFile::Socket
        } else if t.is_block_device() || t.is_char_device() {
            NotAFile::Device
        } else {
            NotAFile::Other
        }
    }

    fn describe(self) -> &'static str {
        match self {
            NotAFile::NamedPipe => "this is a named pipe, not a file",
            NotAFile::Folder => "this is a folder, not a file",
            NotAFile::Socket => "this is a socket, not a file",
            NotAFile::Device => "this is a device, not a file",
            NotAFile::DanglingLink => "this is a link to a file that does not exist",
            NotAFile::Other => "this is not a regular file",
        }
    }
}

/// The text of the file at `path`: a regular file of at most `bound.bytes`, in UTF-8.
pub fn read_text(path: &Path, bound: Bound) -> Result<String, ReadError> {
    let bytes = read(path, bound)?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        ReadError::NotText {
            line: memchr::memchr_iter(b'\n', valid).count() + 1,
        }
    })
}

/// The bytes of the file at `path`: a regular file of at most `bound.bytes`.
pub fn read(path: &Path, bound: Bound) -> Result<Vec<u8>, ReadError> {
    // O_NONBLOCK: opening a named pipe for reading would otherwise wait for a writer. It changes
    // nothing for a regular file, the only kind read past the check below.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match not_a_file(path) {
            Some(what) => ReadError::NotAFile(what),
            None => ReadError::Io(e),
        })?;
    // Checked on the opened handle, so the path cannot be swapped for something else meanwhile.
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(ReadError::NotAFile(NotAFile::of(&metadata.file_type())));
    }
    if metadata.len() > bound.bytes {
        return Err(ReadError::TooLarge {
            size: metadata.len(),
            bound,
        });
    }
    // The file may grow after the check: read one byte past the bound to notice.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(bound.bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > bound.bytes {
        return Err(ReadError::TooLarge {
            size: bytes.len() as u64,
            bound,
        });
    }
    Ok(bytes)
}

/// What `path` names if opening it failed because it is not a regular file (a socket cannot be
/// opened; a link to nothing looks missing).
fn not_a_file(path: &Path) -> Option<NotAFile> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Some(NotAFile::of(&m.file_type())),
        Ok(_) => None,
        Err(_) => std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.file_type().is_symlink())
            .then_some(NotAFile::DanglingLink),
    }
}

/// The entries of a folder that a load reads, found by [`list`].
#[derive(Debug, Default)]
pub struct Listing {
    /// The regular files (or links to them), sorted by name.
    pub files: Vec<PathBuf>,
    /// One for each entry whose name fits but that is not a file: it is skipped.
    pub warnings: Vec<Warning>,
}

/// The entries of `dir` whose names `keep` accepts, skipping hidden ones (editors' locks and
/// swap files). Links are followed; an entry that cannot be looked at is listed as a file, so
/// that reading it reports why.
pub fn list(dir: &Path, keep: impl Fn(&str) -> bool) -> io::Result<Listing> {
    let mut listing = Listing::default();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with('.') || !keep(name) {
            continue;
        }
        let what = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => None,
            Ok(m) => Some(NotAFile::of(&m.file_type())),
            Err(_) => not_a_file(&path),
        };
        match what {
            None => listing.files.push(path),
            Some(what) => listing.warnings.push(Warning {
                message: format!("skipped: {}", what.describe()),
                file: path,
            }),
        }
    }
    listing.files.sort();
    listing.warnings.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(listing)
}

/// A size for people: `900 bytes`, `512 KiB`, `1.3 MiB`.
fn human_size(bytes: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    match bytes {
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= MIB => format!("{:.1} MiB", b as f64 / MIB as f64),
        b if b >= KIB && b % KIB == 0 => format!("{} KiB", b / KIB),
        b if b >= KIB => format!("{:.1} KiB", b as f64 / KIB as f64),
        b => format!("{b} bytes"),
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", human_size(self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    const SMALL: Bound = Bound {
        bytes: 10,
        what: "a small file",
    };

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    #[test]
    fn reads_a_regular_file_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "héllo").unwrap();
        assert_eq!(read_text(&path, SMALL).unwrap(), "héllo");
    }

    #[test]
    fn a_named_pipe_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.text.hbs");
        mkfifo(&path);
        let e = read_text(&path, SMALL).unwrap_err();
        assert_eq!(e.to_string(), "this is a named pipe, not a file");
    }

    #[test]
    fn a_folder_and_a_link_to_nothing_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("d.toml");
        std::fs::create_dir(&folder).unwrap();
        assert_eq!(
            read_text(&folder, SMALL).unwrap_err().to_string(),
            "this is a folder, not a file"
        );
        let link = dir.path().join("l.toml");
        std::os::unix::fs::symlink(dir.path().join("gone"), &link).unwrap();
        assert_eq!(
            read_text(&link, SMALL).unwrap_err().to_string(),
            "this is a link to a file that does not exist"
        );
        let missing = read_text(&dir.path().join("missing"), SMALL).unwrap_err();
        assert!(matches!(missing, ReadError::Io(_)), "{missing:?}");
    }

    #[test]
    fn a_file_over_its_bound_is_refused_with_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.hbs");
        std::fs::write(&path, "x".repeat(11)).unwrap();
        assert_eq!(
            read_text(&path, SMALL).unwrap_err().to_string(),
            "this is 11 bytes; a small file may be at most 10 bytes"
        );
        std::fs::write(&path, "x".repeat(10)).unwrap();
        assert!(read_text(&path, SMALL).is_ok());
        std::fs::write(&path, vec![b'x'; (TEMPLATE.bytes + 1) as usize]).unwrap();
        assert_eq!(
            read_text(&path, TEMPLATE).unwrap_err().to_string(),
            "this is 512.0 KiB; a template may be at most 512 KiB"
        );
    }

    #[test]
    fn text_that_is_not_utf8_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.toml");
        std::fs::write(&path, b"a\nb\nna\xefve\n").unwrap();
        assert_eq!(
            read_text(&path, SMALL).unwrap_err().to_string(),
            "this is not UTF-8 text: line 3 holds bytes that are not (save the file as UTF-8)"
        );
        assert_eq!(
            read(&path, SMALL).unwrap().len(),
            10,
            "bytes need not be text"
        );
    }

    #[test]
    fn a_listing_keeps_files_and_warns_about_what_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.toml"), "").unwrap();
        std::fs::write(dir.path().join("a.toml"), "").unwrap();
        std::fs::write(dir.path().join(".a.toml.swp"), "").unwrap();
        std::fs::write(dir.path().join("notes.md"), "").unwrap();
        std::fs::create_dir(dir.path().join("old.toml")).unwrap();
        mkfifo(&dir.path().join("pipe.toml"));
        std::os::unix::fs::symlink(dir.path().join("a.toml"), dir.path().join("c.toml")).unwrap();
        let listing = list(dir.path(), |n| n.ends_with(".toml")).unwrap();
        let names: Vec<_> = listing
            .files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.toml", "b.toml", "c.toml"]);
        let warnings: Vec<String> = listing
            .warnings
            .iter()
            .map(|w| {
                format!(
                    "{}: {}",
                    w.file.file_name().unwrap().to_str().unwrap(),
                    w.message
                )
            })
            .collect();
        assert_eq!(
            warnings,
            [
                "old.toml: skipped: this is a folder, not a file",
                "pipe.toml: skipped: this is a named pipe, not a file",
            ]
        );
    }
}
