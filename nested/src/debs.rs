//! The level-1 "KVM host" from Debian's archive: the cloud kernel with its
//! `irqbypass`, `kvm`, `kvm-amd` and `tun` modules, and `busybox-static`.
//! Fetched with `apt-get download` (apt checks each package against the
//! signed archive index), unpacked with `dpkg-deb -x`, and cached under
//! `<osso cache>/nested/debs/<file name>/`, with the package's sha256
//! recorded beside it and checked on reuse.
//!
//! The kernel version is pinned here, in one place ([`KERNEL_ABI`]), and can
//! be overridden with `OSSO_NESTED_KERNEL`. Debian's archive keeps only the
//! current kernel of a release, so when the pinned one has left it the
//! harness falls back to the one `linux-image-cloud-amd64` names, and says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// The pinned level-1 kernel: Debian 12's cloud kernel ABI.
pub const KERNEL_ABI: &str = "6.1.0-57-cloud-amd64";
/// The metapackage whose dependency names Debian's current cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "busybox-static";

/// The unpacked level-1 kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub abi: String,
    pub vmlinuz: PathBuf,
    /// In load order: irqbypass, kvm, kvm-amd, tun.
    pub modules: Vec<PathBuf>,
    /// The `.deb` and its sha256.
    pub package: PathBuf,
    pub sha256: String,
    /// Set when the pinned kernel was not available and another was used.
    pub note: Option<String>,
}

/// The level-1 kernel, fetched on first use.
pub fn kernel(cache: &Path) -> Result<Kernel> {
    let pinned = std::env::var("OSSO_NESTED_KERNEL").unwrap_or_else(|_| KERNEL_ABI.to_string());
    let (abi, root, package, sha256, note) = match fetch(cache, &format!("linux-image-{pinned}")) {
        Ok((root, deb, sum)) => (pinned, root, deb, sum, None),
        Err(first) => {
            let current = current_cloud_abi().ok_or(first)?;
            let note = format!(
                    "the pinned level-1 kernel {pinned} is not in Debian's archive; using {current} (update KERNEL_ABI in nested/src/debs.rs)"
                );
            eprintln!("osso-nested: {note}");
            let (root, deb, sum) = fetch(cache, &format!("linux-image-{current}"))?;
            (current, root, deb, sum, Some(note))
        }
    };
    let vmlinuz = root.join(format!("boot/vmlinuz-{abi}"));
    let moddir = root.join(format!("lib/modules/{abi}/kernel"));
    let modules: Vec<PathBuf> = [
        "virt/lib/irqbypass.ko",
        "arch/x86/kvm/kvm.ko",
        "arch/x86/kvm/kvm-amd.ko",
        "drivers/net/tun.ko",
    ]
    .iter()
    .map(|m| moddir.join(m))
    .collect();
    for f in std::iter::once(&vmlinuz).chain(&modules) {
        if !f.is_file() {
            return Err(Error::Package {
                package: format!("linux-image-{abi}"),
                detail: format!("{} is missing from the package", f.display()),
            });
        }
    }
    Ok(Kernel {
        abi,
        vmlinuz,
        modules,
        package,
        sha256,
        note,
    })
}

/// Debian's static Busybox, fetched on first use.
pub fn busybox(cache: &Path) -> Result<PathBuf> {
    let (root, _, _) = fetch(cache, BUSYBOX)?;
    let bin = root.join("bin/busybox");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(Error::Package {
            package: BUSYBOX.into(),
            detail: "bin/busybox is missing from the package".into(),
        })
    }
}

/// The ABI of the cloud kernel `linux-image-cloud-amd64` depends on now.
fn current_cloud_abi() -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["depends", KERNEL_META])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.trim()
            .strip_prefix("Depends: linux-image-")
            .filter(|abi| abi.ends_with("-cloud-amd64"))
            .map(str::to_string)
    })
}

/// Downloads and unpacks `package` (once): returns (unpacked root, .deb, sha256).
fn fetch(cache: &Path, package: &str) -> Result<(PathBuf, PathBuf, String)> {
    let dir = cache.join("nested/debs").join(package);
    let root = dir.join("root");
    let stamp = dir.join("sha256");
    if let (Ok(sum), Some(deb)) = (std::fs::read_to_string(&stamp), find_deb(&dir)) {
        // Reuse only what still matches the recorded checksum.
        let now = osso_guest::cache::sha256_file(&deb)
            .map_err(|e| Error::io(format!("read {}", deb.display()), e))?;
        if now == sum.trim() && root.is_dir() {
            return Ok((root, deb, now));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    need_tool("apt-get", "Debian's apt (this harness needs a Debian host)")?;
    need_tool("dpkg-deb", "apt-get install dpkg")?;
    eprintln!("osso-nested: apt-get download {package}");
    let out = Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("run apt-get download", e))?;
    let deb = find_deb(&dir)
        .filter(|_| out.status.success())
        .ok_or_else(|| Error::Package {
            package: package.into(),
            detail: format!(
                "apt-get download failed ({}): {} (try `apt-get update`)",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| Error::io("run dpkg-deb", e))?;
    if !status.success() {
        return Err(Error::Package {
            package: package.into(),
            detail: format!("dpkg-deb -x {} failed ({status})", deb.display()),
        });
    }
    let sum = osso_guest::cache::sha256_file(&deb)
        .map_err(|e| Error::io(format!("read {}", deb.display()), e))?;
    std::fs::write(&stamp, &sum).map_err(|e| Error::io(format!("write {}", stamp.display()), e))?;
    Ok((root, deb, sum))
}

fn find_deb(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
}

/// Fails with the install command when `tool` is not on PATH.
pub fn need_tool(tool: &str, fix: &str) -> Result<PathBuf> {
    osso_guest::tools::which(tool).ok_or_else(|| Error::MissingTool {
        tool: tool.into(),
        fix: fix.into(),
    })
}
