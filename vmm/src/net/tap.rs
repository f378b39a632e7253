//! The `tap:NAME` backend: a Linux TAP device.
//!
//! Opens `/dev/net/tun` and attaches to the TAP interface `NAME`
//! (`TUNSETIFF` with `IFF_TAP | IFF_NO_PI`), creating it if it does not exist.
//! `IFF_VNET_HDR` is **off**: frames cross the fd as plain Ethernet frames,
//! matching the device, which negotiates no offloads and strips/adds the
//! virtio-net header itself.
//!
//! Needs root or `CAP_NET_ADMIN` (unless the device already exists and is
//! owned by the caller's user); without them the error says so. The TAP is
//! attached to, never configured: addresses, bridge membership and link state
//! are the host administrator's (`ip link set NAME up`, `ip addr add ...`).
//! Tests must create TAP devices only inside a network namespace they made.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use super::NetBackend;

const TUN_PATH: &str = "/dev/net/tun";
/// `_IOW('T', 202, int)`.
/// Longest interface name (IFNAMSIZ - 1).
const MAX_NAME_LEN: usize = 15;

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP device name {0:?}: 1 to 15 characters, no `/`, whitespace or `:`")]
    InvalidName(String),
    #[error("{TUN_PATH} does not exist: load the tun module (`modprobe tun`)")]
    NoTunDevice,
    #[error("opening {TUN_PATH}: {0}")]
    OpenTun(io::Error),
    #[error(
        "attaching to TAP device {name:?} needs root or CAP_NET_ADMIN \
         (or an existing TAP owned by this user: `ip tuntap add {name} mode tap user $USER`): {source}"
    )]
    PermissionDenied { name: String, source: io::Error },
    #[error("TUNSETIFF for TAP device {name:?}: {source}")]
    SetIff { name: String, source: io::Error },
}

/// Checks a Linux interface name.
pub fn validate_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::InvalidName(name.to_string()))
    }
}

/// An open TAP device (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or creates) the TAP device `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        validate_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => TapError::NoTunDevice,
                _ => TapError::OpenTun(e),
            })?;
        // The flags fit a c_short (the ifreq field TUNSETIFF reads).
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        let mut ifr = libc::ifreq {
            ifr_name: [0; libc::IFNAMSIZ],
            ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: flags },
        };
        // validate_name: at most 15 bytes, so the name stays NUL-terminated.
        for (d, b) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = b as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `ifr` is a
        // live libc::ifreq (the kernel's layout), and `file` is an open
        // /dev/net/tun descriptor.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    TapError::PermissionDenied { name, source }
                }
                _ => TapError::SetIff { name, source },
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn ready_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("TAP took {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("tap0").is_ok());
        assert!(validate_name("osso-tap_15chars").is_err()); // 16 chars
        assert!(validate_name("osso-tap_15char").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "a:b", "täp"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(Tap::open("a/b"), Err(TapError::InvalidName(_))));
    }

    /// Creates a TAP device inside a network namespace private to a test
    /// thread (never on the host's network). Needs root and /dev/net/tun; otherwise
    /// skipped, or failed under `OSSO_REQUIRE_E2E=1` (`osso_testkit`).
    #[test]
    fn tap_in_private_netns() {
        let r = std::thread::spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) only changes this thread's network
            // namespace; the thread ends with the test and nothing else runs on it.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "unshare(CLONE_NEWNET) failed ({}): needs root",
                    io::Error::last_os_error()
                ));
            }
            match Tap::open("osso-t0") {
                Ok(mut t) => {
                    assert_eq!(t.name(), "osso-t0");
                    assert!(t.ready_fd().is_some());
                    let mut buf = [0u8; 2048];
                    // The interface is down: nothing to read, never blocks.
                    assert_eq!(
                        t.recv(&mut buf).unwrap_err().kind(),
                        io::ErrorKind::WouldBlock
                    );
                    Ok(())
                }
                Err(TapError::NoTunDevice) => Err("no /dev/net/tun".to_string()),
                Err(e) => panic!("opening a TAP in a private netns: {e}"),
            }
        })
        .join()
        .unwrap();
        if let Err(reason) = r {
            osso_testkit::skip_or_fail("tap_in_private_netns", reason);
        }
    }
}
