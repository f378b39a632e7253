//! The project's programs as level 1 runs them: the workspace built with
//! `cargo build --release --workspace --all-targets`, static (the
//! workspace's `.cargo/config.toml` builds for `x86_64-unknown-linux-gnu` with
//! `crt-static`, so the test command's own build is the one level 1 runs), and
//! the list of executables cargo reports.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::error::{Error, Result};

/// What a built executable is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A test binary (unit tests of a library or binary, or an integration test).
    Test,
    Example,
    Bench,
    Bin,
}

/// One executable of the workspace.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub kind: Kind,
    /// The cargo target's name (`api`, `ping`, `osso-vmm`; a library's unit
    /// tests carry the library's name).
    pub name: String,
    /// The package's name (`osso-sdk`).
    pub package: String,
    /// The package's directory (cargo runs tests there).
    pub package_dir: PathBuf,
    pub path: PathBuf,
}

impl Artifact {
    /// `package/name`, how the harness names it.
    pub fn label(&self) -> String {
        format!("{}/{}", self.package, self.name)
    }
}

/// The built program of this kind named `name`, or `package/name`.
pub fn find<'a>(artifacts: &'a [Artifact], kind: Kind, name: &str) -> Result<&'a Artifact> {
    let (package, bare) = match name.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, name),
    };
    artifacts
        .iter()
        .find(|a| a.kind == kind && a.name == bare && package.is_none_or(|p| a.package == p))
        .ok_or_else(|| Error::NoSuchProgram(format!("{kind:?} {name}")))
}

#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    package_id: String,
    #[serde(default)]
    manifest_path: Option<PathBuf>,
    #[serde(default)]
    target: Option<TargetInfo>,
    #[serde(default)]
    profile: Option<Profile>,
    #[serde(default)]
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct TargetInfo {
    kind: Vec<String>,
    name: String,
}

#[derive(Deserialize)]
struct Profile {
    test: bool,
}

/// Builds the workspace (release, all targets) and lists its executables.
/// Cargo rebuilds only what changed.
pub fn build(workspace: &Path) -> Result<Vec<Artifact>> {
    eprintln!("osso-nested: cargo build --release --workspace --all-targets (static)");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--workspace",
            "--all-targets",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(workspace)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::io("run cargo", e))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: "cargo build".into(),
            detail: format!("{}", out.status),
        });
    }
    let mut artifacts = parse_messages(&String::from_utf8_lossy(&out.stdout));
    artifacts.sort_by(|a, b| a.path.cmp(&b.path));
    artifacts.dedup_by(|a, b| a.path == b.path);
    for a in &artifacts {
        check_static(&a.path)?;
    }
    Ok(artifacts)
}

fn parse_messages(text: &str) -> Vec<Artifact> {
    let mut v = Vec::new();
    for line in text.lines() {
        let Ok(m) = serde_json::from_str::<Message>(line) else {
            continue;
        };
        if m.reason != "compiler-artifact" {
            continue;
        }
        let (Some(exe), Some(t), Some(p)) = (m.executable, m.target, m.profile) else {
            continue;
        };
        let kind_of = |k: &str| t.kind.iter().any(|x| x == k);
        // A bench is built with `profile.test` set (cargo builds it as a
        // test harness target), so its kind is looked at first.
        let kind = if kind_of("bench") {
            Kind::Bench
        } else if p.test {
            Kind::Test
        } else if kind_of("example") {
            Kind::Example
        } else if kind_of("bin") {
            Kind::Bin
        } else {
            continue;
        };
        let package = package_name(&m.package_id);
        let package_dir = m
            .manifest_path
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        v.push(Artifact {
            kind,
            name: t.name,
            package,
            package_dir,
            path: exe,
        });
    }
    v
}

/// The package name in a cargo package id (`path+file:///w/sdk#osso-sdk@0.1.0`,
/// or the older `osso-sdk 0.1.0 (path+file:///w/sdk)`).
fn package_name(id: &str) -> String {
    if let Some((_, rest)) = id.rsplit_once('#') {
        return rest.split('@').next().unwrap_or(rest).to_string();
    }
    id.split(' ').next().unwrap_or(id).to_string()
}

