//! The level-1 root file system: one uncompressed cpio (newc, written by
//! `osso_guest::cpio`) that level 0 hands to the Debian kernel as its
//! initramfs. It holds:
//! - `/init`: the static `osso-nested` binary (see [`crate::init`]), and the
//!   plan it runs;
//! - Busybox (static) with its applet links, the KVM modules;
//! - host programs the checks need (QEMU as the benchmark's peer, iproute2's
//!   `ip`, `ping`), each with the shared libraries `ldd` names and QEMU's
//!   firmware, at their host paths;
//! - the project's static executables, its tracked source files and the Osso
//!   guest image, all at their host paths: test binaries find what they
//!   were built against (`CARGO_BIN_EXE_*`, `CARGO_MANIFEST_DIR`) where it
//!   was.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use osso_guest::cpio::Archive;

use crate::error::{Error, Result};

/// QEMU's firmware files a `microvm` or `pc` boot reads.
const QEMU_FIRMWARE: &[&str] = &[
    "bios-microvm.bin",
    "qboot.rom",
    "pvh.bin",
    "linuxboot_dma.bin",
    "linuxboot.bin",
    "kvmvapic.bin",
    "bios-256k.bin",
];

/// A level-1 root file system being assembled.
pub struct Rootfs {
    archive: Archive,
    dirs: BTreeSet<String>,
    files: BTreeSet<String>,
    bytes: u64,
}

impl Default for Rootfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Rootfs {
    pub fn new() -> Rootfs {
        let mut r = Rootfs {
            archive: Archive::new(0),
            dirs: BTreeSet::new(),
            files: BTreeSet::new(),
            bytes: 0,
        };
        for d in ["dev", "proc", "sys", "tmp", "root", "etc", "run", "var/tmp"] {
            let _ = r.dir(d);
        }
        // Without /dev/console, init starts with no stdout.
        let _ = r.archive.char_dev("dev/console", 0o600, 5, 1);
        r.files.insert("dev/console".into());
        // /init's first helpers run with stdin from /dev/null, before
        // devtmpfs is mounted over /dev.
        let _ = r.archive.char_dev("dev/null", 0o666, 1, 3);
        r.files.insert("dev/null".into());
        // As on Debian: iproute2's `ip netns` keeps its files in /run/netns.
        let _ = r.symlink("var/run", "/run");
        let _ = r.text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
        let _ = r.text("etc/group", "root:x:0:\n");
        let _ = r.text("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n");
        let _ = r.text(
            "etc/nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files\n",
        );
        r
    }

    fn rel(path: &str) -> String {
        path.trim_start_matches('/').to_string()
    }

