//! Network backends for virtio-net: the user-mode stack, TAP, none.
//!
//! A backend is what the virtio-net device (`crate::virtio::net`) exchanges
//! Ethernet frames with. Frames cross the [`NetBackend`] trait *without* the
//! virtio-net header: the device strips it on transmit and adds it on receive.
//!
//! | backend | privileges | what the guest reaches |
//! | --- | --- | --- |
//! | [`user`] (default) | none | the gateway 10.0.2.2 only (ARP, ICMP echo), host TCP forwarded to guest ports, and the host's **loopback** on the ports the caller allowed. **No egress**: every other packet is dropped and counted. |
//! | [`tap`] (`tap:NAME`) | root or `CAP_NET_ADMIN` | whatever the TAP device is bridged or routed to |
//! | `none` | none | nothing: the device exists, frames sent are dropped |
//!
//! The CLI (`--net none|user|tap:NAME`, `--forward HOST_PORT:GUEST_PORT`)
//! parses into [`NetBackendConfig`] and [`PortForward`] through `FromStr`;
//! [`NetConfig::open`] turns a configuration into a backend (plus, for `user`,
//! the [`user::UserNetHandle`] host code uses to connect to, forward to and
//! ping the guest).

pub mod tap;
pub mod user;

use std::fmt;
use std::io;
use std::os::unix::io::RawFd;
use std::str::FromStr;

pub use user::{UserNet, UserNetBackend, UserNetConfig, UserNetHandle, UserNetStats};

/// Largest Ethernet frame (without the virtio-net header) a backend exchanges
/// with the device: 64 KiB of payload plus an Ethernet header, as in Firecracker
/// (65562 bytes with the 12-byte virtio-net header).
pub const MAX_FRAME_LEN: usize = 65550;

/// A source and sink of Ethernet frames for virtio-net.
///
/// Called from the device thread only. `recv` must never block: it returns
/// `ErrorKind::WouldBlock` when no frame is waiting. The device registers
/// [`NetBackend::ready_fd`] with epoll **edge-triggered** and, after each
/// wake-up, calls `recv` until `WouldBlock` (or until the guest has no receive
/// buffers left, in which case it resumes when the guest adds some).
pub trait NetBackend: Send {
    /// A file descriptor that becomes readable when frames may be waiting
    /// (a TAP fd, or an `EventFd` written by the user stack). `None`: this
    /// backend never has frames for the guest.
    fn ready_fd(&self) -> Option<RawFd>;

    /// Sends one Ethernet frame from the guest. A frame the backend cannot
    /// take is an error; the device counts it and drops the frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;

    /// Receives one Ethernet frame for the guest into `buf`, returning its
    /// length; `WouldBlock` when none is waiting. A frame longer than `buf`
    /// may be truncated or dropped by the backend.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// The `none` backend: frames from the guest are dropped, none arrive.
#[derive(Debug, Default)]
pub struct NoneBackend;

impl NetBackend for NoneBackend {
    fn ready_fd(&self) -> Option<RawFd> {
        None
    }

    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// Errors parsing network options or opening a backend.
#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    #[error("invalid --net value {0:?}: expected `none`, `user` or `tap:NAME`")]
    InvalidBackend(String),
    #[error("invalid TAP device name {0:?}: 1 to 15 characters, no `/`, whitespace or `:`")]
    InvalidTapName(String),
    #[error("invalid --forward value {0:?}: expected HOST_PORT:GUEST_PORT, ports 1-65535")]
    InvalidForward(String),
    #[error("invalid MAC address {0:?}: expected six hex bytes such as 52:54:00:12:34:56")]
    InvalidMac(String),
    #[error("port forwards need the `user` network backend (the backend is `{0}`)")]
    ForwardsNeedUser(String),
    #[error("opening TAP device: {0}")]
    Tap(#[from] tap::TapError),
    #[error("starting the user-mode network: {0}")]
    User(#[from] user::UserNetError),
}

/// Which backend a VM's virtio-net uses (`--net`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetBackendConfig {
    /// No network traffic at all.
    None,
    /// The rootless user-mode stack (default).
    #[default]
    User,
    /// A TAP device of this name, opened or created.
    Tap(String),
}

impl FromStr for NetBackendConfig {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "user" => Ok(Self::User),
            _ => match s.strip_prefix("tap:") {
                Some(name) => {
                    tap::validate_name(name)
                        .map_err(|_| NetConfigError::InvalidTapName(name.to_string()))?;
                    Ok(Self::Tap(name.to_string()))
                }
                None => Err(NetConfigError::InvalidBackend(s.to_string())),
            },
        }
    }
}

impl fmt::Display for NetBackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::User => write!(f, "user"),
            Self::Tap(name) => write!(f, "tap:{name}"),
        }
    }
}

/// A host TCP port on 127.0.0.1 forwarded to a guest TCP port (`--forward`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub host_port: u16,
    pub guest_port: u16,
}

