//! The Osso initramfs: Toybox, its command links, `/init` and the few
//! directories and device nodes the kernel and init need, as a deterministic,
//! gzip-compressed cpio archive.

use std::io::Write;

use flate2::{Compression, GzBuilder};

use crate::cpio::Archive;
use crate::error::{Error, Result};

/// The committed init script.
pub const INIT: &str = include_str!("../rootfs/init");

/// Bumped when the layout below changes (part of the image key).
pub const LAYOUT_VERSION: u32 = 1;

/// Every entry carries this mtime (the epoch), so builds are byte-identical.
const MTIME: u32 = 0;

/// Assembles the archive: `/bin/toybox`, a `/bin/<cmd>` link per command,
/// `/init`, `/dev/console` (5,1: without it init has no stdin/stdout), and the
/// mount points init uses.
pub fn assemble(toybox: Vec<u8>, commands: &[String], init: &str) -> Result<Archive> {
    let mut a = Archive::new(MTIME);
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root"] {
        a.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    a.char_dev("dev/console", 0o600, 5, 1)?;
    a.char_dev("dev/null", 0o666, 1, 3)?;
    a.file("bin/toybox", 0o755, toybox)?;
    for cmd in commands {
        if cmd == "toybox" {
            continue;
        }
        if cmd.contains('/') {
            return Err(Error::Check(format!("odd Toybox command name {cmd:?}")));
        }
        a.symlink(&format!("bin/{cmd}"), "toybox")?;
    }
    a.file("init", 0o755, init.as_bytes().to_vec())?;
    Ok(a)
}

/// Gzip with a fixed header (no name, mtime 0), so equal input gives equal output.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    enc.write_all(data)
        .and_then(|_| enc.finish())
        .map_err(|e| Error::Check(format!("gzip: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn cmds() -> Vec<String> {
        ["sh", "ping", "toybox", "["]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn layout_has_init_console_and_links() {
        let a = assemble(b"TOYBOX".to_vec(), &cmds(), INIT).unwrap();
        let names: Vec<&str> = a.entries().map(|(p, _)| p).collect();
        for n in [
            "init",
            "dev/console",
            "bin/toybox",
            "bin/sh",
            "bin/ping",
            "bin/[",
            "proc",
            "sys",
        ] {
            assert!(names.contains(&n), "{n} missing: {names:?}");
        }
        assert!(!names.contains(&"bin/toybox/toybox"));
    }

    #[test]
    fn same_inputs_same_bytes_and_gzip_round_trips() {
        let a = gzip(
            &assemble(b"TOYBOX".to_vec(), &cmds(), INIT)
                .unwrap()
                .to_bytes()
                .unwrap(),
        )
        .unwrap();
        let b = gzip(
            &assemble(b"TOYBOX".to_vec(), &cmds(), INIT)
                .unwrap()
                .to_bytes()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(a, b);
        let c = gzip(
            &assemble(b"TOYBOX2".to_vec(), &cmds(), INIT)
                .unwrap()
                .to_bytes()
                .unwrap(),
        )
        .unwrap();
        assert_ne!(a, c);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&a[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.starts_with(b"070701"));
    }

    #[test]
    fn init_script_does_what_the_seed_did() {
        assert!(INIT.starts_with("#!/bin/sh\n"));
        for needle in [
            "ping_group_range",
            "10.0.2.15",
            "gw 10.0.2.2",
            "ping -c",
            "SUCCESS: ONLINE",
            "FAIL: offline",
            "osso.boot_timer=",
            "devmem",
            "reboot -f",
        ] {
            assert!(INIT.contains(needle), "init lacks {needle}");
        }
        // Never a public address: every dotted quad in the script is in 10.0.2.0/24 or loopback.
        for word in INIT.split(|c: char| !(c.is_ascii_digit() || c == '.')) {
            let parts: Vec<&str> = word.split('.').collect();
            if parts.len() == 4 && parts.iter().all(|p| !p.is_empty()) {
                assert!(
                    word.starts_with("10.0.2.")
                        || word.starts_with("127.")
                        || word.starts_with("255."),
                    "{word}"
                );
            }
        }
    }
}
