//! Ethernet frames the network tests send as a guest would: ARP requests and
//! replies (Ethernet II, IPv4 over Ethernet, RFC 826), as plain bytes.

use std::net::Ipv4Addr;

/// The broadcast MAC address.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// "Who has `target`? Tell `src_ip`", broadcast from `src_mac`.
pub fn arp_request(src_mac: [u8; 6], src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    arp(1, BROADCAST, src_mac, src_ip, [0; 6], target)
}

/// "`src_ip` is at `src_mac`", sent to `to_mac` (who asked for `src_ip`
/// from `to_ip`).
pub fn arp_reply(src_mac: [u8; 6], src_ip: Ipv4Addr, to_mac: [u8; 6], to_ip: Ipv4Addr) -> Vec<u8> {
    arp(2, to_mac, src_mac, src_ip, to_mac, to_ip)
}

fn arp(
    operation: u16,
    eth_dst: [u8; 6],
    src_mac: [u8; 6],
    src_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06]); // EtherType ARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4]); // Ethernet, IPv4, sizes
    f.extend_from_slice(&operation.to_be_bytes());
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src_ip.octets());
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target_ip.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arp_request_has_the_rfc_826_layout() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = arp_request(mac, Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2));
        let mut want = vec![0xff; 6];
        want.extend_from_slice(&mac);
        want.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        want.extend_from_slice(&mac);
        want.extend_from_slice(&[10, 0, 2, 15, 0, 0, 0, 0, 0, 0, 10, 0, 2, 2]);
        assert_eq!(f, want);
    }

    #[test]
    fn an_arp_reply_answers_the_asker() {
        let (me, asker) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let f = arp_reply(
            me,
            Ipv4Addr::new(10, 0, 2, 15),
            asker,
            Ipv4Addr::new(10, 0, 2, 2),
        );
        assert_eq!(&f[..6], &asker, "to the asker");
        assert_eq!(&f[20..22], &[0, 2], "a reply");
        assert_eq!(&f[22..28], &me);
        assert_eq!(&f[32..38], &asker);
        assert_eq!(f.len(), 42);
    }
}
