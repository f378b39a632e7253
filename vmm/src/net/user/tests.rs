//! User-network tests with real Ethernet frames, built with smoltcp's wire
//! types. The "guest" here is the test itself, speaking through the
//! backend; the only host sockets involved are on 127.0.0.1.

use super::*;
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// TEST-NET-2 (RFC 5737), a documentation address. Frames for it never leave
/// the in-process stack; TEST-NET-2 rather than TEST-NET-1 because some CI
/// machines number their real LAN from 192.0.2.0/24.
const DOC_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn caps() -> ChecksumCapabilities {
    ChecksumCapabilities::default()
}

fn eth(
    dst: [u8; 6],
    ethertype: EthernetProtocol,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(dst),
        ethertype,
    };
    let mut buf = vec![0u8; repr.buffer_len() + payload_len];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    repr.emit(&mut f);
    fill(f.payload_mut());
    buf
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    osso_testkit::frames::arp_request(GUEST_MAC, GUEST_IP, target)
}

fn arp_reply_to(req: &ArpRepr) -> Vec<u8> {
    let ArpRepr::EthernetIpv4 {
        source_hardware_addr,
        source_protocol_addr,
        ..
    } = *req
    else {
        panic!("not an IPv4 ARP")
    };
    osso_testkit::frames::arp_reply(
        GUEST_MAC,
        GUEST_IP,
        source_hardware_addr.0,
        source_protocol_addr,
    )
}

fn ipv4(
    dst: Ipv4Addr,
    proto: IpProtocol,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: GUEST_IP,
        dst_addr: dst,
        next_header: proto,
        payload_len,
        hop_limit: 64,
    };
    eth(
        GATEWAY_MAC,
        EthernetProtocol::Ipv4,
        repr.buffer_len() + payload_len,
        |p| {
            let mut ip = Ipv4Packet::new_unchecked(p);
            repr.emit(&mut ip, &caps());
            fill(ip.payload_mut());
        },
    )
}

fn icmp_echo(dst: Ipv4Addr, reply: bool, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    let repr = if reply {
        Icmpv4Repr::EchoReply {
            ident,
            seq_no,
            data,
        }
    } else {
        Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        }
    };
    ipv4(dst, IpProtocol::Icmp, repr.buffer_len(), |p| {
        repr.emit(&mut Icmpv4Packet::new_unchecked(p), &caps())
    })
}

fn tcp_segment(dst: Ipv4Addr, repr: &TcpRepr) -> Vec<u8> {
    ipv4(dst, IpProtocol::Tcp, repr.buffer_len(), |p| {
        repr.emit(
            &mut TcpPacket::new_unchecked(p),
            &IpAddress::Ipv4(GUEST_IP),
            &IpAddress::Ipv4(dst),
            &caps(),
        )
    })
}

fn tcp(
    src_port: u16,
    dst_port: u16,
    control: TcpControl,
    seq: i32,
    ack: Option<i32>,
    payload: &[u8],
) -> TcpRepr<'_> {
    TcpRepr {
        src_port,
        dst_port,
        control,
        seq_number: TcpSeqNumber(seq),
        ack_number: ack.map(TcpSeqNumber),
        window_len: 64240,
        window_scale: None,
        max_seg_size: if control == TcpControl::Syn {
            Some(1460)
        } else {
            None
        },
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    }
}

/// What the test's "guest" saw in a frame from the stack.
#[derive(Debug)]
enum Seen {
    Arp(ArpRepr),
    Icmp {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        repr: (bool, u16, u16, Vec<u8>),
    },
    Tcp {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        syn: bool,
        ack: bool,
        rst: bool,
        #[allow(dead_code)]
        fin: bool,
        seq: i32,
        ack_no: i32,
        payload: Vec<u8>,
    },
    Other,
}

