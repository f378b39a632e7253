//! A deterministic writer for cpio "newc" archives (the initramfs format).
//!
//! The Linux initramfs unpacker reads the SVR4 "newc" format (magic `070701`):
//! a 110-byte ASCII-hex header, the NUL-terminated name padded to 4 bytes, the
//! data padded to 4 bytes, and a final `TRAILER!!!` entry. This writer sorts the
//! entries by path, gives every entry uid/gid 0 and a fixed mtime, and numbers
//! inodes in order, so the same entries always give the same bytes.
//!
//! Written by hand rather than with a crate: the format is a few dozen lines, and
//! the crates on crates.io either copy host metadata (mtimes, inode numbers) into
//! the archive or do not expose the device numbers a `/dev/console` node needs.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// The newc magic number.
const MAGIC: &str = "070701";
/// The name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Errors from building an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("invalid archive path {0:?}: paths are relative, without `..`, empty or NUL parts")]
    BadPath(String),
    #[error("duplicate archive path {0:?}")]
    Duplicate(String),
    #[error("entry {0:?} is larger than the newc format allows (4 GiB)")]
    TooLarge(String),
    #[error("writing the archive: {0}")]
    Io(#[from] io::Error),
}

/// What one archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// One entry: its kind and permission bits (the file-type bits come from the kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub mode: u32,
}

/// An archive being assembled. Entries are kept sorted by path.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
    mtime: u32,
}

impl Archive {
    /// An empty archive whose entries all carry `mtime` (seconds since the epoch).
    pub fn new(mtime: u32) -> Self {
        Self {
            entries: BTreeMap::new(),
            mtime,
        }
    }

    fn add(&mut self, path: &str, kind: EntryKind, mode: u32) -> Result<(), CpioError> {
        let path = check_path(path)?;
        if self.entries.contains_key(&path) {
            return Err(CpioError::Duplicate(path));
        }
        self.entries.insert(
            path,
            Entry {
                kind,
                mode: mode & 0o7777,
            },
        );
        Ok(())
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        self.add(path, EntryKind::Dir, mode)
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), CpioError> {
        if u32::try_from(data.len()).is_err() {
            return Err(CpioError::TooLarge(path.to_string()));
        }
        self.add(path, EntryKind::File(data), mode)
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.add(path, EntryKind::Symlink(target.to_string()), 0o777)
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.add(path, EntryKind::CharDev { major, minor }, mode)
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), e))
    }

    /// Writes the archive in newc format, ending with the trailer.
    pub fn write_to<W: Write>(&self, mut out: W) -> Result<(), CpioError> {
        let mut offset = 0usize;
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (type_bits, data, rdev, nlink): (u32, &[u8], (u32, u32), u32) = match &entry.kind {
                EntryKind::Dir => (S_IFDIR, &[], (0, 0), 2),
                EntryKind::File(d) => (S_IFREG, d.as_slice(), (0, 0), 1),
                EntryKind::Symlink(t) => (S_IFLNK, t.as_bytes(), (0, 0), 1),
                EntryKind::CharDev { major, minor } => (S_IFCHR, &[], (*major, *minor), 1),
            };
            let header = Header {
                // Inode 0 is avoided: some unpackers treat it as "no inode".
                ino: u32::try_from(ino + 1).map_err(|_| CpioError::TooLarge(path.clone()))?,
                mode: type_bits | entry.mode,
                nlink,
                mtime: self.mtime,
                filesize: u32::try_from(data.len())
                    .map_err(|_| CpioError::TooLarge(path.clone()))?,
                rdevmajor: rdev.0,
                rdevminor: rdev.1,
            };
            offset += write_entry(&mut out, offset, path, &header, data)?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            mtime: 0,
            filesize: 0,
            rdevmajor: 0,
            rdevminor: 0,
        };
        write_entry(&mut out, offset, TRAILER, &trailer, &[])?;
        Ok(())
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CpioError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }
}

/// The header fields that vary between entries; the rest are zero.
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

