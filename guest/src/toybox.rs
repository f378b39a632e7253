//! Toybox: a static userland built with `musl-gcc` against the kernel's own
//! sanitised headers, with only the commands the image needs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::kernel::{check_config, Kernel};
use crate::sources::{self, Resolved};
use crate::steps::{self, ProgressMode};

/// The committed Toybox command list (a kconfig fragment).
pub const FRAGMENT: &str = include_str!("../toybox/osso.config");

/// A built Toybox.
#[derive(Debug, Clone)]
pub struct Toybox {
    pub key: String,
    pub version: String,
    pub binary: PathBuf,
    /// The commands the binary provides, as it lists them.
    pub commands: Vec<String>,
}

/// The commands the fragment enables (`CONFIG_NETCAT=y` is `nc`, the rest
/// are their lower-cased names).
pub fn required_commands() -> Vec<String> {
    FRAGMENT
        .lines()
        .filter_map(|l| l.trim().strip_prefix("CONFIG_")?.strip_suffix("=y"))
        .map(|name| match name {
            "NETCAT" => "nc".to_string(),
            other => other.to_ascii_lowercase(),
        })
        .collect()
}

/// Builds (or reuses) Toybox.
pub fn build(
    src: &Resolved,
    key: &str,
    kernel: &Kernel,
    root: &Path,
    mode: ProgressMode,
) -> Result<Toybox> {
    let key = key.to_string();
    let tree = root.join("build").join(format!("toybox-{key}"));
    let binary = tree.join("toybox");
    let done = tree.join(".osso-built");
    if !done.exists() {
        if tree.exists() {
            fs::remove_dir_all(&tree).map_err(|e| Error::io(&tree, e))?;
        }
        sources::unpack(src, &tree, mode, "toybox")?;
        let log = tree.join("osso-build.log");
        let fragment = tree.join("osso.config");
        fs::write(&fragment, FRAGMENT).map_err(|e| Error::io(&fragment, e))?;
        steps::run(
            mode,
            "toybox: allnoconfig + commands",
            Command::new("make")
                .arg(format!("KCONFIG_ALLCONFIG={}", fragment.display()))
                .arg("allnoconfig")
                .current_dir(&tree),
            &log,
        )?;
        let cfg_path = tree.join(".config");
        let cfg = fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let missing = check_config(FRAGMENT, &cfg);
        if !missing.is_empty() {
            return Err(Error::ConfigDropped(missing));
        }
        steps::run(
            mode,
            "toybox: make (musl, static)",
            Command::new("make")
                .arg("toybox")
                .env("CC", "musl-gcc")
                .env("LDFLAGS", "--static")
                .env("CFLAGS", format!("-I{} -Os", kernel.headers.display()))
                .current_dir(&tree),
            &log,
        )?;
        fs::write(&done, b"").map_err(|e| Error::io(&done, e))?;
    }
    let version = read_version(&tree)?;
    let listed = steps::capture(&mut Command::new(&binary))
        .ok_or_else(|| Error::Check(format!("{} does not run", binary.display())))?;
    let commands = parse_command_list(&listed);
    let missing: Vec<String> = required_commands()
        .into_iter()
        .filter(|c| !commands.contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(Error::MissingCommands(missing));
    }
    Ok(Toybox {
        key,
        version,
        binary,
        commands,
    })
}

/// The commands in the list `toybox` prints when run with no arguments.
pub fn parse_command_list(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .split_whitespace()
        .filter(|w| {
            w.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '[' || c == '-' || c == '_')
        })
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The `TOYBOX_VERSION` string from the tree's `toys.h`.
fn read_version(tree: &Path) -> Result<String> {
    let path = tree.join("toys.h");
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("#define TOYBOX_VERSION"))
        .find_map(|rest| rest.split('"').nth(1).map(str::to_string))
        .ok_or_else(|| Error::Check(format!("no TOYBOX_VERSION in {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_commands_cover_the_issue_list() {
        let req = required_commands();
        for c in [
            "sh", "mount", "mkdir", "cat", "echo", "ls", "ifconfig", "route", "ping", "uname",
            "devmem", "nc", "sleep", "reboot", "test", "true", "false",
        ] {
            assert!(req.contains(&c.to_string()), "{c} missing from {req:?}");
        }
    }

    #[test]
    fn command_list_parsing() {
        let out = "[ cat echo false\nls nc sh\ttest true\n";
        assert_eq!(
            parse_command_list(out),
            ["[", "cat", "echo", "false", "ls", "nc", "sh", "test", "true"]
        );
    }
}
