//! Tiny guests for tests and benchmarks: a minimal ELF64 "kernel" with a PVH
//! entry note, so it boots exactly as a real vmlinux does (ELF loader, PVH
//! entry in 32-bit protected mode), then runs a few dozen bytes of code
//! instead of Linux: print a message on COM1, optionally signal ready through
//! the boot timer, then reset, halt or spin. Used by the SDK's tests and the
//! boot benchmark, and useful to embedders who want to exercise the VMM alone.
//! Also [`TestBackend`], a network backend the tests drive by hand, and
//! [`virtio`], the driver's side of virtio (split rings on virtio-queue's
//! mock, the virtio-mmio probe sequence).

pub mod virtio;

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::net::NetBackend;

/// Load (and entry) address: the first byte above 1 MiB, where the loader puts kernels.
pub const LOAD: u32 = 0x0010_0000;

/// What the tiny guest does after printing its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Write 123 to the boot timer (ready), then reset through the i8042.
    ReadyThenReset,
    /// Write 123 to the boot timer, then spin for ever.
    ReadyThenSpin,
    /// Write 123 to the boot timer, then `cli; hlt` for ever: the vCPU sleeps
    /// in the in-kernel LAPIC and uses no host CPU (an idle VM).
    ReadyThenHalt,
    /// Spin for ever without ever becoming ready.
    Spin,
}

/// 32-bit code: print `msg` on COM1, then do `then`.
fn code(msg: &str, then: Then) -> Vec<u8> {
    let mut c = vec![0x66, 0xBA, 0xF8, 0x03]; // mov dx, 0x3f8
    for b in msg.bytes().chain(std::iter::once(b'\n')) {
        c.extend_from_slice(&[0xB0, b, 0xEE]); // mov al, b ; out dx, al
    }
    if then != Then::Spin {
        let addr = crate::layout::BOOT_TIMER_ADDR as u32;
        c.push(0xB8); // mov eax, BOOT_TIMER_ADDR
        c.extend_from_slice(&addr.to_le_bytes());
        c.extend_from_slice(&[0xC6, 0x00, 123]); // mov byte [eax], 123
    }
    match then {
        Then::ReadyThenReset => {
            c.extend_from_slice(&[0xB0, 0xFE, 0xE6, 0x64]); // mov al, 0xfe ; out 0x64, al (i8042 reset)
            c.push(0xF4); // hlt (not reached)
        }
        Then::ReadyThenHalt => {
            c.push(0xFA); // cli
            c.extend_from_slice(&[0xF4, 0xEB, 0xFD]); // hlt ; jmp back to hlt
        }
        Then::ReadyThenSpin | Then::Spin => {}
    }
    c.extend_from_slice(&[0xEB, 0xFE]); // jmp $
    c
}

/// An ELF64 image: one PT_LOAD with the code at LOAD, one PT_NOTE holding the
/// Xen PVH entry note (type 18, XEN_ELFNOTE_PHYS32_ENTRY) for LOAD.
pub fn tiny_elf(msg: &str, then: Then) -> Vec<u8> {
    let code = code(msg, then);
    osso_testkit::elf::exec(
        u64::from(LOAD),
        &code,
        code.len() as u64,
        &osso_testkit::elf::pvh_note(LOAD),
    )
}

/// A network backend for tests: records every frame the device sends and
/// hands the device the frames queued with [`TestBackend::push`]. Clones
/// share their state, so a test keeps one clone and gives the device another.
#[derive(Clone)]
pub struct TestBackend {
    /// Frames the device sent, in order.
    pub sent: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Frames waiting for the device to receive.
    pub inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
    /// Readable while the inbox may hold a frame.
    pub ready: Arc<EventFd>,
}

impl TestBackend {
    /// An empty backend.
    ///
    /// # Panics
    ///
    /// If an eventfd cannot be created (a test helper: the test fails).
    pub fn new() -> Self {
        Self {
            sent: Arc::default(),
            inbox: Arc::default(),
            ready: Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd for a test backend")),
        }
    }

    /// Queues `frame` for the device and wakes it.
    ///
    /// # Panics
    ///
    /// If the eventfd cannot be written (a test helper: the test fails).
    pub fn push(&self, frame: Vec<u8>) {
        self.inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(frame);
        self.ready.write(1).expect("wake the device");
    }
}

impl Default for TestBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl NetBackend for TestBackend {
    fn ready_fd(&self) -> Option<RawFd> {
        Some(self.ready.as_raw_fd())
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(frame.to_vec());
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
        {
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}