fn parse(frame: &[u8]) -> Seen {
    let f = EthernetFrame::new_checked(frame).expect("ethernet");
    assert_eq!(
        f.src_addr(),
        EthernetAddress(GATEWAY_MAC),
        "from the gateway MAC"
    );
    match f.ethertype() {
        EthernetProtocol::Arp => {
            Seen::Arp(ArpRepr::parse(&ArpPacket::new_checked(f.payload()).unwrap()).unwrap())
        }
        EthernetProtocol::Ipv4 => {
            assert_eq!(f.dst_addr(), EthernetAddress(GUEST_MAC));
            let ip = Ipv4Packet::new_checked(f.payload()).unwrap();
            assert!(ip.verify_checksum());
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            match ip.next_header() {
                IpProtocol::Icmp => {
                    let p = Icmpv4Packet::new_checked(ip.payload()).unwrap();
                    match Icmpv4Repr::parse(&p, &caps()).unwrap() {
                        Icmpv4Repr::EchoReply {
                            ident,
                            seq_no,
                            data,
                        } => Seen::Icmp {
                            src,
                            dst,
                            repr: (true, ident, seq_no, data.to_vec()),
                        },
                        Icmpv4Repr::EchoRequest {
                            ident,
                            seq_no,
                            data,
                        } => Seen::Icmp {
                            src,
                            dst,
                            repr: (false, ident, seq_no, data.to_vec()),
                        },
                        _ => Seen::Other,
                    }
                }
                IpProtocol::Tcp => {
                    let t = TcpPacket::new_checked(ip.payload()).unwrap();
                    assert!(t.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)));
                    Seen::Tcp {
                        src,
                        dst,
                        src_port: t.src_port(),
                        dst_port: t.dst_port(),
                        syn: t.syn(),
                        ack: t.ack(),
                        rst: t.rst(),
                        fin: t.fin(),
                        seq: t.seq_number().0,
                        ack_no: t.ack_number().0,
                        payload: t.payload().to_vec(),
                    }
                }
                _ => Seen::Other,
            }
        }
        _ => Seen::Other,
    }
}

/// The test's guest: the backend plus helpers.
struct Guest {
    b: UserNetBackend,
    h: UserNetHandle,
}

impl Guest {
    fn start(cfg: UserNetConfig) -> Self {
        let (b, h) = UserNet::start(cfg).unwrap();
        Guest { b, h }
    }

    fn send(&mut self, f: Vec<u8>) {
        self.b.send(&f).unwrap();
    }

    /// The next frame from the stack, waiting up to `ms`.
    fn recv(&mut self, ms: u64) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_millis(ms);
        let mut buf = vec![0u8; 65550];
        loop {
            match self.b.recv(&mut buf) {
                Ok(n) => return Some(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv: {e}"),
            }
            if Instant::now() >= deadline {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.b.ready_fd().unwrap(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, length 1.
            unsafe { libc::poll(&mut pfd, 1, 20) };
        }
    }

    /// The next non-ARP frame, answering the stack's ARP requests for the
    /// guest on the way (as a guest kernel would).
    fn recv_ip(&mut self, ms: u64) -> Option<Seen> {
        let deadline = Instant::now() + Duration::from_millis(ms);
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64;
            let f = self.recv(left)?;
            match parse(&f) {
                Seen::Arp(r) => {
                    if let ArpRepr::EthernetIpv4 {
                        operation: ArpOperation::Request,
                        target_protocol_addr,
                        ..
                    } = r
                    {
                        assert_eq!(target_protocol_addr, GUEST_IP);
                        self.send(arp_reply_to(&r));
                    }
                }
                s => return Some(s),
            }
        }
    }
}

#[test]
fn arp_request_for_gateway_gets_reply() {
    let mut g = Guest::start(UserNetConfig::default());
    g.send(arp_request(GATEWAY_IP));
    let f = g.recv(2000).expect("an ARP reply");
    match parse(&f) {
        Seen::Arp(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_hardware_addr,
            target_protocol_addr,
        }) => {
            assert_eq!(operation, ArpOperation::Reply);
            assert_eq!(source_hardware_addr, EthernetAddress(GATEWAY_MAC));
            assert_eq!(source_protocol_addr, GATEWAY_IP);
            assert_eq!(target_hardware_addr, EthernetAddress(GUEST_MAC));
            assert_eq!(target_protocol_addr, GUEST_IP);
        }
        s => panic!("expected an ARP reply, got {s:?}"),
    }
    // ARP for someone else: no answer, counted.
    g.send(arp_request(Ipv4Addr::new(10, 0, 2, 3)));
    assert!(g.recv(200).is_none());
    let st = g.h.stats();
    assert_eq!(st.dropped_arp, 1);
    assert_eq!(st.frames_from_guest, 1);
    assert_eq!(st.frames_to_guest, 1);
}

