//! The `user` backend: a rootless network stack inside the VMM (smoltcp).
//!
//! The stack is the guest's gateway, **10.0.2.2** (MAC 52:55:0a:00:02:02), for
//! a guest at **10.0.2.15/24** (QEMU's user-networking addresses). It:
//!
//! * answers ARP for 10.0.2.2 and ICMP echo (ping) to 10.0.2.2;
//! * lets host code reach guest TCP ports: [`UserNetHandle::connect`] returns
//!   a connected `UnixStream` whose bytes are relayed to and from the guest
//!   port, and [`UserNetHandle::forward`] (the CLI's `--forward H:G`)
//!   listens on **127.0.0.1**:H and relays each accepted connection likewise;
//! * lets host code ping the guest ([`UserNetHandle::ping_guest`]), from
//!   10.0.2.2, and get the round trip;
//! * lets the guest open TCP connections to 10.0.2.2:P, relayed to the
//!   host's **127.0.0.1**:P, only for the ports P the caller allowed
//!   ([`UserNetConfig::allowed_host_ports`], [`UserNetHandle::allow_host_port`]).
//!   The stack connects to the host port before answering the guest's SYN,
//!   so a closed host port is a reset for the guest.
//!
//! **No egress, by default and by design** (the whole policy is
//! `user/policy.rs`, short enough to review alone): a packet for any address other
//! than 10.0.2.2 (the Internet, the host's LAN, other guests) is dropped and
//! counted ([`UserNetStats::dropped_egress`]); so is UDP (no DNS, no DHCP:
//! give the guest a static address, e.g. `ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off`),
//! and a TCP SYN to a port not allowed gets a reset. The only host sockets
//! this module ever opens are on 127.0.0.1. That is a security property of
//! Osso's default network.
//!
//! Threads: [`UserNet::start`] spawns one thread ("osso-usernet") that owns
//! the smoltcp interface and the host sockets and sleeps in `poll(2)`. The
//! virtio-net device thread exchanges frames with it through two bounded
//! queues ([`UserNetBackend`]); host code talks to it through
//! [`UserNetHandle`] (cloneable, `Send + Sync`). The thread stops when the
//! backend and every handle are dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::{icmp, tcp};
use smoltcp::time::{Duration as SDuration, Instant as SInstant};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr,
};
use tracing::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{NetBackend, PortForward};

/// The gateway's (the stack's) address.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest's address (configure the guest with it).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The network's prefix length.
pub const PREFIX_LEN: u8 = 24;
/// Kernel command line that parks a Linux guest on this network without any
/// guest user space (what a PVM host allows; see shared/notes): the kernel
/// configures eth0 as [`GUEST_IP`] itself (`ip=`), finds no init in the
/// initramfs (`rdinit=`), and sleeps before looking for a root device
/// (`rootdelay=`, about 11 days), answering ARP, ping and TCP (resets) all
/// along. `rootdelay` rather than `rootwait`: `rootwait` polls every 5 ms,
/// which keeps an idle clone busy; measured here, pings to a restored clone
/// took 10 ms with `rootdelay` against 15-20 ms with `rootwait`.
pub const PARKED_KERNEL_CMDLINE: &str =
    "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off rdinit=/nonexistent rootdelay=1000000 root=/dev/vda";
/// The gateway's MAC.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

/// Frames queued in either direction before new ones are dropped.
const MAX_QUEUED_FRAMES: usize = 1024;
/// TCP buffers per connection, each direction.
const TCP_BUF: usize = 64 * 1024;
/// Simultaneous relayed TCP connections.
const MAX_CONNS: usize = 1024;
/// ICMP identifier of [`UserNetHandle::ping_guest`]'s echo requests.
const PING_IDENT: u16 = 0x4f53;
/// Payload of those requests (as `ping`'s default 56 bytes).
const PING_PAYLOAD: usize = 56;
/// First local port of connections to the guest.
const EPHEMERAL_FIRST: u16 = 49152;
/// A TCP connection with no progress for this long is aborted.
const TCP_TIMEOUT: SDuration = SDuration::from_secs(60);

