//! The Osso kernel: unpack, patch, configure from the committed fragment on
//! `allnoconfig`, check the configuration, build `bzImage` and `vmlinux`, and
//! install the sanitised headers Toybox is compiled against.
//!
//! The fragment and the patches are compiled into the builder (`include_str!`),
//! so they are part of every cache key and the binary works from any directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::Keys;
use crate::error::{Error, Result};
use crate::sources::{self, Resolved};
use crate::steps::{self, ProgressMode};

/// The committed config fragment.
pub const FRAGMENT: &str = include_str!("../kernel/osso.config");

/// The committed kernel patches, in the order they are applied.
pub const PATCHES: &[(&str, &str)] = &[
    (
        "0001-x86-alternative-skip-int3-selftest.patch",
        include_str!("../kernel/patches/0001-x86-alternative-skip-int3-selftest.patch"),
    ),
    (
        "0002-x86-fpu-drop-fwait-in-fpu-drop.patch",
        include_str!("../kernel/patches/0002-x86-fpu-drop-fwait-in-fpu-drop.patch"),
    ),
];

/// A built kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The build's cache key.
    pub key: String,
    /// The `make kernelversion` string, e.g. `6.12.117`.
    pub version: String,
    /// The unstripped ELF vmlinux in the build tree.
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    /// `include/` of `make headers_install`.
    pub headers: PathBuf,
    /// The final `.config`.
    pub config: PathBuf,
}

/// Builds (or reuses) the kernel from `src`, under the keys of [`crate::cache::Keys`].
pub fn build(
    src: &Resolved,
    keys: &Keys,
    root: &Path,
    jobs: usize,
    mode: ProgressMode,
) -> Result<Kernel> {
    let (tree_key, build_key) = (keys.kernel_tree.clone(), keys.kernel_build.clone());
    let tree = root.join("src").join(format!("linux-{tree_key}"));
    let out = root.join("build").join(format!("kernel-{build_key}"));
    let log = out.join("build.log");
    let kernel = Kernel {
        key: build_key,
        version: String::new(),
        vmlinux: out.join("vmlinux"),
        bzimage: out.join("arch/x86/boot/bzImage"),
        headers: out.join("hdr/include"),
        config: out.join(".config"),
    };
    let done = out.join(".osso-built");
    if done.exists() {
        let version = fs::read_to_string(&done).map_err(|e| Error::io(&done, e))?;
        return Ok(Kernel {
            version: version.trim().to_string(),
            ..kernel
        });
    }

    prepare_tree(src, &tree, mode)?;
    fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let fragment = out.join("osso.config");
    fs::write(&fragment, FRAGMENT).map_err(|e| Error::io(&fragment, e))?;

    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(&tree)
            .arg(format!("O={}", out.display()))
            .args(args)
            // Reproducible build identity: no host name, user or date in the image.
            .env("KBUILD_BUILD_USER", "osso")
            .env("KBUILD_BUILD_HOST", "osso")
            .env("KBUILD_BUILD_TIMESTAMP", "2025-01-01")
            .env_remove("ARCH")
            .env_remove("CROSS_COMPILE");
        c
    };
    steps::run(
        mode,
        "kernel: allnoconfig + fragment",
        make(&[
            &format!("KCONFIG_ALLCONFIG={}", fragment.display()),
            "allnoconfig",
        ])
        .arg("-s"),
        &log,
    )?;
    steps::run(
        mode,
        "kernel: olddefconfig",
        make(&["olddefconfig"]).arg("-s"),
        &log,
    )?;
    let final_config =
        fs::read_to_string(&kernel.config).map_err(|e| Error::io(&kernel.config, e))?;
    let missing = check_config(FRAGMENT, &final_config);
    if !missing.is_empty() {
        return Err(Error::ConfigDropped(missing));
    }
    let j = format!("-j{}", jobs.max(1));
    steps::run(
        mode,
        "kernel: make bzImage vmlinux",
        &mut make(&[&j, "bzImage"]),
        &log,
    )?;
    steps::run(
        mode,
        "kernel: headers_install",
        &mut make(&[
            "headers_install",
            &format!("INSTALL_HDR_PATH={}", out.join("hdr").display()),
        ]),
        &log,
    )?;
    let version = steps::capture(
        Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(&tree)
            .arg("kernelversion"),
    )
    .map(|v| v.trim().to_string())
    .filter(|v| !v.is_empty())
    .ok_or_else(|| Error::Check("`make kernelversion` printed nothing".into()))?;
    for f in [&kernel.vmlinux, &kernel.bzimage, &kernel.headers] {
        if !f.exists() {
            return Err(Error::Check(format!(
                "the kernel build did not produce {}",
                f.display()
            )));
        }
    }
    steps::write_atomic(&done, version.as_bytes())?;
    Ok(Kernel { version, ..kernel })
}