    /// Adds a directory and its parents.
    pub fn dir(&mut self, path: &str) -> Result<()> {
        let rel = Self::rel(path);
        let mut acc = String::new();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if self.dirs.insert(acc.clone()) {
                self.archive.dir(&acc, 0o755)?;
            }
        }
        Ok(())
    }

    fn parent(&mut self, rel: &str) -> Result<()> {
        if let Some((p, _)) = rel.rsplit_once('/') {
            self.dir(p)?;
        }
        Ok(())
    }

    /// Whether `path` is already in the archive.
    pub fn has(&self, path: &str) -> bool {
        let rel = Self::rel(path);
        self.files.contains(&rel) || self.dirs.contains(&rel)
    }

    /// Adds a file with these contents (once: a second add of a path is ignored).
    pub fn bytes(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<()> {
        let rel = Self::rel(path);
        if self.has(&rel) {
            return Ok(());
        }
        self.parent(&rel)?;
        self.bytes += data.len() as u64;
        self.archive.file(&rel, mode, data)?;
        self.files.insert(rel);
        Ok(())
    }

    fn text(&mut self, path: &str, text: &str) -> Result<()> {
        self.bytes(path, 0o644, text.as_bytes().to_vec())
    }

    /// Copies the host file `src` (symbolic links followed) to `path`.
    pub fn copy(&mut self, src: &Path, path: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(src).map_err(|e| Error::io(format!("stat {}", src.display()), e))?;
        let data =
            std::fs::read(src).map_err(|e| Error::io(format!("read {}", src.display()), e))?;
        self.bytes(path, meta.permissions().mode() & 0o7777, data)
    }

    /// Copies the host file `src` to the same path.
    pub fn copy_same(&mut self, src: &Path) -> Result<()> {
        let p = src.to_string_lossy().into_owned();
        self.copy(src, &p)
    }

    /// Adds a symbolic link (once).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let rel = Self::rel(path);
        if self.has(&rel) {
            return Ok(());
        }
        self.parent(&rel)?;
        self.archive.symlink(&rel, target)?;
        self.files.insert(rel);
        Ok(())
    }

    /// Busybox at /bin/busybox, with a link for each applet where no real
    /// program stands.
    pub fn busybox(&mut self, busybox: &Path) -> Result<()> {
        self.copy(busybox, "/bin/busybox")?;
        let out = Command::new(busybox)
            .arg("--list-full")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io(format!("run {} --list-full", busybox.display()), e))?;
        for applet in String::from_utf8_lossy(&out.stdout).lines() {
            let applet = applet.trim();
            if !applet.is_empty() && applet != "bin/busybox" {
                self.symlink(applet, "/bin/busybox")?;
            }
        }
        Ok(())
    }

    /// A dynamically linked host program at its host path, with the shared
    /// libraries and the loader `ldd` lists, at theirs.
    pub fn program_with_libraries(&mut self, program: &Path) -> Result<PathBuf> {
        let real = std::fs::canonicalize(program)
            .map_err(|e| Error::io(format!("resolve {}", program.display()), e))?;
        self.copy_same(&real)?;
        // Also where PATH may find it under its own name (e.g. /sbin/ip -> /bin/ip).
        if program.is_absolute() && program != real {
            self.symlink(&program.to_string_lossy(), &real.to_string_lossy())?;
        }
        let out = Command::new("ldd")
            .arg(&real)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io("run ldd", e))?;
        for lib in ldd_paths(&String::from_utf8_lossy(&out.stdout)) {
            self.copy_same(&lib)?;
        }
        Ok(real)
    }

    /// QEMU and the firmware it reads.
    pub fn qemu(&mut self, qemu: &Path) -> Result<()> {
        self.program_with_libraries(qemu)?;
        for dir in [
            "/usr/share/qemu",
            "/usr/share/seabios",
            "/usr/lib/ipxe/qemu",
        ] {
            for f in QEMU_FIRMWARE {
                let p = Path::new(dir).join(f);
                if p.exists() {
                    self.copy_same(&p)?;
                }
            }
        }
        Ok(())
    }

    /// Bytes of file data so far.
    pub fn data_bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes the archive to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let f = std::fs::File::create(path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        let mut w = std::io::BufWriter::new(f);
        self.archive.write_to(&mut w)?;
        use std::io::Write;
        w.flush()
            .map_err(|e| Error::io(format!("write {}", path.display()), e))
    }
}

/// The absolute paths in `ldd` output: `libx.so => /lib/libx.so (0x..)` and
/// the loader's `/lib64/ld-linux-x86-64.so.2 (0x..)`.
fn ldd_paths(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = match l.split_once("=>") {
                Some((_, rest)) => rest.trim().split(' ').next()?,
                None => l.split(' ').next()?,
            };
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_libraries_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\tlibgone.so => not found\n";
        assert_eq!(
            ldd_paths(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn parents_are_made_and_a_path_is_added_once() {
        let mut r = Rootfs::new();
        r.bytes("/a/b/c.txt", 0o644, b"one".to_vec()).unwrap();
        r.bytes("/a/b/c.txt", 0o644, b"two".to_vec()).unwrap();
        r.symlink("/a/b/c.txt", "/elsewhere").unwrap();
        assert!(r.has("/a") && r.has("a/b") && r.has("/a/b/c.txt"));
        let mut out = Vec::new();
        r.archive.write_to(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("a/b/c.txt") && text.contains("one") && !text.contains("two"));
    }
}
