//! Helpers shared by the integration tests: tiny kernel files, a console
//! sink the test reads back, the Osso image. Checks that cannot run here
//! go through `osso_testkit`.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// A console sink the test can read back (clones share the buffer).
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

#[allow(dead_code)] // not every test binary reads both ways
impl Console {
    /// Everything written so far, as bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A minimal x86-64 ELF executable: one PT_LOAD of `code` at `paddr`, and a
/// PT_NOTE with the Xen PVH entry note when `pvh_entry` is set.
#[allow(dead_code)] // not every test binary builds tiny kernels
pub fn elf_kernel(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    let notes = pvh_entry
        .map(osso_testkit::elf::pvh_note)
        .unwrap_or_default();
    osso_testkit::elf::exec(paddr, code, code.len() as u64, &notes)
}

/// The Osso kernel and initramfs for the real-kernel tests: `OSSO_KERNEL` /
/// `OSSO_INITRD` (the test command sets them from the image manifest), else
/// the first directory of `~/.cache/osso/images/` holding both files.
#[allow(dead_code)] // not every test binary boots the real kernel
pub fn find_image() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    if let (Ok(k), Ok(i)) = (std::env::var("OSSO_KERNEL"), std::env::var("OSSO_INITRD")) {
        return Some((k.into(), i.into()));
    }
    let home = std::env::var("HOME").ok()?;
    let dir = std::path::PathBuf::from(home).join(".cache/osso/images");
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    dirs.into_iter().find_map(|d| {
        let k = d.join("vmlinux");
        let i = d.join("initramfs.cpio.gz");
        (k.is_file() && i.is_file()).then_some((k, i))
    })
}

/// [`find_image`], or a skip (a failure under `OSSO_REQUIRE_E2E=1`) that
/// says how to get one.
#[allow(dead_code)] // not every test binary boots the real kernel
pub fn require_image(test: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    osso_testkit::require(
        test,
        find_image().ok_or("no Osso image (set OSSO_KERNEL and OSSO_INITRD, or build one)"),
    )
}
