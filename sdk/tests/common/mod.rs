//! Helpers for the SDK's tests: tiny guests (`osso_vmm::testing`: an ELF with
//! a PVH note and a few dozen bytes of code) written to files so they boot
//! through the public API as a custom kernel, and process counters.
#![allow(dead_code)]

use std::path::PathBuf;

pub use osso_vmm::testing::{tiny_elf, Then};

/// Writes a tiny guest into `dir` and returns its path.
pub fn tiny_kernel(dir: &std::path::Path, name: &str, msg: &str, then: Then) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, tiny_elf(msg, then)).expect("write tiny guest");
    p
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}
