//! The user network's stack thread ("osso-usernet"): the smoltcp interface
//! on a frame queue shared with the virtio-net device, the TCP sockets
//! relayed to host streams (`UnixStream`s for `connect`, 127.0.0.1 for
//! forwards and allowed host ports), host-initiated pings, and the
//! `poll(2)` sleep between rounds. What the guest may send in at all is
//! decided before, by `policy.rs`.

use super::*;

/// smoltcp's view of the virtio link: frames in from the guest, out to it.
#[derive(Default)]
struct FrameDevice {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.push(b);
        r
    }
}

impl phy::Device for FrameDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _t: SInstant) -> Option<(RxTok, TxTok<'_>)> {
        let f = self.rx.pop_front()?;
        Some((RxTok(f), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _t: SInstant) -> Option<TxTok<'_>> {
        Some(TxTok(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// The host end of a relayed connection.
enum HostStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl HostStream {
    fn fd(&self) -> RawFd {
        match self {
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tcp(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(b),
            Self::Tcp(s) => s.read(b),
        }
    }
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(b),
            Self::Tcp(s) => s.write(b),
        }
    }
    fn shutdown_write(&self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(Shutdown::Write),
            Self::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }
    /// Makes the coming close a TCP reset (SO_LINGER 0) for a host client.
    fn set_reset_on_close(&self) {
        if let Self::Tcp(s) = self {
            let l = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt reads `size_of::<linger>()` bytes from `&l`,
            // a live value of exactly that type; the fd is an open TCP socket
            // owned by `s`.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&l as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            if r != 0 {
                debug!("user network: SO_LINGER: {}", io::Error::last_os_error());
            }
        }
    }
}

/// The ARP reply a guest at [`GUEST_IP`] with `mac` would send the gateway.
fn guest_arp_announcement(mac: [u8; 6]) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress(GATEWAY_MAC),
        target_protocol_addr: GATEWAY_IP,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(mac),
        dst_addr: EthernetAddress(GATEWAY_MAC),
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buf
}

struct Conn {
    handle: SocketHandle,
    local_port: u16,
    host: HostStream,
    reply: Option<mpsc::Sender<io::Result<()>>>,
    established: bool,
    host_eof: bool,
    host_shut_write: bool,
    write_blocked: bool,
}

pub(super) struct Stack {
    shared: Arc<Shared>,
    iface: Interface,
    dev: FrameDevice,
    sockets: SocketSet<'static>,
    icmp: SocketHandle,
    pings: HashMap<u16, (Instant, mpsc::Sender<io::Result<Duration>>)>,
    forwards: Vec<(TcpListener, u16)>,
    /// Allowed host port -> the smoltcp socket listening for the guest.
    guest_listen: BTreeMap<u16, SocketHandle>,
    conns: Vec<Conn>,
    next_port: u16,
    buf: Vec<u8>,
}

fn new_tcp_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; TCP_BUF]),
        tcp::SocketBuffer::new(vec![0u8; TCP_BUF]),
    );
    s.set_timeout(Some(TCP_TIMEOUT));
    s.set_nagle_enabled(false);
    s
}