#[test]
fn icmp_echo_to_gateway_gets_reply() {
    let mut g = Guest::start(UserNetConfig::default());
    g.send(arp_request(GATEWAY_IP));
    assert!(matches!(parse(&g.recv(2000).unwrap()), Seen::Arp(_)));
    let data = b"osso ping payload 0123456789";
    g.send(icmp_echo(GATEWAY_IP, false, 0x1234, 7, data));
    match g.recv_ip(2000).expect("an echo reply") {
        Seen::Icmp { src, dst, repr } => {
            assert_eq!((src, dst), (GATEWAY_IP, GUEST_IP));
            assert_eq!(repr, (true, 0x1234, 7, data.to_vec()));
        }
        s => panic!("expected an echo reply, got {s:?}"),
    }
}

#[test]
fn other_addresses_are_dropped_and_counted() {
    let mut g = Guest::start(UserNetConfig::default());
    // ICMP and TCP to a documentation address through the gateway: dropped.
    g.send(icmp_echo(DOC_ADDR, false, 1, 1, b"x"));
    g.send(tcp_segment(
        DOC_ADDR,
        &tcp(40000, 80, TcpControl::Syn, 1000, None, &[]),
    ));
    // UDP to the gateway (e.g. DNS): dropped, no egress.
    g.send(ipv4(GATEWAY_IP, IpProtocol::Udp, 8, |p| {
        p.copy_from_slice(&[0, 53, 0, 53, 0, 8, 0, 0])
    }));
    // An IPv6 frame and a runt.
    g.send(eth(GATEWAY_MAC, EthernetProtocol::Ipv6, 40, |_| {}));
    g.send(vec![0u8; 5]);
    assert!(g.recv(300).is_none(), "nothing comes back");
    let st = g.h.stats();
    assert_eq!(st.dropped_egress, 2);
    assert_eq!(st.dropped_unsupported, 2);
    assert_eq!(st.dropped_malformed, 1);
    assert_eq!(st.frames_from_guest, 0);
    assert_eq!(st.frames_to_guest, 0);
}

#[test]
fn host_connect_reaches_guest_as_syn() {
    let mut g = Guest::start(UserNetConfig::default());
    let h = g.h.clone();
    // 1. The guest refuses (RST): connect() says ConnectionRefused.
    let t = std::thread::spawn(move || h.connect(8080, Duration::from_secs(5)));
    let syn = g.recv_ip(3000).expect("a SYN");
    let Seen::Tcp {
        src,
        dst,
        src_port,
        dst_port,
        syn: true,
        ack: false,
        seq,
        ..
    } = syn
    else {
        panic!("expected a SYN, got {syn:?}");
    };
    assert_eq!((src, dst, dst_port), (GATEWAY_IP, GUEST_IP, 8080));
    g.send(tcp_segment(
        GATEWAY_IP,
        &tcp(
            8080,
            src_port,
            TcpControl::Rst,
            0,
            Some(seq.wrapping_add(1)),
            &[],
        ),
    ));
    let err = t.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");

    // 2. The guest accepts: connect() returns a stream; bytes flow both ways.
    let h = g.h.clone();
    let t = std::thread::spawn(move || h.connect(22, Duration::from_secs(5)));
    let Some(Seen::Tcp {
        src_port,
        dst_port: 22,
        syn: true,
        seq,
        ..
    }) = g.recv_ip(3000)
    else {
        panic!("expected a SYN to port 22");
    };
    let gseq = 5000i32;
    g.send(tcp_segment(
        GATEWAY_IP,
        &tcp(
            22,
            src_port,
            TcpControl::Syn,
            gseq,
            Some(seq.wrapping_add(1)),
            &[],
        ),
    ));
    let Some(Seen::Tcp {
        ack: true,
        syn: false,
        ack_no,
        ..
    }) = g.recv_ip(3000)
    else {
        panic!("expected the handshake's ACK");
    };
    assert_eq!(ack_no, gseq.wrapping_add(1));
    let mut stream = t.join().unwrap().expect("connected");
    stream.write_all(b"hello guest").unwrap();
    let Some(Seen::Tcp {
        payload, seq: dseq, ..
    }) = g.recv_ip(3000)
    else {
        panic!("expected data");
    };
    assert_eq!(payload, b"hello guest");
    assert_eq!(dseq, seq.wrapping_add(1));
    // The guest answers with data (acking the host's).
    g.send(tcp_segment(
        GATEWAY_IP,
        &tcp(
            22,
            src_port,
            TcpControl::Psh,
            gseq.wrapping_add(1),
            Some(dseq.wrapping_add(11)),
            b"hello host",
        ),
    ));
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut got = [0u8; 10];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");
    assert_eq!(g.h.stats().connections, 2);
}