/// Configuration of the user network.
#[derive(Debug, Clone, Default)]
pub struct UserNetConfig {
    /// Host 127.0.0.1 ports forwarded to guest ports (listening from start).
    pub forwards: Vec<PortForward>,
    /// Host loopback ports the guest may connect to at 10.0.2.2.
    pub allowed_host_ports: Vec<u16>,
}

/// Errors starting the user network or using its handle.
#[derive(Debug, thiserror::Error)]
pub enum UserNetError {
    #[error("creating an EventFd: {0}")]
    EventFd(io::Error),
    #[error("listening on 127.0.0.1:{port} for a forward: {source}")]
    Bind { port: u16, source: io::Error },
    #[error("starting the network thread: {0}")]
    Thread(io::Error),
}

/// Counters of the user network (see [`UserNetHandle::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserNetStats {
    /// Frames from the guest accepted into the stack.
    pub frames_from_guest: u64,
    /// Frames the stack sent to the guest.
    pub frames_to_guest: u64,
    /// IPv4 packets for any address other than 10.0.2.2: no egress.
    pub dropped_egress: u64,
    /// Frames of protocols the gateway does not serve (UDP, IPv6, multicast, ...).
    pub dropped_unsupported: u64,
    /// ARP packets not asking for 10.0.2.2.
    pub dropped_arp: u64,
    /// Frames too short or malformed.
    pub dropped_malformed: u64,
    /// Frames dropped because a queue was full.
    pub dropped_queue_full: u64,
    /// Guest SYNs to 10.0.2.2 ports not allowed (answered with a reset).
    pub tcp_refused: u64,
    /// Allowed guest connections whose host loopback port refused.
    pub host_connect_failed: u64,
    /// TCP connections relayed (both directions), since start.
    pub connections: u64,
}

#[derive(Default)]
struct Counters {
    frames_from_guest: AtomicU64,
    frames_to_guest: AtomicU64,
    dropped_egress: AtomicU64,
    dropped_unsupported: AtomicU64,
    dropped_arp: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_queue_full: AtomicU64,
    tcp_refused: AtomicU64,
    host_connect_failed: AtomicU64,
    connections: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

enum Command {
    Connect {
        guest_port: u16,
        host: UnixStream,
        reply: mpsc::Sender<io::Result<()>>,
    },
    Forward {
        listener: TcpListener,
        guest_port: u16,
    },
    Allow {
        port: u16,
    },
    Ping {
        seq: u16,
        reply: mpsc::Sender<io::Result<Duration>>,
    },
    LearnGuest {
        mac: [u8; 6],
    },
}

struct Shared {
    from_guest: Mutex<VecDeque<Vec<u8>>>,
    to_guest: Mutex<VecDeque<Vec<u8>>>,
    /// Readable while `to_guest` may hold frames (the device's ready fd).
    to_guest_evt: EventFd,
    /// Wakes the stack thread: frames from the guest, commands, stop.
    wake: EventFd,
    commands: Mutex<VecDeque<Command>>,
    allowed: RwLock<BTreeSet<u16>>,
    stop: AtomicBool,
    c: Counters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn command(&self, cmd: Command) {
        lock(&self.commands).push_back(cmd);
        self.wake_up();
    }

    fn wake_up(&self) {
        if let Err(e) = self.wake.write(1) {
            warn!("user network: waking the stack: {e}");
        }
    }
}

/// Stops and joins the stack thread when the last user goes.
struct Owner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake_up();
        if let Some(t) = lock(&self.thread).take() {
            if t.join().is_err() {
                warn!("user network: the stack thread panicked");
            }
        }
    }
}

/// Starts user networks.
#[derive(Debug)]
pub struct UserNet;