impl FromStr for PortForward {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetConfigError::InvalidForward(s.to_string());
        let (h, g) = s.split_once(':').ok_or_else(bad)?;
        let host_port: u16 = h.trim().parse().map_err(|_| bad())?;
        let guest_port: u16 = g.trim().parse().map_err(|_| bad())?;
        if host_port == 0 || guest_port == 0 {
            return Err(bad());
        }
        Ok(Self {
            host_port,
            guest_port,
        })
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host_port, self.guest_port)
    }
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// QEMU's default guest MAC, 52:54:00:12:34:56.
    pub const DEFAULT_GUEST: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    /// A random, locally administered, unicast MAC (one per VM). Falls back
    /// to a value derived from the process id and the clock if
    /// `/dev/urandom` cannot be read.
    pub fn random_local() -> MacAddr {
        let mut b = [0u8; 6];
        let ok = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| io::Read::read_exact(&mut f, &mut b))
            .is_ok();
        if !ok {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ (u64::from(std::process::id()) << 24);
            b.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        // Locally administered (bit 1), unicast (bit 0 clear).
        b[0] = (b[0] | 0x02) & !0x01;
        MacAddr(b)
    }
}

impl Default for MacAddr {
    fn default() -> Self {
        Self::DEFAULT_GUEST
    }
}

impl FromStr for MacAddr {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetConfigError::InvalidMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A VM's whole network configuration, as the CLI or the SDK gives it.
#[derive(Debug, Clone, Default)]
pub struct NetConfig {
    /// `--net` (default `user`).
    pub backend: NetBackendConfig,
    /// `--forward HOST_PORT:GUEST_PORT`, user backend only.
    pub forwards: Vec<PortForward>,
    /// Host loopback ports the guest may connect to at 10.0.2.2, user
    /// backend only. Empty by default: no egress at all.
    pub allowed_host_ports: Vec<u16>,
    /// The guest's MAC (offered through `VIRTIO_NET_F_MAC`).
    pub mac: MacAddr,
}

/// A backend opened from a [`NetConfig`].
pub struct OpenedBackend {
    /// Hand this to `crate::virtio::net::NetDevice::new`.
    pub backend: Box<dyn NetBackend>,
    /// For `user`: the host side of the user network (connect, forward,
    /// ping the guest, stats). Keep it as long as the VM lives.
    pub user: Option<UserNetHandle>,
}

impl fmt::Debug for OpenedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedBackend")
            .field("user", &self.user.is_some())
            .finish()
    }
}

impl NetConfig {
    /// Opens the configured backend. For `user` this starts the stack's
    /// thread and binds the `--forward` listeners on 127.0.0.1.
    pub fn open(&self) -> Result<OpenedBackend, NetConfigError> {
        if !self.forwards.is_empty() && self.backend != NetBackendConfig::User {
            return Err(NetConfigError::ForwardsNeedUser(self.backend.to_string()));
        }
        match &self.backend {
            NetBackendConfig::None => Ok(OpenedBackend {
                backend: Box::new(NoneBackend),
                user: None,
            }),
            NetBackendConfig::Tap(name) => Ok(OpenedBackend {
                backend: Box::new(tap::Tap::open(name)?),
                user: None,
            }),
            NetBackendConfig::User => {
                let cfg = UserNetConfig {
                    forwards: self.forwards.clone(),
                    allowed_host_ports: self.allowed_host_ports.clone(),
                };
                let (backend, handle) = UserNet::start(cfg)?;
                Ok(OpenedBackend {
                    backend: Box::new(backend),
                    user: Some(handle),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_backend() {
        assert_eq!(
            "none".parse::<NetBackendConfig>().unwrap(),
            NetBackendConfig::None
        );
        assert_eq!(
            "user".parse::<NetBackendConfig>().unwrap(),
            NetBackendConfig::User
        );
        assert_eq!(
            "tap:osso0".parse::<NetBackendConfig>().unwrap(),
            NetBackendConfig::Tap("osso0".into())
        );
        assert!(matches!(
            "tap:".parse::<NetBackendConfig>(),
            Err(NetConfigError::InvalidTapName(_))
        ));
        assert!(matches!(
            "tap:a/b".parse::<NetBackendConfig>(),
            Err(NetConfigError::InvalidTapName(_))
        ));
        assert!(matches!(
            "tap:0123456789abcdef".parse::<NetBackendConfig>(),
            Err(NetConfigError::InvalidTapName(_))
        ));
        let e = "slirp".parse::<NetBackendConfig>().unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
        assert_eq!(NetBackendConfig::Tap("t0".into()).to_string(), "tap:t0");
        assert_eq!(NetBackendConfig::default(), NetBackendConfig::User);
    }

    #[test]
    fn parse_forward() {
        assert_eq!(
            "8080:80".parse::<PortForward>().unwrap(),
            PortForward {
                host_port: 8080,
                guest_port: 80
            }
        );
        for bad in ["80", "0:80", "80:0", "a:b", "70000:80", "1:2:3", ""] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad} accepted");
        }
        let e = "x".parse::<PortForward>().unwrap_err().to_string();
        assert!(e.contains("HOST_PORT:GUEST_PORT"), "{e}");
    }

    #[test]
    fn parse_mac() {
        let m: MacAddr = "52:54:00:ab:CD:ef".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad} accepted");
        }
        let r = MacAddr::random_local();
        assert_eq!(r.0[0] & 0x03, 0x02, "locally administered unicast");
    }

    #[test]
    fn forwards_need_user_backend() {
        let cfg = NetConfig {
            backend: NetBackendConfig::None,
            forwards: vec!["8080:80".parse().unwrap()],
            ..NetConfig::default()
        };
        assert!(matches!(
            cfg.open(),
            Err(NetConfigError::ForwardsNeedUser(_))
        ));
    }

    #[test]
    fn none_backend() {
        let mut b = NoneBackend;
        assert!(b.ready_fd().is_none());
        assert!(b.send(&[0u8; 60]).is_ok());
        let mut buf = [0u8; 64];
        assert_eq!(
            b.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