/// Writes one entry at stream offset `offset`; returns the bytes written.
fn write_entry<W: Write>(
    out: &mut W,
    offset: usize,
    name: &str,
    h: &Header,
    data: &[u8],
) -> Result<usize, CpioError> {
    let namesize = name.len() + 1;
    let fields = [
        h.ino,
        h.mode,
        0, // uid
        0, // gid
        h.nlink,
        h.mtime,
        h.filesize,
        0, // devmajor
        0, // devminor
        h.rdevmajor,
        h.rdevminor,
        namesize as u32,
        0, // check
    ];
    let mut buf = String::with_capacity(110);
    buf.push_str(MAGIC);
    for f in fields {
        buf.push_str(&format!("{f:08x}"));
    }
    let mut written = 0;
    out.write_all(buf.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    written += buf.len() + namesize;
    let pad = padding(offset + written);
    out.write_all(&[0u8; 3][..pad])?;
    written += pad;
    out.write_all(data)?;
    written += data.len();
    let pad = padding(offset + written);
    out.write_all(&[0u8; 3][..pad])?;
    written += pad;
    Ok(written)
}

/// Bytes needed to bring `pos` to a multiple of 4.
fn padding(pos: usize) -> usize {
    (4 - pos % 4) % 4
}

/// Normalises an archive path: no leading `/`, no empty, `.` or `..` parts.
fn check_path(path: &str) -> Result<String, CpioError> {
    let trimmed = path.trim_start_matches('/');
    let ok = !trimmed.is_empty()
        && !trimmed.contains('\0')
        && trimmed
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(trimmed.to_string())
    } else {
        Err(CpioError::BadPath(path.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Archive {
        let mut a = Archive::new(0);
        a.dir("bin", 0o755).unwrap();
        a.file("bin/toybox", 0o755, b"\x7fELF not really".to_vec())
            .unwrap();
        a.symlink("bin/sh", "toybox").unwrap();
        a.dir("dev", 0o755).unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        a.file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        a.file("empty", 0o644, Vec::new()).unwrap();
        a
    }

    /// Reads the archive back with the `cpio` crate's newc reader, which shares
    /// no code with the writer, and checks every field that matters.
    #[test]
    fn independent_reader_reads_back_every_entry() {
        let bytes = sample().to_bytes().unwrap();
        let mut cursor = std::io::Cursor::new(bytes);
        let mut seen = Vec::new();
        loop {
            let mut reader = newc::NewcReader::new(cursor).unwrap();
            let e = reader.entry();
            if e.is_trailer() {
                break;
            }
            let name = e.name().to_string();
            let (mode, uid, gid, mtime, rmaj, rmin) = (
                e.mode(),
                e.uid(),
                e.gid(),
                e.mtime(),
                e.rdev_major(),
                e.rdev_minor(),
            );
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut data).unwrap();
            seen.push((name, mode, uid, gid, mtime, rmaj, rmin, data));
            cursor = reader.finish().unwrap();
        }
        let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "bin/toybox",
                "dev",
                "dev/console",
                "empty",
                "init"
            ]
        );
        for s in &seen {
            assert_eq!((s.2, s.3, s.4), (0, 0, 0), "uid/gid/mtime of {}", s.0);
        }
        let by = |n: &str| seen.iter().find(|s| s.0 == n).unwrap();
        assert_eq!(by("bin").1, 0o040_755);
        assert_eq!(by("bin/sh").1, 0o120_777);
        assert_eq!(by("bin/sh").7, b"toybox");
        assert_eq!(by("bin/toybox").7, b"\x7fELF not really");
        assert_eq!(by("dev/console").1, 0o020_600);
        assert_eq!((by("dev/console").5, by("dev/console").6), (5, 1));
        assert_eq!(by("init").7, b"#!/bin/sh\necho hi\n");
        assert!(by("empty").7.is_empty());
    }

    /// GNU cpio (`cpio -t`) lists the same entries. Needs the `cpio` package,
    /// which `.ci/run` installs; where it is absent, skipped, or failed under
    /// `OSSO_REQUIRE_E2E=1` (`osso_testkit`).
    #[test]
    fn gnu_cpio_lists_the_same_entries() {
        let Some(mut child) = osso_testkit::require(
            "gnu_cpio_lists_the_same_entries",
            Command::new("cpio")
                .args(["-t", "--quiet"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("GNU cpio does not run ({e}); apt-get install cpio")),
        ) else {
            return;
        };
        let bytes = sample().to_bytes().unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cpio -t failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        let ours: Vec<String> = sample().entries().map(|(p, _)| p.to_string()).collect();
        assert_eq!(listed, ours);
    }

    #[test]
    fn same_entries_in_any_order_give_the_same_bytes() {
        let a = sample().to_bytes().unwrap();
        let mut b = Archive::new(0);
        b.file("empty", 0o644, Vec::new()).unwrap();
        b.file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        b.char_dev("dev/console", 0o600, 5, 1).unwrap();
        b.dir("dev", 0o755).unwrap();
        b.symlink("bin/sh", "toybox").unwrap();
        b.file("bin/toybox", 0o755, b"\x7fELF not really".to_vec())
            .unwrap();
        b.dir("bin", 0o755).unwrap();
        assert_eq!(a, b.to_bytes().unwrap());
        assert_eq!(a.len() % 4, 0);
    }

    #[test]
    fn bad_and_duplicate_paths_are_refused() {
        let mut a = Archive::new(0);
        for bad in ["", "/", "a/../b", "a//b", "./x", "nul\0"] {
            assert!(
                matches!(a.dir(bad, 0o755), Err(CpioError::BadPath(_))),
                "{bad:?}"
            );
        }
        a.dir("/etc", 0o755).unwrap();
        assert!(matches!(a.dir("etc", 0o755), Err(CpioError::Duplicate(_))));
    }
}