impl UserNet {
    /// Starts the stack's thread, binds `cfg.forwards` on 127.0.0.1 and
    /// allows `cfg.allowed_host_ports`. Returns the backend to give to
    /// `NetDevice::new` and the handle host code keeps.
    pub fn start(cfg: UserNetConfig) -> Result<(UserNetBackend, UserNetHandle), UserNetError> {
        let shared = Arc::new(Shared {
            from_guest: Mutex::default(),
            to_guest: Mutex::default(),
            to_guest_evt: EventFd::new(EFD_NONBLOCK).map_err(UserNetError::EventFd)?,
            wake: EventFd::new(EFD_NONBLOCK).map_err(UserNetError::EventFd)?,
            commands: Mutex::default(),
            allowed: RwLock::default(),
            stop: AtomicBool::new(false),
            c: Counters::default(),
        });
        let stack = Stack::new(shared.clone());
        let thread = std::thread::Builder::new()
            .name("osso-usernet".into())
            .spawn(move || stack.run())
            .map_err(UserNetError::Thread)?;
        let owner = Arc::new(Owner {
            shared: shared.clone(),
            thread: Mutex::new(Some(thread)),
        });
        let handle = UserNetHandle {
            shared: shared.clone(),
            _owner: owner.clone(),
        };
        for f in &cfg.forwards {
            handle
                .forward(f.host_port, f.guest_port)
                .map_err(|source| UserNetError::Bind {
                    port: f.host_port,
                    source,
                })?;
        }
        for &p in &cfg.allowed_host_ports {
            handle.allow_host_port(p);
        }
        Ok((
            UserNetBackend {
                shared,
                _owner: owner,
            },
            handle,
        ))
    }
}

/// The device side of the user network (a [`NetBackend`]).
pub struct UserNetBackend {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl std::fmt::Debug for UserNetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserNetBackend")
    }
}

impl NetBackend for UserNetBackend {
    fn ready_fd(&self) -> Option<RawFd> {
        Some(self.shared.to_guest_evt.as_raw_fd())
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // Policy drops are not errors: they are counted in the stats.
        if !admit(frame, &self.shared) {
            return Ok(());
        }
        {
            let mut q = lock(&self.shared.from_guest);
            if q.len() >= MAX_QUEUED_FRAMES {
                inc(&self.shared.c.dropped_queue_full);
                return Ok(());
            }
            q.push_back(frame.to_vec());
        }
        inc(&self.shared.c.frames_from_guest);
        self.shared.wake_up();
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let pop = |buf: &mut [u8]| {
            lock(&self.shared.to_guest).pop_front().map(|f| {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                n
            })
        };
        if let Some(n) = pop(buf) {
            return Ok(n);
        }
        // Empty: clear the EventFd, then look again in case a frame came in
        // between (the stack writes the EventFd after queueing).
        let _ = self.shared.to_guest_evt.read();
        pop(buf).ok_or_else(|| io::ErrorKind::WouldBlock.into())
    }
}

/// Applies the no-egress policy ([`policy::admit`]) to a frame from the
/// guest and counts what it refuses.
fn admit(frame: &[u8], shared: &Shared) -> bool {
    use policy::{Dropped, Verdict};
    let c = &shared.c;
    let verdict = policy::admit(frame, |port| {
        shared
            .allowed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&port)
    });
    match verdict {
        Verdict::Admit => true,
        Verdict::AdmitRefused => {
            // The stack answers it with a reset.
            inc(&c.tcp_refused);
            true
        }
        Verdict::Drop(why) => {
            inc(match why {
                Dropped::Malformed => &c.dropped_malformed,
                Dropped::Egress => &c.dropped_egress,
                Dropped::Arp => &c.dropped_arp,
                Dropped::Unsupported => &c.dropped_unsupported,
            });
            false
        }
    }
}

