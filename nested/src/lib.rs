//! osso-nested: layer 5 of Osso's tests on machines whose KVM cannot run
//! guest user space. It builds a level-1 "KVM host" (Debian's cloud kernel
//! with `kvm-amd`, Busybox, the project's static programs and the Osso guest
//! image), boots it under QEMU in software mode with an emulated AMD SVM CPU
//! (level 0), and runs checks inside it, where Osso's VMM boots the guest
//! (level 2) under a real KVM with nested paging: `/init` and all.
//!
//! Modules: [`artifacts`] (the static build), [`debs`] (level 1's kernel and
//! Busybox), [`rootfs`] (level 1's root file system), [`level0`] (QEMU),
//! [`init`] (level 1's `/init`), [`plan`] (what level 1 runs and how it
//! reports), [`layer5`] (the layer-5 checks and `target/layer5.json`),
//! [`runner`] (one run: build, boot, retry once on a hang).

pub mod artifacts;
pub mod debs;
pub mod error;
pub mod init;
pub mod layer5;
pub mod level0;
pub mod plan;
pub mod rootfs;
pub mod runner;

pub use error::{Error, Result};
