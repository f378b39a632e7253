//! Kernel command line assembly.
//!
//! The command line is built from, in order: the default base line, the boot
//! timer address (`osso.boot_timer=0x...`, for `/init`), fragments that
//! devices add (`virtio_mmio.device=4K@0x...:IRQ`), the PVM workaround when the
//! host's KVM is PVM, and last the user's extra text (so the user can
//! override). It must be printable ASCII and fit in [`CMDLINE_MAX_SIZE`] bytes
//! with its NUL (x86's `COMMAND_LINE_SIZE`).

use crate::layout::CMDLINE_MAX_SIZE;

/// The default command line: serial console, reset through the keyboard
/// controller, reboot on panic, no PCI, and a quiet i8042.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule \
i8042.noaux i8042.nomux i8042.dumbkbd";

/// Appended when the host's KVM is PVM (see `shared/notes/kvm-on-these-machines.md`):
/// the instructions PVM's emulator lacks are avoided by these options.
pub const PVM_WORKAROUND: &str = "noxsave clearcpuid=cx16,popcnt,smap nosmap";

/// Command line errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// Longer than the kernel accepts.
    #[error("kernel command line is {len} bytes with its NUL; the most is {max}")]
    TooLong {
        /// Length with NUL.
        len: usize,
        /// Limit with NUL.
        max: usize,
    },
    /// A character that is not printable ASCII.
    #[error("kernel command line has a character that is not printable ASCII: {0:?}")]
    BadChar(char),
}

/// A kernel command line under construction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    parts: Vec<String>,
}

impl KernelCmdline {
    /// An empty command line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a fragment (one or more space-separated options). Empty
    /// fragments are skipped.
    pub fn push(&mut self, fragment: impl AsRef<str>) -> &mut Self {
        let f = fragment.as_ref().trim();
        if !f.is_empty() {
            self.parts.push(f.to_string());
        }
        self
    }

    /// The line, checked: printable ASCII, at most `max` bytes with its NUL.
    pub fn render_with_limit(&self, max: usize) -> Result<String, CmdlineError> {
        let s = self.parts.join(" ");
        if let Some(c) = s.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
            return Err(CmdlineError::BadChar(c));
        }
        if s.len() + 1 > max {
            return Err(CmdlineError::TooLong {
                len: s.len() + 1,
                max,
            });
        }
        Ok(s)
    }

    /// The line, checked against [`CMDLINE_MAX_SIZE`].
    pub fn render(&self) -> Result<String, CmdlineError> {
        self.render_with_limit(CMDLINE_MAX_SIZE)
    }
}

/// Whether this host's KVM is PVM (`/sys/module/kvm_pvm` exists).
pub fn host_kvm_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Assembles the full command line in the documented order.
pub fn assemble(
    base: &str,
    boot_timer_addr: Option<u64>,
    device_fragments: &[String],
    pvm_workaround: bool,
    extra: Option<&str>,
) -> KernelCmdline {
    let mut c = KernelCmdline::new();
    c.push(base);
    if let Some(addr) = boot_timer_addr {
        c.push(format!("osso.boot_timer={addr:#x}"));
    }
    for f in device_fragments {
        c.push(f);
    }
    if pvm_workaround {
        c.push(PVM_WORKAROUND);
    }
    if let Some(e) = extra {
        c.push(e);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_content() {
        let c = assemble(
            DEFAULT_CMDLINE,
            Some(0xc000_0000),
            &["virtio_mmio.device=4K@0xd0000000:5".to_string()],
            true,
            Some("  quiet loglevel=3 "),
        );
        let s = c.render().unwrap();
        assert_eq!(
            s,
            "console=ttyS0 reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux \
             i8042.dumbkbd osso.boot_timer=0xc0000000 virtio_mmio.device=4K@0xd0000000:5 \
             noxsave clearcpuid=cx16,popcnt,smap nosmap quiet loglevel=3"
        );
        let no_pvm = assemble(DEFAULT_CMDLINE, None, &[], false, None)
            .render()
            .unwrap();
        assert_eq!(no_pvm, DEFAULT_CMDLINE);
        assert!(!no_pvm.contains("noxsave"));
    }

    #[test]
    fn over_long_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let c = assemble("a", None, &[], false, Some(&long));
        assert_eq!(
            c.render(),
            Err(CmdlineError::TooLong {
                len: CMDLINE_MAX_SIZE + 3,
                max: CMDLINE_MAX_SIZE
            })
        );
        // Exactly at the limit (NUL included) is fine.
        let mut c = KernelCmdline::new();
        c.push("y".repeat(CMDLINE_MAX_SIZE - 1));
        assert_eq!(c.render().unwrap().len(), CMDLINE_MAX_SIZE - 1);
        c.push("z");
        assert!(c.render().is_err());
    }

    #[test]
    fn control_chars_refused() {
        let mut c = KernelCmdline::new();
        c.push("a\nb");
        assert_eq!(c.render(), Err(CmdlineError::BadChar('\n')));
    }
}