#[test]
fn forward_listener_reaches_guest_as_syn() {
    let mut g = Guest::start(UserNetConfig::default());
    let addr = g.h.forward(0, 8080).unwrap();
    assert!(addr.ip().is_loopback());
    // The guest resets: the host client sees a reset or EOF. The host's
    // kernel completes the handshake with the stack's listener before the
    // guest hears of it, so the reset may come before `connect` returns
    // (the client thread not scheduled in between, as on a slow CPU): then
    // `connect` itself fails with it. Either way the error is the reset.
    let client = std::thread::spawn(move || -> io::Result<usize> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut b = [0u8; 1];
        s.read(&mut b)
    });
    let Some(Seen::Tcp {
        dst,
        dst_port: 8080,
        syn: true,
        ack: false,
        src_port,
        seq,
        ..
    }) = g.recv_ip(3000)
    else {
        panic!("expected a SYN to guest port 8080");
    };
    assert_eq!(dst, GUEST_IP);
    g.send(tcp_segment(
        GATEWAY_IP,
        &tcp(
            8080,
            src_port,
            TcpControl::Rst,
            0,
            Some(seq.wrapping_add(1)),
            &[],
        ),
    ));
    match client.join().unwrap() {
        Ok(0) => {}
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("read {n} bytes"),
    }
}

#[test]
fn guest_reaches_allowed_host_loopback_port_only() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut g = Guest::start(UserNetConfig {
        allowed_host_ports: vec![port],
        ..UserNetConfig::default()
    });
    g.send(arp_request(GATEWAY_IP));
    assert!(matches!(parse(&g.recv(2000).unwrap()), Seen::Arp(_)));

    // Allowed: the stack connects to 127.0.0.1:port, then answers SYN-ACK.
    g.send(tcp_segment(
        GATEWAY_IP,
        &tcp(40000, port, TcpControl::Syn, 100, None, &[]),
    ));
    let Some(Seen::Tcp {
        src,
        src_port,
        dst_port: 40000,
        syn: true,
        ack: true,
        ack_no,
        seq,
        ..
    }) = g.recv_ip(3000)
    else {
        panic!("expected a SYN-ACK");
    };
    assert_eq!((src, src_port, ack_no), (GATEWAY_IP, port, 101));
    let (mut host_side, peer) = listener.accept().unwrap();
    assert!(peer.ip().is_loopback());
    g.send(tcp_segment(
        GATEWAY_IP,
        &tcp(
            40000,
            port,
            TcpControl::Psh,
            101,
            Some(seq.wrapping_add(1)),
            b"ping",
        ),
    ));
    host_side
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut b = [0u8; 4];
    host_side.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");

    // Not allowed: a reset, counted.
    let other = port.wrapping_add(1).max(1);
    g.send(tcp_segment(
        GATEWAY_IP,
        &tcp(40001, other, TcpControl::Syn, 100, None, &[]),
    ));
    let Some(Seen::Tcp {
        rst: true,
        dst_port: 40001,
        ..
    }) = g.recv_ip(3000)
    else {
        panic!("expected a reset");
    };
    assert_eq!(g.h.stats().tcp_refused, 1);

    // Allowed but nothing listens on the host: a reset, counted.
    drop(listener);
    drop(host_side);
    let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let cport = closed.local_addr().unwrap().port();
    drop(closed);
    g.h.allow_host_port(cport);
    std::thread::sleep(Duration::from_millis(50));
    g.send(tcp_segment(
        GATEWAY_IP,
        &tcp(40002, cport, TcpControl::Syn, 100, None, &[]),
    ));
    loop {
        match g.recv_ip(3000) {
            Some(Seen::Tcp {
                rst: true,
                dst_port: 40002,
                syn: false,
                ..
            }) => break,
            // Segments of the first connection closing.
            Some(Seen::Tcp {
                dst_port: 40000, ..
            }) => continue,
            other => panic!("expected a reset for port {cport}, got {other:?}"),
        }
    }
    assert_eq!(g.h.stats().host_connect_failed, 1);
}

