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
/// PT_NOTE with the Xen PVH entry note (type 18, "Xen") when `pvh_entry` is set.
#[allow(dead_code)] // not every test binary builds tiny kernels
pub fn elf_kernel(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let note_off = 64 + 56 * u64::from(phnum);
    let note_len = if pvh_entry.is_some() { 12 + 4 + 4 } else { 0 };
    let code_off = note_off + note_len;
    let mut e = vec![0u8; 64];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELFCLASS64
    e[5] = 1; // little-endian
    e[6] = 1; // ELF version
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    e[56..58].copy_from_slice(&phnum.to_le_bytes());
    let phdr = |p_type: u32, off: u64, addr: u64, size: u64| {
        let mut p = vec![0u8; 56];
        p[0..4].copy_from_slice(&p_type.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&size.to_le_bytes());
        p[40..48].copy_from_slice(&size.to_le_bytes());
        p
    };
    e.extend(phdr(1, code_off, paddr, code.len() as u64)); // PT_LOAD
    if let Some(entry) = pvh_entry {
        e.extend(phdr(4, note_off, 0, note_len)); // PT_NOTE
        e.extend_from_slice(&4u32.to_le_bytes()); // n_namesz
        e.extend_from_slice(&4u32.to_le_bytes()); // n_descsz
        e.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        e.extend_from_slice(b"Xen\0");
        e.extend_from_slice(&entry.to_le_bytes());
    }
    e.extend_from_slice(code);
    e
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