/// The host side of a user network: connect to / forward to / ping the
/// guest, allow host ports, read the counters. Cheap to clone.
#[derive(Clone)]
pub struct UserNetHandle {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl std::fmt::Debug for UserNetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserNetHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl UserNetHandle {
    /// Opens a TCP connection from 10.0.2.2 to the guest's `guest_port` and
    /// returns, once the guest accepted it, a `UnixStream` whose bytes are
    /// relayed to and from that connection (EOF on either side is relayed as
    /// a FIN). Errors: `ConnectionRefused` if the guest answered with a
    /// reset (no listener), `TimedOut` if it did not answer within `timeout`.
    pub fn connect(&self, guest_port: u16, timeout: Duration) -> io::Result<UnixStream> {
        let (mine, stack_end) = UnixStream::pair()?;
        stack_end.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel();
        self.shared.command(Command::Connect {
            guest_port,
            host: stack_end,
            reply: tx,
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(mine),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("guest port {guest_port} did not answer within {timeout:?}"),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(io::Error::other(
                "the user network stopped or could not open the connection",
            )),
        }
    }

    /// Listens on 127.0.0.1:`host_port` (0: any free port) and relays every
    /// accepted connection to the guest's `guest_port` (a guest reset
    /// becomes a reset for the host client). Returns the bound address.
    pub fn forward(&self, host_port: u16, guest_port: u16) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, host_port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        self.shared.command(Command::Forward {
            listener,
            guest_port,
        });
        Ok(addr)
    }

    /// Lets the guest connect to 10.0.2.2:`port`, relayed to 127.0.0.1:`port`.
    pub fn allow_host_port(&self, port: u16) {
        self.shared
            .allowed
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(port);
        self.shared.command(Command::Allow { port });
    }

    /// Sends one ICMP echo request (identifier 0x4f53, sequence `seq`, 56
    /// bytes) from 10.0.2.2 to the guest at 10.0.2.15 and waits up to
    /// `timeout` for the reply. Returns the round trip measured inside the
    /// stack (request handed to the device queue to reply taken from it, so
    /// it includes the guest's and the virtio path's time, not the caller's
    /// thread wake-ups). Errors: `TimedOut` without a reply; `WouldBlock`
    /// (also after `timeout`) when too many earlier requests still wait for
    /// the guest's ARP answer. Retrying in a loop until the guest is up is
    /// the intended use.
    pub fn ping_guest(&self, seq: u16, timeout: Duration) -> io::Result<Duration> {
        let start = Instant::now();
        let (tx, rx) = mpsc::channel();
        self.shared.command(Command::Ping { seq, reply: tx });
        match rx.recv_timeout(timeout) {
            Ok(Ok(rtt)) => Ok(rtt),
            Ok(Err(e)) => {
                // Not even queued: still take the whole timeout, so that a
                // caller retrying in a loop does not spin.
                std::thread::sleep(timeout.saturating_sub(start.elapsed()));
                Err(e)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no echo reply from {GUEST_IP} (seq {seq}) within {timeout:?}"),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(io::Error::other(
                "the user network stopped or could not send the echo request",
            )),
        }
    }

    /// Tells the stack that the guest at 10.0.2.15 has `mac`, as if the
    /// guest had answered its ARP request, so the first packet to the guest
    /// goes out without an ARP round trip. For a VM restored from a
    /// snapshot: the guest's MAC and address are known and its kernel will
    /// not announce them again. (A wrong MAC only costs the stack one ARP
    /// exchange once the entry expires; frames still pass the same checks.)
    pub fn learn_guest_mac(&self, mac: [u8; 6]) {
        self.shared.command(Command::LearnGuest { mac });
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> UserNetStats {
        let c = &self.shared.c;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        UserNetStats {
            frames_from_guest: g(&c.frames_from_guest),
            frames_to_guest: g(&c.frames_to_guest),
            dropped_egress: g(&c.dropped_egress),
            dropped_unsupported: g(&c.dropped_unsupported),
            dropped_arp: g(&c.dropped_arp),
            dropped_malformed: g(&c.dropped_malformed),
            dropped_queue_full: g(&c.dropped_queue_full),
            tcp_refused: g(&c.tcp_refused),
            host_connect_failed: g(&c.host_connect_failed),
            connections: g(&c.connections),
        }
    }
}

mod policy;
mod stack;
#[cfg(test)]
mod tests;

use stack::Stack;