#[test]
fn host_pings_guest() {
    let mut g = Guest::start(UserNetConfig::default());
    let h = g.h.clone();
    let t = std::thread::spawn(move || h.ping_guest(3, Duration::from_secs(5)));
    let Some(Seen::Icmp {
        src,
        dst,
        repr: (false, ident, 3, data),
    }) = g.recv_ip(3000)
    else {
        panic!("expected an echo request");
    };
    assert_eq!((src, dst), (GATEWAY_IP, GUEST_IP));
    assert_eq!(data.len(), 56);
    g.send(icmp_echo(GATEWAY_IP, true, ident, 3, &data));
    let rtt = t.join().unwrap().expect("a round trip");
    assert!(rtt < Duration::from_secs(5));

    // No answer: TimedOut.
    let err = g.h.ping_guest(4, Duration::from_millis(200)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
}

#[test]
fn a_learned_guest_mac_skips_the_arp_round_trip() {
    let mut g = Guest::start(UserNetConfig::default());
    g.h.learn_guest_mac(GUEST_MAC);
    let h = g.h.clone();
    let t = std::thread::spawn(move || h.ping_guest(7, Duration::from_secs(5)));
    // The very first frame is the echo request, addressed to the learned MAC
    // (`parse` checks the destination): no ARP request went first.
    let f = g.recv(3000).expect("a frame for the guest");
    let Seen::Icmp {
        src,
        dst,
        repr: (false, ident, 7, data),
    } = parse(&f)
    else {
        panic!("expected an echo request first, got {:?}", parse(&f));
    };
    assert_eq!((src, dst), (GATEWAY_IP, GUEST_IP));
    g.send(icmp_echo(GATEWAY_IP, true, ident, 7, &data));
    t.join().unwrap().expect("a round trip");
    // The learning frame was the stack's own: nothing counted as from the guest.
    assert_eq!(g.h.stats().frames_from_guest, 1);
}

/// The no-egress policy on its own (`policy.rs`), frame by frame.
#[test]
fn the_policy_admits_only_what_is_for_the_gateway() {
    use super::policy::{admit, Dropped, Verdict};
    let only_8080 = |p: u16| p == 8080;
    assert_eq!(admit(&arp_request(GATEWAY_IP), only_8080), Verdict::Admit);
    assert_eq!(
        admit(&arp_request(Ipv4Addr::new(10, 0, 2, 3)), only_8080),
        Verdict::Drop(Dropped::Arp)
    );
    assert_eq!(
        admit(&icmp_echo(GATEWAY_IP, false, 1, 1, b"hi"), only_8080),
        Verdict::Admit
    );
    // Anything for another address is egress, whatever the protocol.
    assert_eq!(
        admit(&icmp_echo(DOC_ADDR, false, 1, 1, b"hi"), only_8080),
        Verdict::Drop(Dropped::Egress)
    );
    let syn = |port| tcp(40000, port, TcpControl::Syn, 1, None, b"");
    assert_eq!(
        admit(&tcp_segment(DOC_ADDR, &syn(8080)), only_8080),
        Verdict::Drop(Dropped::Egress)
    );
    assert_eq!(
        admit(&tcp_segment(GATEWAY_IP, &syn(8080)), only_8080),
        Verdict::Admit
    );
    assert_eq!(
        admit(&tcp_segment(GATEWAY_IP, &syn(22)), only_8080),
        Verdict::AdmitRefused
    );
    // UDP (no DNS, no DHCP), another EtherType, garbage.
    let udp = ipv4(GATEWAY_IP, IpProtocol::Udp, 8, |p| p.fill(0));
    assert_eq!(admit(&udp, only_8080), Verdict::Drop(Dropped::Unsupported));
    let ipv6 = eth(GATEWAY_MAC, EthernetProtocol::Ipv6, 40, |p| p.fill(0));
    assert_eq!(admit(&ipv6, only_8080), Verdict::Drop(Dropped::Unsupported));
    assert_eq!(
        admit(&[1, 2, 3], only_8080),
        Verdict::Drop(Dropped::Malformed)
    );
    // A frame for another MAC does not enter even if it is for the gateway's IP.
    let mut other_mac = icmp_echo(GATEWAY_IP, false, 1, 1, b"hi");
    other_mac[..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    assert_eq!(
        admit(&other_mac, only_8080),
        Verdict::Drop(Dropped::Unsupported)
    );
}
