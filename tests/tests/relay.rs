//! The broadcast relay's side of worker start-up (README, "Broadcasting
//! between workers"): with `--ipc on` a worker gets exactly one more
//! descriptor, fd 4, its own end of a unix socketpair announced as Node
//! expects it; without, none (and `NODE_CHANNEL_*` that sticky itself
//! inherited is not passed on). Every worker learns the relay socket, which
//! refuses peers that are not workers.

use std::{
    collections::HashMap,
    io::{Read, Write},
    os::unix::net::UnixStream,
    process::Command,
    time::Duration,
};

use sticky_tests::{Cluster, TempDir};

/// What a worker reports (`Cluster::start_reporting`).
const REPORT_SCRIPT: &str = r#"
import os, socket

fds = live_fds()
env = os.environ
lines = {
    "fds": ",".join(str(f) for f in fds),
    "node_channel_fd": env.get("NODE_CHANNEL_FD", "-"),
    "node_channel_mode": env.get("NODE_CHANNEL_SERIALIZATION_MODE", "-"),
    "sticky_relay": env.get("STICKY_RELAY", "-"),
}
if 4 in fds:
    s = socket.socket(fileno=4)
    lines["fd4_family"] = str(int(s.family))
    lines["fd4_type"] = str(int(s.type))
    lines["fd4_inode"] = str(os.fstat(4).st_ino)
    s.detach()
write_report(lines)
"#;

fn reports(
    dir: &TempDir,
    extra: &[&str],
    workers: usize,
) -> (Cluster, Vec<HashMap<String, String>>) {
    Cluster::start_reporting(dir, workers, extra, REPORT_SCRIPT, |cmd: &mut Command| {
        // A channel sticky itself was given must not reach a worker.
        cmd.env("NODE_CHANNEL_FD", "9")
            .env("NODE_CHANNEL_SERIALIZATION_MODE", "json");
    })
}

#[test]
fn ipc_on_gives_fd_4_only_its_own_socketpair_end() {
    let dir = TempDir::new();
    let (cluster, reports) = reports(&dir, &["--ipc", "on"], 3);
    let mut inodes: Vec<&String> = Vec::new();
    for (w, r) in reports.iter().enumerate() {
        // fds 0-2 may be whatever the harness gives; 3 and 4 are sticky's,
        // nothing above.
        assert!(r["fds"].ends_with(",3,4"), "worker {w}: fds {}", r["fds"]);
        assert_eq!(r["node_channel_fd"], "4");
        assert_eq!(r["node_channel_mode"], "advanced");
        assert_eq!(r["fd4_family"], libc::AF_UNIX.to_string());
        assert_eq!(r["fd4_type"], libc::SOCK_STREAM.to_string());
        assert!(std::path::Path::new(&r["sticky_relay"]).exists());
        inodes.push(&r["fd4_inode"]);
    }
    inodes.sort();
    inodes.dedup();
    assert_eq!(inodes.len(), 3, "workers share a channel");
    let stats = cluster.stats();
    println!("relay_node_channels={}", stats["relay_node_channels"]);
    assert_eq!(stats["relay_node_channels"], "3");
}

#[test]
fn without_ipc_no_channel_and_no_inherited_node_channel_env() {
    let dir = TempDir::new();
    // `auto` with a python3 command: off.
    let (cluster, reports) = reports(&dir, &[], 2);
    for (w, r) in reports.iter().enumerate() {
        assert!(r["fds"].ends_with(",3"), "worker {w}: fds {}", r["fds"]);
        assert_eq!(r["node_channel_fd"], "-", "worker {w} got NODE_CHANNEL_FD");
        assert_eq!(r["node_channel_mode"], "-");
        assert_ne!(r["sticky_relay"], "-");
    }
    assert_eq!(cluster.stats()["relay_node_channels"], "0");
}

#[test]
fn the_relay_socket_refuses_strangers() {
    let dir = TempDir::new();
    let (_cluster, reports) = reports(&dir, &[], 1);
    let mut stream = UnixStream::connect(&reports[0]["sticky_relay"]).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // A subscription, as a worker would send it.
    stream.write_all(&[0, 0, 0, 2, b's', b'x']).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    println!("stranger got {:?}", String::from_utf8_lossy(&answer));
    assert_eq!(&answer[4..5], b"e", "an error frame");
    assert!(String::from_utf8_lossy(&answer[5..]).contains("not a sticky worker"));
    let len = u32::from_be_bytes(answer[..4].try_into().unwrap()) as usize;
    assert_eq!(len, answer.len() - 4, "one frame, then closed");
}
