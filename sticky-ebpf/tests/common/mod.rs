//! Crafted packets for running the kernel programs under BPF_PROG_TEST_RUN.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sticky_common::FlowKey;

/// The server address of the family of `client`: where sticky listens.
pub fn server_for(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Ethernet + IPv4/IPv6 + TCP (no options, PSH|ACK) + payload, from `src`
/// to `dst` (same family), as BPF_PROG_TEST_RUN wants.
pub fn segment(src: (IpAddr, u16), dst: (IpAddr, u16), payload: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&src.1.to_be_bytes());
    tcp.extend_from_slice(&dst.1.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 5 << 4, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    let mut p = vec![0u8; 12];
    match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&[0x08, 0x00]);
            let total = (20 + tcp.len() + payload.len()) as u16;
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&[0x86, 0xdd]);
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&((tcp.len() + payload.len()) as u16).to_be_bytes());
            p.extend_from_slice(&[6, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed address families"),
    }
    p.extend_from_slice(&tcp);
    p.extend_from_slice(payload);
    p
}

/// The `flows` / `placed_flows` key of a connection as the server sees it.
pub fn flow_key(local: IpAddr, remote: IpAddr, remote_port: u16) -> FlowKey {
    let mut key = FlowKey {
        remote_port: remote_port.to_be(),
        ..Default::default()
    };
    let words = |o: [u8; 16]| {
        std::array::from_fn(|i| u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap()))
    };
    match (local, remote) {
        (IpAddr::V4(l), IpAddr::V4(r)) => {
            key.family = 2;
            key.local[0] = u32::from_ne_bytes(l.octets());
            key.remote[0] = u32::from_ne_bytes(r.octets());
        }
        (IpAddr::V6(l), IpAddr::V6(r)) => {
            key.family = 10;
            key.local = words(l.octets());
            key.remote = words(r.octets());
        }
        _ => panic!("mixed address families"),
    }
    key
}