/// Unpacks and patches the kernel tree once; a marker says it is complete.
fn prepare_tree(src: &Resolved, tree: &Path, mode: ProgressMode) -> Result<()> {
    let ready = tree.join(".osso-patched");
    if ready.exists() {
        return Ok(());
    }
    if tree.exists() {
        // An interrupted earlier attempt: start again from the tarball.
        fs::remove_dir_all(tree).map_err(|e| Error::io(tree, e))?;
    }
    sources::unpack(src, tree, mode, "kernel")?;
    let log = tree.join("osso-patch.log");
    for (name, body) in PATCHES {
        let file = tree.join(format!("osso-{name}"));
        fs::write(&file, body).map_err(|e| Error::io(&file, e))?;
        steps::run(
            mode,
            &format!("kernel: patch {name}"),
            Command::new("patch")
                .args(["-p1", "--forward", "--batch", "-i"])
                .arg(&file)
                .current_dir(tree),
            &log,
        )?;
    }
    fs::write(&ready, b"").map_err(|e| Error::io(&ready, e))
}

/// The options a fragment asks for that the final `.config` does not have.
///
/// `CONFIG_X=v` must appear exactly; `# CONFIG_X is not set` must not be
/// enabled (`=y` or `=m`). Returns them as the fragment wrote them.
pub fn check_config(fragment: &str, final_config: &str) -> Vec<String> {
    let have: std::collections::HashSet<&str> = final_config.lines().map(str::trim).collect();
    let mut missing = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if line.starts_with("CONFIG_") && line.contains('=') {
            if !have.contains(line) {
                missing.push(line.to_string());
            }
        } else if let Some(opt) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
            .filter(|o| o.starts_with("CONFIG_"))
        {
            if have.contains(format!("{opt}=y").as_str())
                || have.contains(format!("{opt}=m").as_str())
            {
                missing.push(line.to_string());
            }
        }
    }
    missing
}

/// Strips `vmlinux` into `dest` and checks that the PVH entry note survived.
pub fn strip_vmlinux(vmlinux: &Path, dest: &Path, log: &Path, mode: ProgressMode) -> Result<()> {
    steps::run(
        mode,
        "kernel: strip vmlinux",
        Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(dest)
            .arg(vmlinux),
        log,
    )?;
    let bytes = fs::read(dest).map_err(|e| Error::io(dest, e))?;
    match pvh_entry(&bytes) {
        Some(_) => Ok(()),
        None => Err(Error::Check(format!(
            "{} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): is CONFIG_PVH on?",
            dest.display()
        ))),
    }
}