/// Level 1 has no shared libraries for the project's programs: each must be
/// static (no ELF interpreter).
pub fn check_static(path: &Path) -> Result<()> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let bad = |detail: &str| Error::BadArtifact {
        path: path.to_path_buf(),
        detail: detail.into(),
    };
    let elf = goblin::elf::Elf::parse(&bytes).map_err(|e| {
        bad(&format!(
            "not a readable ELF file (truncated or corrupt?): {e}"
        ))
    })?;
    if !elf.is_64 {
        return Err(bad("not a 64-bit ELF file"));
    }
    if elf.interpreter.is_some() {
        return Err(bad(
            "dynamically linked: build with the workspace's .cargo/config.toml (static, target x86_64-unknown-linux-gnu)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_messages_give_every_kind_of_executable() {
        let text = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/sdk#osso-sdk@0.1.0","manifest_path":"/w/sdk/Cargo.toml","target":{"kind":["test"],"name":"api"},"profile":{"test":true},"executable":"/w/target/x/release/deps/api-1"}
{"reason":"compiler-artifact","package_id":"path+file:///w/vmm#osso-vmm@0.1.0","manifest_path":"/w/vmm/Cargo.toml","target":{"kind":["lib"],"name":"osso_vmm"},"profile":{"test":true},"executable":"/w/target/x/release/deps/osso_vmm-2"}
{"reason":"compiler-artifact","package_id":"path+file:///w/vmm#osso-vmm@0.1.0","manifest_path":"/w/vmm/Cargo.toml","target":{"kind":["lib"],"name":"osso_vmm"},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","package_id":"path+file:///w#osso@0.1.0","manifest_path":"/w/Cargo.toml","target":{"kind":["example"],"name":"ping"},"profile":{"test":false},"executable":"/w/target/x/release/examples/ping"}
{"reason":"compiler-artifact","package_id":"osso 0.1.0 (path+file:///w)","manifest_path":"/w/Cargo.toml","target":{"kind":["bench"],"name":"boot"},"profile":{"test":true},"executable":"/w/target/x/release/deps/boot-3"}
{"reason":"compiler-artifact","package_id":"path+file:///w/vmm#osso-vmm@0.1.0","manifest_path":"/w/vmm/Cargo.toml","target":{"kind":["bin"],"name":"osso-vmm"},"profile":{"test":false},"executable":"/w/target/x/release/osso-vmm"}
{"reason":"build-finished","success":true}
not json"#;
        let a = parse_messages(text);
        let got: Vec<(Kind, String, String)> = a
            .iter()
            .map(|a| (a.kind, a.label(), a.package_dir.display().to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Kind::Test, "osso-sdk/api".into(), "/w/sdk".into()),
                (Kind::Test, "osso-vmm/osso_vmm".into(), "/w/vmm".into()),
                (Kind::Example, "osso/ping".into(), "/w".into()),
                (Kind::Bench, "osso/boot".into(), "/w".into()),
                (Kind::Bin, "osso-vmm/osso-vmm".into(), "/w/vmm".into()),
            ]
        );
    }

    #[test]
    fn a_dynamic_program_is_refused_and_garbage_too() {
        // A minimal ELF64 header with one program header of the given type.
        let dir = tempfile::tempdir().unwrap();
        let dynamic = dir.path().join("dynamic");
        std::fs::write(
            &dynamic,
            osso_testkit::elf::dynamic("/lib64/ld-linux-x86-64.so.2"),
        )
        .unwrap();
        let err = check_static(&dynamic).unwrap_err().to_string();
        assert!(err.contains("dynamically linked"), "{err}");
        let loadable = dir.path().join("static");
        std::fs::write(&loadable, osso_testkit::elf::exec(0x1000, &[0xf4], 1, &[])).unwrap();
        check_static(&loadable).unwrap();
        // This test binary is built by the workspace: static.
        check_static(&std::env::current_exe().unwrap()).unwrap();
        let mut truncated = osso_testkit::elf::exec(0x1000, &[0xf4], 1, &[]);
        truncated[0x38..0x3a].copy_from_slice(&9u16.to_le_bytes()); // e_phnum
        std::fs::write(&loadable, truncated).unwrap();
        assert!(check_static(&loadable)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"#!/bin/sh\necho hi\n").unwrap();
        let err = check_static(&junk).unwrap_err().to_string();
        assert!(err.contains("not a readable ELF file"), "{err}");
    }
}
