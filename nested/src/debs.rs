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
    /// The kernel's symbols (names the code a hung level 1 was in).
    pub system_map: Option<PathBuf>,
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
    let system_map = Some(root.join(format!("boot/System.map-{abi}"))).filter(|p| p.is_file());
    Ok(Kernel {
        abi,
        vmlinuz,
        system_map,
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

/// The text symbol `addr` falls in, as `name+0xoffset`, from a System.map
/// (lines `ffffffff81000000 T _stext`). None outside the kernel's text.
pub fn symbolize(system_map: &str, addr: u64) -> Option<String> {
    let mut best: Option<(u64, &str)> = None;
    for line in system_map.lines() {
        let mut f = line.split_whitespace();
        let (Some(a), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if !matches!(kind, "t" | "T") {
            continue;
        }
        let Ok(a) = u64::from_str_radix(a, 16) else {
            continue;
        };
        if a <= addr && best.is_none_or(|(b, _)| a > b) {
            best = Some((a, name));
        }
    }
    let (a, name) = best?;
    // Past the end of the text a "nearest symbol" would be a guess.
    let etext = system_map.lines().find_map(|l| {
        let (a, rest) = l.split_once(' ')?;
        (rest.ends_with(" _etext")).then(|| u64::from_str_radix(a, 16).ok())?
    });
    if etext.is_some_and(|e| addr >= e) {
        return None;
    }
    Some(format!("{name}+{:#x}", addr - a))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "ffffffff81000000 T _stext\n\
                       ffffffff81001000 t do_one\n\
                       ffffffff81001800 D some_data\n\
                       ffffffff81002000 T do_two\n\
                       ffffffff81003000 T _etext\n";

    #[test]
    fn an_address_is_named_by_the_text_symbol_below_it() {
        assert_eq!(
            symbolize(MAP, 0xffff_ffff_8100_1010).as_deref(),
            Some("do_one+0x10")
        );
        // Data symbols do not count.
        assert_eq!(
            symbolize(MAP, 0xffff_ffff_8100_1900).as_deref(),
            Some("do_one+0x900")
        );
        assert_eq!(
            symbolize(MAP, 0xffff_ffff_8100_2000).as_deref(),
            Some("do_two+0x0")
        );
        assert_eq!(symbolize(MAP, 0xffff_ffff_8100_3004), None);
        assert_eq!(symbolize(MAP, 0x1000), None);
    }
}
