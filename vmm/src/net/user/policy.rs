//! What a guest may send into the user network: the no-egress policy, in one
//! place. [`admit`] looks at each Ethernet frame from the guest before the
//! network stack sees it and says whether it enters.
//!
//! - Ethernet: only frames to the gateway's MAC or broadcast.
//! - ARP: only questions about the gateway's address (10.0.2.2).
//! - IPv4: only packets to the gateway's address. A packet to any other
//!   address (the Internet, the host's LAN, other guests) is dropped and
//!   counted as egress. The stack itself relays nothing onwards: its only
//!   host sockets are on 127.0.0.1.
//! - ICMP to the gateway: admitted (the stack answers echo requests).
//! - TCP to the gateway: admitted; a connection attempt (SYN) to a port the
//!   caller did not allow is counted as refused, and the stack answers it
//!   with a reset (it listens only on allowed ports).
//! - Anything else (UDP, so no DNS or DHCP; other EtherTypes, other IP
//!   protocols): dropped and counted.

use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet,
    TcpPacket,
};

use super::{GATEWAY_IP, GATEWAY_MAC};

/// Why a frame did not enter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dropped {
    /// Not a well-formed frame or packet.
    Malformed,
    /// To an address other than the gateway's.
    Egress,
    /// ARP about an address other than the gateway's.
    Arp,
    /// Another MAC, EtherType or IP protocol.
    Unsupported,
}

/// What happens to one frame from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// It enters the stack.
    Admit,
    /// It enters the stack, which refuses it: a TCP SYN to a port not allowed.
    AdmitRefused,
    /// It is dropped.
    Drop(Dropped),
}

/// The verdict on `frame`; `allowed(port)`: may the guest connect to the
/// host's 127.0.0.1:`port` through the gateway.
pub(super) fn admit(frame: &[u8], allowed: impl Fn(u16) -> bool) -> Verdict {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Verdict::Drop(Dropped::Malformed);
    };
    let dst = eth.dst_addr();
    if dst != EthernetAddress(GATEWAY_MAC) && !dst.is_broadcast() {
        return Verdict::Drop(Dropped::Unsupported);
    }
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            match ArpPacket::new_checked(eth.payload()).and_then(|p| ArpRepr::parse(&p)) {
                Ok(ArpRepr::EthernetIpv4 {
                    target_protocol_addr,
                    ..
                }) if target_protocol_addr == GATEWAY_IP => Verdict::Admit,
                Ok(_) => Verdict::Drop(Dropped::Arp),
                Err(_) => Verdict::Drop(Dropped::Malformed),
            }
        }
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                return Verdict::Drop(Dropped::Malformed);
            };
            if ip.dst_addr() != GATEWAY_IP {
                return Verdict::Drop(Dropped::Egress);
            }
            match ip.next_header() {
                IpProtocol::Icmp => Verdict::Admit,
                IpProtocol::Tcp => match TcpPacket::new_checked(ip.payload()) {
                    Ok(tcp) if tcp.syn() && !tcp.ack() && !allowed(tcp.dst_port()) => {
                        Verdict::AdmitRefused
                    }
                    _ => Verdict::Admit,
                },
                _ => Verdict::Drop(Dropped::Unsupported),
            }
        }
        _ => Verdict::Drop(Dropped::Unsupported),
    }
}