/// The PVH 32-bit entry point from an ELF64 image's `Xen` note of type 18
/// (XEN_ELFNOTE_PHYS32_ENTRY), if it has one. Malformed input gives None.
pub fn pvh_entry(elf: &[u8]) -> Option<u64> {
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let parsed = goblin::elf::Elf::parse(elf).ok()?;
    if !parsed.is_64 || !parsed.little_endian {
        return None;
    }
    // A malformed note ends the walk (goblin yields an error for it).
    for note in parsed.iter_note_headers(elf)?.map_while(|n| n.ok()) {
        if note.n_type == XEN_ELFNOTE_PHYS32_ENTRY && note.name.trim_end_matches('\0') == "Xen" {
            return match note.desc.len() {
                4 => note
                    .desc
                    .try_into()
                    .ok()
                    .map(u32::from_le_bytes)
                    .map(u64::from),
                8 => note.desc.try_into().ok().map(u64::from_le_bytes),
                _ => None,
            };
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_check_reports_dropped_and_unwanted_options() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_N=1\n# CONFIG_PCI is not set\n# CONFIG_ACPI is not set\n";
        let good = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=1\n# CONFIG_PCI is not set\n";
        assert!(check_config(fragment, good).is_empty());
        // kconfig dropped B (dependency off), changed N, and turned PCI on.
        let bad = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=4\nCONFIG_PCI=y\n";
        assert_eq!(
            check_config(fragment, bad),
            ["CONFIG_B=y", "CONFIG_N=1", "# CONFIG_PCI is not set"]
        );
    }

    #[test]
    fn committed_fragment_has_the_required_options() {
        for opt in [
            "CONFIG_64BIT=y",
            "CONFIG_BINFMT_ELF=y",
            "CONFIG_BINFMT_SCRIPT=y",
            "CONFIG_SERIAL_8250_CONSOLE=y",
            "CONFIG_BLK_DEV_INITRD=y",
            "CONFIG_DEVTMPFS_MOUNT=y",
            "CONFIG_IP_PNP=y",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
            "CONFIG_VIRTIO_NET=y",
            "CONFIG_PVH=y",
            "CONFIG_KVM_GUEST=y",
            "CONFIG_DEVMEM=y",
            "CONFIG_CC_OPTIMIZE_FOR_SIZE=y",
            "# CONFIG_PCI is not set",
            "# CONFIG_ACPI is not set",
            "# CONFIG_PTP_1588_CLOCK is not set",
        ] {
            assert!(
                FRAGMENT.lines().any(|l| l.trim() == opt),
                "fragment lacks {opt}"
            );
        }
    }

    /// A minimal ELF64 with one PT_NOTE segment holding `notes`.
    use osso_testkit::elf::{note, notes_only as elf_with_notes};

    #[test]
    fn pvh_note_is_found_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        notes.extend(note(b"Xen\0", 18, &0x0100_0abcu32.to_le_bytes()));
        assert_eq!(pvh_entry(&elf_with_notes(&notes)), Some(0x0100_0abc));
        let other = note(b"Xen\0", 17, &0u32.to_le_bytes());
        assert_eq!(pvh_entry(&elf_with_notes(&other)), None);
    }

    #[test]
    fn the_real_kernel_has_its_pvh_entry_found() {
        const T: &str = "the_real_kernel_has_its_pvh_entry_found";
        let Some(path) = osso_testkit::require(
            T,
            std::env::var("OSSO_KERNEL").map_err(|_| "OSSO_KERNEL is not set (no built image)"),
        ) else {
            return;
        };
        let elf = std::fs::read(&path).unwrap();
        let entry = pvh_entry(&elf).expect("the Osso vmlinux has a PVH note");
        // Linux's PVH entry (pvh_start_xen) is a 32-bit physical address
        // inside the kernel's load range (16 MiB up).
        assert!((0x100_0000..0x1_0000_0000).contains(&entry), "{entry:#x}");
    }

    #[test]
    fn pvh_parser_survives_garbage() {
        assert_eq!(pvh_entry(b""), None);
        assert_eq!(pvh_entry(b"\x7fELF\x02\x01"), None);
        let mut e = elf_with_notes(&note(b"Xen\0", 18, &[1, 2, 3, 4]));
        // Claim a huge note: must not read out of bounds.
        let at = 0x40 + 0x38 + 4;
        e[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&e), None);
        for cut in 0..e.len() {
            let _ = pvh_entry(&e[..cut]);
        }
    }
}
