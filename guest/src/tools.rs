//! Host tools the build needs, detected up front.
//!
//! Each tool maps to the Debian package that provides it. When some are missing,
//! the builder installs them itself if it runs as root on Debian and the caller
//! allowed it (saying so), and otherwise fails naming the one command that
//! installs them all.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// (what is checked, how it is found, Debian package).
const TOOLS: &[(&str, Probe, &str)] = &[
    ("make", Probe::Bin("make"), "make"),
    ("gcc", Probe::Bin("gcc"), "gcc"),
    ("flex", Probe::Bin("flex"), "flex"),
    ("bison", Probe::Bin("bison"), "bison"),
    ("bc", Probe::Bin("bc"), "bc"),
    ("perl", Probe::Bin("perl"), "perl"),
    ("patch", Probe::Bin("patch"), "patch"),
    ("rsync", Probe::Bin("rsync"), "rsync"),
    ("strip", Probe::Bin("strip"), "binutils"),
    ("readelf", Probe::Bin("readelf"), "binutils"),
    ("musl-gcc", Probe::Bin("musl-gcc"), "musl-tools"),
    (
        "libelf headers",
        Probe::File("/usr/include/gelf.h"),
        "libelf-dev",
    ),
    (
        "libc headers",
        Probe::File("/usr/include/stdio.h"),
        "libc6-dev",
    ),
];

#[derive(Debug, Clone, Copy)]
enum Probe {
    Bin(&'static str),
    File(&'static str),
}

/// Whether `name` is an executable on `PATH`.
pub fn on_path(name: &str) -> bool {
    which(name).is_some()
}

/// Where `name` is on `PATH`, if it is.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The Debian packages whose tools are missing, in a stable order.
pub fn missing_packages() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for (what, probe, pkg) in TOOLS {
        let present = match probe {
            Probe::Bin(b) => on_path(b),
            Probe::File(f) => Path::new(f).exists(),
        };
        if !present && !out.iter().any(|(_, p)| p == pkg) {
            out.push((what, pkg));
        }
    }
    out
}

/// True when running as root on Debian (or a derivative with apt-get).
pub fn can_apt_install() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/etc/debian_version").exists() && on_path("apt-get")
}

/// Installs Debian packages with apt-get (root only), refreshing the package
/// lists once if the first attempt cannot find them.
pub fn apt_install(packages: &[&str], log: &Path, mode: crate::steps::ProgressMode) -> Result<()> {
    let install = |log: &Path| {
        crate::steps::run(
            mode,
            "apt-get install",
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            log,
        )
    };
    if install(log).is_ok() {
        return Ok(());
    }
    crate::steps::run(
        mode,
        "apt-get update",
        Command::new("apt-get").arg("update"),
        log,
    )?;
    install(log)
}

/// Checks the host tools; installs what is missing when allowed and possible.
pub fn ensure(allow_install: bool, log: &Path, mode: crate::steps::ProgressMode) -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    let pkgs: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    if allow_install && can_apt_install() {
        tracing::info!(packages = %pkgs.join(" "), "installing missing build tools with apt-get");
        eprintln!(
            "osso-guest: installing missing build tools: {}",
            pkgs.join(" ")
        );
        apt_install(&pkgs, log, mode)?;
        let still: Vec<&str> = missing_packages().iter().map(|(w, _)| *w).collect();
        if still.is_empty() {
            return Ok(());
        }
    }
    Err(Error::MissingTools {
        missing: missing
            .iter()
            .map(|(w, _)| *w)
            .collect::<Vec<_>>()
            .join(", "),
        install: format!("sudo apt-get install {}", pkgs.join(" ")),
    })
}