impl Stack {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        let mut dev = FrameDevice::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x4f53_534f);
        let mut iface = Interface::new(config, &mut dev, SInstant::now());
        iface.update_ip_addrs(|a| {
            // One address on an empty list: cannot overflow.
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(GATEWAY_IP), PREFIX_LEN));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let mut icmp = icmp::Socket::new(
            icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 32], vec![0u8; 8192]),
            icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 32], vec![0u8; 8192]),
        );
        if let Err(e) = icmp.bind(icmp::Endpoint::Ident(PING_IDENT)) {
            warn!("user network: binding the ICMP socket: {e}");
        }
        let icmp = sockets.add(icmp);
        Self {
            shared,
            iface,
            dev,
            sockets,
            icmp,
            pings: HashMap::new(),
            forwards: Vec::new(),
            guest_listen: BTreeMap::new(),
            conns: Vec::new(),
            next_port: EPHEMERAL_FIRST,
            buf: vec![0u8; TCP_BUF],
        }
    }

    pub(super) fn run(mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            self.take_commands();
            self.dev.rx.extend(lock(&self.shared.from_guest).drain(..));
            let now = SInstant::now();
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            self.service();
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            self.flush_to_guest();
            self.sleep();
        }
    }

    fn take_commands(&mut self) {
        let cmds: Vec<Command> = lock(&self.shared.commands).drain(..).collect();
        for cmd in cmds {
            match cmd {
                Command::Connect {
                    guest_port,
                    host,
                    reply,
                } => self.open_to_guest(guest_port, HostStream::Unix(host), Some(reply)),
                Command::Forward {
                    listener,
                    guest_port,
                } => self.forwards.push((listener, guest_port)),
                Command::Allow { port } => {
                    if !self.guest_listen.contains_key(&port) {
                        self.listen_for_guest(port);
                    }
                }
                Command::Ping { seq, reply } => self.send_ping(seq, reply),
                Command::LearnGuest { mac } => {
                    // Before anything the guest sent, so the cache entry is
                    // in place for the requests queued in this same round.
                    self.dev.rx.push_front(guest_arp_announcement(mac));
                }
            }
        }
    }

    fn listen_for_guest(&mut self, port: u16) {
        let mut s = new_tcp_socket();
        // Answer the guest's SYN only once the host port accepted.
        s.pause_synack(true);
        match s.listen((IpAddress::Ipv4(GATEWAY_IP), port)) {
            Ok(()) => {
                let h = self.sockets.add(s);
                self.guest_listen.insert(port, h);
            }
            Err(e) => warn!("user network: listening on {GATEWAY_IP}:{port}: {e}"),
        }
    }

    fn alloc_port(&mut self) -> u16 {
        loop {
            let p = self.next_port;
            self.next_port = if p == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                p + 1
            };
            if !self.conns.iter().any(|c| c.local_port == p) {
                return p;
            }
        }
    }

    fn open_to_guest(
        &mut self,
        guest_port: u16,
        host: HostStream,
        reply: Option<mpsc::Sender<io::Result<()>>>,
    ) {
        let fail = |reply: Option<mpsc::Sender<io::Result<()>>>, e: io::Error| {
            if let Some(r) = reply {
                let _ = r.send(Err(e));
            }
        };
        if self.conns.len() >= MAX_CONNS {
            host.set_reset_on_close();
            return fail(reply, io::Error::other("too many relayed connections"));
        }
        let local_port = self.alloc_port();
        let mut s = new_tcp_socket();
        match s.connect(
            self.iface.context(),
            (IpAddress::Ipv4(GUEST_IP), guest_port),
            local_port,
        ) {
            Ok(()) => {
                let handle = self.sockets.add(s);
                inc(&self.shared.c.connections);
                self.conns.push(Conn {
                    handle,
                    local_port,
                    host,
                    reply,
                    established: false,
                    host_eof: false,
                    host_shut_write: false,
                    write_blocked: false,
                });
            }
            Err(e) => fail(
                reply,
                io::Error::new(io::ErrorKind::InvalidInput, format!("connect: {e}")),
            ),
        }
    }

    fn send_ping(&mut self, seq: u16, reply: mpsc::Sender<io::Result<Duration>>) {
        let mut data = [0u8; PING_PAYLOAD];
        for (i, b) in data.iter_mut().enumerate() {
            *b = i as u8;
        }
        let repr = Icmpv4Repr::EchoRequest {
            ident: PING_IDENT,
            seq_no: seq,
            data: &data,
        };
        let sock = self.sockets.get_mut::<icmp::Socket>(self.icmp);
        match sock.send(repr.buffer_len(), IpAddress::Ipv4(GUEST_IP)) {
            Ok(buf) => {
                let mut pkt = Icmpv4Packet::new_unchecked(buf);
                repr.emit(&mut pkt, &ChecksumCapabilities::default());
                self.pings.insert(seq, (Instant::now(), reply));
            }
            Err(e) => {
                // The socket's queue is full: earlier requests still wait for
                // the guest's ARP answer.
                let _ = reply.send(Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "echo request {seq} not queued ({e}): the guest has not answered ARP yet?"
                    ),
                )));
            }
        }
    }

    /// Everything that is not smoltcp's own job: ping replies, accepting
    /// host and guest connections, relaying bytes.
    fn service(&mut self) {
        // Echo replies for ping_guest.
        let sock = self.sockets.get_mut::<icmp::Socket>(self.icmp);
        while let Ok((data, _from)) = sock.recv() {
            let Ok(pkt) = Icmpv4Packet::new_checked(data) else {
                continue;
            };
            if let Ok(Icmpv4Repr::EchoReply { ident, seq_no, .. }) =
                Icmpv4Repr::parse(&pkt, &ChecksumCapabilities::default())
            {
                if ident == PING_IDENT {
                    if let Some((sent, reply)) = self.pings.remove(&seq_no) {
                        let _ = reply.send(Ok(sent.elapsed()));
                    }
                }
            }
        }

        // Host clients of forwarded ports.
        let mut accepted = Vec::new();
        for (l, guest_port) in &self.forwards {
            loop {
                match l.accept() {
                    Ok((s, _)) => accepted.push((s, *guest_port)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!("user network: accept: {e}");
                        break;
                    }
                }
            }
        }
        for (s, guest_port) in accepted {
            if let Err(e) = s.set_nonblocking(true) {
                debug!("user network: set_nonblocking: {e}");
                continue;
            }
            self.open_to_guest(guest_port, HostStream::Tcp(s), None);
        }

        // Guest connections to allowed host ports.
        let ports: Vec<(u16, SocketHandle)> =
            self.guest_listen.iter().map(|(p, h)| (*p, *h)).collect();
        for (port, h) in ports {
            let state = self.sockets.get::<tcp::Socket>(h).state();
            if state == tcp::State::Listen {
                continue;
            }
            // This socket got a SYN: it becomes a connection, a fresh one listens.
            self.guest_listen.remove(&port);
            self.listen_for_guest(port);
            if state != tcp::State::SynReceived {
                self.sockets.remove(h);
                continue;
            }
            let host = TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                Duration::from_secs(1),
            )
            .and_then(|s| s.set_nonblocking(true).map(|()| s));
            let sock = self.sockets.get_mut::<tcp::Socket>(h);
            match host {
                Ok(s) if self.conns.len() < MAX_CONNS => {
                    sock.pause_synack(false);
                    let local_port = sock.local_endpoint().map_or(port, |e| e.port);
                    inc(&self.shared.c.connections);
                    self.conns.push(Conn {
                        handle: h,
                        local_port,
                        host: HostStream::Tcp(s),
                        reply: None,
                        established: false,
                        host_eof: false,
                        host_shut_write: false,
                        write_blocked: false,
                    });
                }
                _ => {
                    inc(&self.shared.c.host_connect_failed);
                    sock.abort();
                    // The reset goes out on the next poll; then drop it.
                    self.iface
                        .poll(SInstant::now(), &mut self.dev, &mut self.sockets);
                    self.sockets.remove(h);
                }
            }
        }

        // Relay bytes.
        let mut i = 0;
        while i < self.conns.len() {
            let done = relay(&mut self.conns[i], &mut self.sockets, &mut self.buf);
            if done {
                let c = self.conns.swap_remove(i);
                self.sockets.remove(c.handle);
            } else {
                i += 1;
            }
        }

        // Forget pings nobody waits for any more.
        self.pings
            .retain(|_, (sent, _)| sent.elapsed() < Duration::from_secs(120));
    }

    fn flush_to_guest(&mut self) {
        if self.dev.tx.is_empty() {
            return;
        }
        {
            let mut q = lock(&self.shared.to_guest);
            for f in self.dev.tx.drain(..) {
                if q.len() >= MAX_QUEUED_FRAMES {
                    inc(&self.shared.c.dropped_queue_full);
                    continue;
                }
                q.push_back(f);
                inc(&self.shared.c.frames_to_guest);
            }
        }
        if let Err(e) = self.shared.to_guest_evt.write(1) {
            warn!("user network: signalling the device: {e}");
        }
    }

    /// Sleeps in poll(2) until a host socket, a frame, a command or a
    /// smoltcp timer needs attention.
    fn sleep(&mut self) {
        let delay = self
            .iface
            .poll_delay(SInstant::now(), &self.sockets)
            .map_or(1000, |d| d.total_millis().min(1000));
        let mut fds = vec![libc::pollfd {
            fd: self.shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for (l, _) in &self.forwards {
            fds.push(libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for c in &self.conns {
            let sock = self.sockets.get::<tcp::Socket>(c.handle);
            let mut events = 0;
            if c.established && !c.host_eof && sock.can_send() {
                events |= libc::POLLIN;
            }
            if c.write_blocked {
                events |= libc::POLLOUT;
            }
            if events != 0 {
                fds.push(libc::pollfd {
                    fd: c.host.fd(),
                    events,
                    revents: 0,
                });
            }
        }
        if delay > 0 {
            // SAFETY: `fds` is a live, initialised array of `fds.len()`
            // pollfd structures that poll(2) reads and writes only within
            // that length; the fds stay open for the duration of the call.
            let r =
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, delay as i32) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("user network: poll: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let _ = self.shared.wake.read();
    }
}

/// Moves bytes between a host stream and its smoltcp socket. Returns true
/// when the connection is over.
fn relay(c: &mut Conn, sockets: &mut SocketSet<'static>, buf: &mut [u8]) -> bool {
    let sock = sockets.get_mut::<tcp::Socket>(c.handle);
    if !c.established {
        match sock.state() {
            tcp::State::SynSent | tcp::State::SynReceived | tcp::State::Listen => return false,
            tcp::State::Closed | tcp::State::TimeWait => {
                if let Some(r) = c.reply.take() {
                    let _ = r.send(Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        "the guest reset the connection (no listener on that port?)",
                    )));
                }
                c.host.set_reset_on_close();
                return true;
            }
            _ => {
                c.established = true;
                if let Some(r) = c.reply.take() {
                    let _ = r.send(Ok(()));
                }
            }
        }
    }

    // Guest -> host.
    c.write_blocked = false;
    while sock.can_recv() {
        let host = &mut c.host;
        let r = sock.recv(|data| match host.write(data) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok(0)) => {
                c.write_blocked = true;
                break;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                c.write_blocked = true;
                break;
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                // The host side is gone: reset the guest's connection.
                sock.abort();
                return true;
            }
            Err(_) => break,
        }
    }
    if !sock.may_recv() && !sock.can_recv() && !c.host_shut_write {
        // The guest sent FIN and everything was written.
        c.host.shutdown_write();
        c.host_shut_write = true;
    }

    // Host -> guest.
    while !c.host_eof && sock.can_send() {
        let room = sock.send_capacity() - sock.send_queue();
        let n = room.min(buf.len());
        match c.host.read(&mut buf[..n]) {
            Ok(0) => {
                c.host_eof = true;
                sock.close();
            }
            Ok(k) => {
                let _ = sock.send_slice(&buf[..k]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                sock.abort();
                return true;
            }
        }
    }

    match sock.state() {
        tcp::State::Closed => true,
        tcp::State::TimeWait => c.host_shut_write,
        _ => false,
    }
}
