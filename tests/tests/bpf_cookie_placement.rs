//! `--placement bpf-cookie`: sticky answers every SYN with a cookie of its
//! own from a tc ingress program, and gives the first data segment a
//! request socket (`bpf_sk_assign_tcp_reqsk()`, Linux 6.9+) that the
//! selector places by sid, with every TCP option kept. Real `sticky run`,
//! real demo workers, real sockets; the options are read from the
//! worker's own accepted socket (TCP_INFO, the demo worker's `/tcp_info`).
//! On a kernel without the kfunc every test checks the fallback instead.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use sticky_tests::delta;
use sticky_tests::{connect_from, read_response, Cluster, NetNs, ENGINE_IO_POLLING_PY};

const BPF_COOKIE: &[&str] = &["--placement", "bpf-cookie", "--balance", "round-robin"];

/// Whether bpf-cookie runs; if not (a kernel without the kfunc), checks
/// that sticky said so in one line and serves with the default placement.
fn runs(cluster: &Cluster) -> bool {
    let ready = cluster.log_line("listening on");
    if ready.contains("placement: bpf-cookie") {
        return true;
    }
    let log = cluster.log.lock().unwrap().clone();
    let line = log
        .lines()
        .find(|l| l.contains("--placement bpf-cookie:"))
        .unwrap_or_else(|| panic!("bpf-cookie neither runs nor says why:\n{log}"));
    println!("bpf-cookie not available here, fallback: {line}");
    assert!(line.contains("placing by rotation"), "{line}");
    let r = cluster.get("/");
    assert_eq!(r.status, 200, "the fallback serves");
    false
}

#[test]
fn every_sid_request_reaches_its_owner_through_a_cookie_of_stickys_own() {
    let cluster = Cluster::start(3, BPF_COOKIE);
    if !runs(&cluster) {
        return;
    }
    let sessions = cluster.sessions_on_every_worker(3, 2);
    let before = cluster.stats();
    let (serial, concurrent) = (300, 1_280);
    let placed = cluster.requests_on_owner(&sessions, serial, 1)
        + cluster.requests_on_owner(&sessions, concurrent, 64);
    // Requests without a sid are balanced (round-robin: every worker).
    let mut seen = [0usize; 3];
    for _ in 0..30 {
        let r = cluster.get("/");
        assert_eq!(r.status, 200);
        seen[r.worker.unwrap()] += 1;
    }
    let after = cluster.stats();
    let d = |k: &str| delta(&before, &after, k);
    let n = (serial + concurrent) as u64;
    println!(
        "bpf-cookie: {n} sid requests ({serial} serial, {concurrent} from 64 clients), {placed} on their owner; \
         30 without a sid over the workers {seen:?}; cookie_syn_answered +{} cookie_ack_absorbed +{} \
         cookie_assigned +{} cookie_syn_passed +{} cookie_assign_failed +{} cookie_forged +{} \
         placed_cookie +{} by_sid +{} balanced +{} syn (sorting listener) +{} placed_queue +{} \
         rotations +{}",
        d("cookie_syn_answered"),
        d("cookie_ack_absorbed"),
        d("cookie_assigned"),
        d("cookie_syn_passed"),
        d("cookie_assign_failed"),
        d("cookie_forged"),
        d("placed_cookie"),
        d("by_sid"),
        d("balanced"),
        d("syn"),
        d("placed_queue"),
        d("rotations"),
    );
    assert_eq!(placed as u64, n, "every sid request on its owner");
    assert!(
        seen.iter().all(|&c| c == 10),
        "round-robin over 3 workers: {seen:?}"
    );
    // Every connection (the sid ones and the 30 others) by a cookie of
    // sticky's own, except those whose client port met one of the server's
    // TIME_WAIT connections (all from 127.0.0.1: a few in a run), which the
    // stack takes through the sorting listener.
    let reused = d("cookie_syn_passed");
    assert_eq!(d("cookie_assigned") + reused, n + 30);
    assert_eq!(d("placed_cookie"), d("cookie_assigned"));
    assert_eq!(d("syn"), reused);
    assert!(reused <= n / 20, "{reused} TIME_WAIT reuses");
    assert_eq!(d("by_sid"), n);
    assert_eq!(d("cookie_forged"), 0);
}

#[test]
fn large_bodies_cross_both_ways_and_silent_clients_are_placed_when_they_speak() {
    let cluster = Cluster::start(2, BPF_COOKIE);
    if !runs(&cluster) {
        return;
    }
    let sessions = cluster.sessions_on_every_worker(2, 1);
    for (sid, owner) in &sessions {
        let body: Vec<u8> = (0..4 << 20).map(|i: u32| (i * 7 + i / 251) as u8).collect();
        let r = sticky_tests::request(cluster.addr, "POST", &format!("/echo?sid={sid}"), &body);
        println!(
            "4 MiB echo over a bpf-cookie connection: status {}, {} bytes back, worker {:?} (owner {owner})",
            r.status,
            r.body.len(),
            r.worker
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.worker, Some(*owner));
        assert!(r.body == body, "echoed body differs");
    }
    // Nothing is kept after the SYN-ACK: the first data, 2 s later, makes
    // the connection on the owner.
    let right = cluster.silent_clients_on_owner(&sessions, 20, Duration::from_secs(2));
    println!(
        "20 clients silent for 2 s after connect, then a sid request: {right}/20 on their owner"
    );
    assert_eq!(right, 20);
}

#[test]
fn a_cookie_is_accepted_under_the_previous_key_and_refused_after() {
    // Keys rotate every second, the previous one still accepted: a cookie
    // is valid for one to two seconds from its SYN-ACK. Silent for 0.9 s,
    // a client always speaks in time, and in 9 cases of 10 after a
    // rotation (its cookie under the previous key): 10 such clients all
    // placed could not happen without the previous key (0.1^10). Silent
    // for 2.5 s, it always speaks after two rotations: refused.
    let cluster = Cluster::start(
        2,
        &["--placement", "bpf-cookie", "--cookie-key-period", "1s"],
    );
    if !runs(&cluster) {
        return;
    }
    let sessions = cluster.sessions_on_every_worker(2, 1);
    let silent_then_speak = |silence: Duration, sid: &str| {
        let mut s = std::net::TcpStream::connect(cluster.addr).unwrap();
        std::thread::sleep(silence);
        let req = format!("GET /?sid={sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut raw = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut raw);
        // Nothing at all when the data was dropped (a stale cookie).
        (!raw.is_empty()).then(|| sticky_tests::parse_response(&raw))
    };
    let before = cluster.stats();
    let placed = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..10)
            .map(|i| {
                let (sid, owner) = &sessions[i % sessions.len()];
                let client = scope.spawn(move || {
                    silent_then_speak(Duration::from_millis(900), sid)
                        .is_some_and(|r| r.worker == Some(*owner))
                });
                std::thread::sleep(Duration::from_millis(97)); // spread over a period
                client
            })
            .collect();
        clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .filter(|&ok| ok)
            .count()
    });
    let middle = cluster.stats();
    let answered = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..5)
            .map(|_| scope.spawn(|| silent_then_speak(Duration::from_millis(2500), &sessions[0].0)))
            .collect();
        clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .filter(|r| r.as_ref().is_some_and(|r| r.status == 200))
            .count()
    });
    let after = cluster.stats();
    println!(
        "--cookie-key-period 1s: 10 clients silent 0.9 s, {placed} placed on their owner \
         (cookie_forged +{}); 5 clients silent 2.5 s, {answered} answered (cookie_forged +{})",
        delta(&before, &middle, "cookie_forged"),
        delta(&middle, &after, "cookie_forged"),
    );
    assert_eq!(
        placed, 10,
        "a cookie under the current or the previous key is accepted"
    );
    assert_eq!(answered, 0, "a cookie two keys old is refused");
    assert!(delta(&middle, &after, "cookie_forged") >= 5);
}

/// The server side's view of the connection a `/tcp_info?sid=` request
/// arrived on, e.g. `ts=1 sack=1 wscale=10,7 ecn=0 snd_mss=32768 ...`.
fn server_options(cluster: &Cluster, sid: &str) -> HashMap<String, String> {
    let r = cluster.get(&format!("/tcp_info?sid={sid}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn every_option_is_kept_where_kernel_cookies_lose_them() {
    // With timestamps on (this machine's default): all of them, and
    // loopback's MSS, which a kernel cookie clamps to 1460.
    let cluster = Cluster::start(2, BPF_COOKIE);
    if !runs(&cluster) {
        return;
    }
    let sessions = cluster.sessions_on_every_worker(2, 1);
    let on = server_options(&cluster, &sessions[0].0);
    println!("bpf-cookie, timestamps on, server side: {on:?}");
    assert_eq!(on["worker"], sessions[0].1.to_string());
    assert_eq!(on["ts"], "1");
    assert_eq!(on["sack"], "1");
    assert_ne!(on["wscale"], "-");
    let mss: u32 = on["snd_mss"].parse().unwrap();
    assert!(mss > 1460, "loopback's MSS clamped: {mss}");
    drop(cluster);

    // Timestamps off (a Windows-like client): kernel cookies lose window
    // scaling and SACK; sticky's keep them. Both modes in one namespace.
    let ns = match NetNs::new(&[("net.ipv4.tcp_timestamps", "0")]) {
        Ok(ns) => ns,
        Err(e) => return println!("skipped the timestamps-off half: no network namespace ({e})"),
    };
    ns.enter();
    let worker = sticky_tests::demo_worker_bin();
    let start = |placement: &str| {
        Cluster::start_custom(
            "127.0.0.1:0",
            2,
            &["--placement", placement],
            &[worker.to_str().unwrap()],
            |cmd| ns.configure(cmd),
        )
    };
    let ours = start("bpf-cookie");
    assert!(runs(&ours), "ran outside the namespace, not inside");
    let sid = &ours.sessions_on_every_worker(2, 1)[0].0;
    let kept = server_options(&ours, sid);
    drop(ours);
    let kernel = start("cookie");
    let sid = &kernel.sessions_on_every_worker(2, 1)[0].0;
    let lost = server_options(&kernel, sid);
    println!(
        "timestamps off: bpf-cookie server side {kept:?}; kernel cookie (--placement cookie) {lost:?}"
    );
    assert_eq!(kept["ts"], "0");
    assert_eq!(kept["sack"], "1");
    assert_ne!(kept["wscale"], "-");
    assert!(kept["snd_mss"].parse::<u32>().unwrap() > 1460);
    assert_eq!(
        lost["wscale"], "-",
        "kernel cookies keep no window scale without timestamps"
    );
}

#[test]
fn a_syn_reusing_a_time_wait_connection_is_served_by_the_stack_on_its_owner() {
    // The server closes first and keeps each connection in TIME_WAIT; the
    // tc program sees a socket on the 4-tuple and leaves the SYN to the
    // stack: the default (sorting listener) path, still on the owner.
    // A namespace of its own: its TIME_WAIT table is not full of other
    // tests' and benchmarks' connections (net.ipv4.tcp_max_tw_buckets).
    let ns = match NetNs::new(&[]) {
        Ok(ns) => ns,
        Err(e) => return println!("skipped: no network namespace ({e})"),
    };
    ns.enter();
    let worker = sticky_tests::demo_worker_bin();
    let cluster = Cluster::start_custom(
        "127.0.0.1:0",
        2,
        BPF_COOKIE,
        &[worker.to_str().unwrap()],
        |cmd| ns.configure(cmd),
    );
    if !runs(&cluster) {
        return;
    }
    let sessions = cluster.sessions_on_every_worker(2, 2);
    let source = std::net::Ipv4Addr::new(127, 62, 0, 1);
    let exchange = |port: u16, sid: &str| {
        let mut s = connect_from(std::net::SocketAddrV4::new(source, port), cluster.addr);
        let port = s.local_addr().unwrap().port();
        let req = format!("GET /?sid={sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let r = read_response(s);
        assert_eq!(r.status, 200, "{}", r.text());
        (port, r.worker)
    };
    let n = 20;
    let first: Vec<(u16, Option<usize>)> = (0..n)
        .map(|i| exchange(0, &sessions[i % sessions.len()].0))
        .collect();
    // Count the 4-tuples the server holds, the SYNs that must go to the stack.
    let held = time_wait_count(cluster.addr, source);
    let middle = cluster.stats();
    let again: Vec<Option<usize>> = first
        .iter()
        .enumerate()
        .map(|(i, (port, _))| exchange(*port, &sessions[(i + 1) % sessions.len()].0).1)
        .collect();
    let after = cluster.stats();
    let d = |k: &str| delta(&middle, &after, k);
    let right_first = (0..n)
        .filter(|&i| first[i].1 == Some(sessions[i % sessions.len()].1))
        .count();
    let right_again = (0..n)
        .filter(|&i| again[i] == Some(sessions[(i + 1) % sessions.len()].1))
        .count();
    println!(
        "{n} connections, then the same {n} 4-tuples again ({held} held in TIME_WAIT by the server): \
         {right_first} and {right_again} on their owner; second round cookie_syn_passed +{} \
         cookie_assigned +{} syn +{} placed_softirq +{} placed_queue +{}",
        d("cookie_syn_passed"),
        d("cookie_assigned"),
        d("syn"),
        d("placed_softirq"),
        d("placed_queue"),
    );
    assert_eq!(right_first, n);
    assert_eq!(right_again, n);
    assert_eq!(held, n, "the server keeps every connection in TIME_WAIT");
    assert_eq!(
        d("cookie_syn_passed"),
        held as u64,
        "every reusing SYN left to the stack"
    );
    assert_eq!(d("syn"), held as u64, "and taken by the sorting listener");
    assert_eq!(
        d("cookie_assigned"),
        (n - held) as u64,
        "the others by cookie"
    );
}

/// Connections from `client` that the server on `server` holds in TIME_WAIT.
fn time_wait_count(server: std::net::SocketAddr, client: std::net::Ipv4Addr) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Htan", "state", "time-wait", "src"])
        .arg(server.to_string())
        .args(["dst", &client.to_string()])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// A TCP segment from `from` to `to` with `flags`, `seq`, `ack` and
/// `payload`, sent through a raw socket (checksummed, as a client's is).
fn send_segment(
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    (seq, ack, flags): (u32, u32, u8),
    payload: &[u8],
) {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&from.port().to_be_bytes());
    seg.extend_from_slice(&to.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.extend_from_slice(&[5 << 4, flags]);
    seg.extend_from_slice(&65535u16.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    seg.extend_from_slice(payload);
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&from.ip().octets());
    add(&to.ip().octets());
    add(&[0, libc::IPPROTO_TCP as u8]);
    add(&(seg.len() as u16).to_be_bytes());
    add(&seg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    seg[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    // SAFETY: a raw socket used for one sendto, then closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let src = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*from.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let dst = libc::sockaddr_in {
            sin_addr: libc::in_addr {
                s_addr: u32::from(*to.ip()).to_be(),
            },
            ..src
        };
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, (&raw const src).cast(), len), 0);
        let sent = libc::sendto(
            fd,
            seg.as_ptr().cast(),
            seg.len(),
            0,
            (&raw const dst).cast(),
            len,
        );
        assert_eq!(
            sent,
            seg.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        libc::close(fd);
    }
}

#[test]
fn a_forged_cookie_ack_is_dropped_not_placed() {
    let cluster = Cluster::start(2, BPF_COOKIE);
    if !runs(&cluster) {
        return;
    }
    let sessions = cluster.sessions_on_every_worker(2, 1);
    let std::net::SocketAddr::V4(server) = cluster.addr else {
        panic!("IPv4 cluster expected")
    };
    let from = std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(127, 63, 0, 9),
        40_000 + (server.port() % 20_000),
    );
    let request = format!("GET /?sid={} HTTP/1.1\r\nHost: x\r\n\r\n", sessions[0].0);
    let before = cluster.stats();
    // ACK flag (0x10) and PSH (0x08): a first data segment with made-up
    // cookies, as a blind attacker would send them.
    for guess in [0x1234_5678u32, 0xdead_beef, 1, 0xffff_ffff] {
        send_segment(from, server, (0x1000, guess, 0x18), request.as_bytes());
    }
    // A pure ACK with a made-up cookie too.
    send_segment(from, server, (0x1000, 0x4242_4242, 0x10), b"");
    std::thread::sleep(Duration::from_millis(200));
    let after = cluster.stats();
    let d = |k: &str| delta(&before, &after, k);
    println!(
        "5 forged cookie ACKs (4 with a sid request): cookie_forged +{} cookie_assigned +{} \
         placed_cookie +{} by_sid +{} balanced +{}",
        d("cookie_forged"),
        d("cookie_assigned"),
        d("placed_cookie"),
        d("by_sid"),
        d("balanced"),
    );
    assert_eq!(d("cookie_forged"), 5);
    assert_eq!(d("cookie_assigned"), 0);
    assert_eq!(d("placed_cookie"), 0);
    assert_eq!(d("by_sid"), 0);
    // The real client still gets in.
    let r = cluster.get(&format!("/?sid={}", sessions[0].0));
    assert_eq!(r.worker, Some(sessions[0].1));
}

#[test]
fn ipv6_sid_requests_reach_their_owner_with_every_option() {
    let worker = sticky_tests::demo_worker_bin();
    let cluster = Cluster::start_with("[::1]:0", 2, BPF_COOKIE, &[worker.to_str().unwrap()]);
    if !runs(&cluster) {
        return;
    }
    let sessions = cluster.sessions_on_every_worker(2, 2);
    let before = cluster.stats();
    let placed = cluster.requests_on_owner(&sessions, 100, 1)
        + cluster.requests_on_owner(&sessions, 200, 16);
    let after = cluster.stats();
    let options = server_options(&cluster, &sessions[0].0);
    let d = |k: &str| delta(&before, &after, k);
    println!(
        "IPv6 bpf-cookie: {placed}/300 on their owner, cookie_assigned +{} placed_cookie +{} syn +{}; \
         server side {options:?}",
        d("cookie_assigned"),
        d("placed_cookie"),
        d("syn"),
    );
    assert_eq!(placed, 300);
    assert_eq!(d("cookie_assigned"), 300);
    assert_eq!(d("placed_cookie"), 300);
    assert_eq!(d("syn"), 0);
    assert_eq!(options["ts"], "1");
    assert_eq!(options["sack"], "1");
    assert_ne!(options["wscale"], "-");
    // Loopback's IPv6 MSS, not a kernel cookie's 1440 or 8940 at most.
    assert!(
        options["snd_mss"].parse::<u32>().unwrap() > 8940,
        "{options:?}"
    );
}

#[test]
fn a_dual_stack_listener_takes_ipv4_cookies_too() {
    let worker = sticky_tests::demo_worker_bin();
    let cluster = Cluster::start_with("[::]:0", 2, BPF_COOKIE, &[worker.to_str().unwrap()]);
    if !runs(&cluster) {
        return;
    }
    let sessions = cluster.sessions_on_every_worker(2, 1);
    let before = cluster.stats();
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.addr.port()));
    let mut right = 0;
    for i in 0..40 {
        let (sid, owner) = &sessions[i % sessions.len()];
        let r = sticky_tests::request(v4, "GET", &format!("/?sid={sid}"), b"");
        assert_eq!(r.status, 200);
        right += usize::from(r.worker == Some(*owner));
    }
    let after = cluster.stats();
    println!(
        "[::] listener, 40 IPv4 sid requests: {right} on their owner, cookie_assigned +{}",
        delta(&before, &after, "cookie_assigned")
    );
    assert_eq!(right, 40);
    assert_eq!(delta(&before, &after, "cookie_assigned"), 40);
}

/// Runs `ip ARGS`, panicking with its error.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Turns checksum offload off on `ifname` (in the calling thread's
/// namespace), both ways (SIOCETHTOOL, ETHTOOL_SRXCSUM / ETHTOOL_STXCSUM):
/// the receiving stack then verifies every TCP checksum in software,
/// sticky's SYN-ACKs included.
fn checksums_in_software(ifname: &str) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    for cmd in [0x15u32, 0x17] {
        let mut value = EthtoolValue { cmd, data: 0 };
        let mut req = IfReq {
            name: [0; 16],
            data: &mut value,
            _pad: [0; 16],
        };
        req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        // SAFETY: an ioctl on a socket of ours with a valid ifreq.
        let rc = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            let rc = libc::ioctl(fd, SIOCETHTOOL, &mut req);
            libc::close(fd);
            rc
        };
        assert_eq!(
            rc,
            0,
            "SIOCETHTOOL {cmd:#x} on {ifname}: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn clients_across_a_veth_link_are_answered_on_that_interface() {
    // Not loopback: a server namespace and a client namespace joined by a
    // veth pair, checksum offload off so that both stacks verify every
    // checksum. sticky listens on [::], so its program is on every
    // interface that is up, and answers the client's SYNs out of veth0.
    let (server_ns, client_ns) = match (NetNs::new(&[]), NetNs::new(&[])) {
        (Ok(s), Ok(c)) => (s, c),
        (Err(e), _) | (_, Err(e)) => return println!("skipped: no network namespace ({e})"),
    };
    let (s, c) = (server_ns.name.as_str(), client_ns.name.as_str());
    ip(&[
        "-n", s, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", c,
    ]);
    ip(&["-n", s, "addr", "add", "10.201.0.1/24", "dev", "veth0"]);
    ip(&["-n", c, "addr", "add", "10.201.0.2/24", "dev", "veth1"]);
    ip(&[
        "-n",
        s,
        "addr",
        "add",
        "fd00:201::1/64",
        "dev",
        "veth0",
        "nodad",
    ]);
    ip(&[
        "-n",
        c,
        "addr",
        "add",
        "fd00:201::2/64",
        "dev",
        "veth1",
        "nodad",
    ]);
    ip(&["-n", s, "link", "set", "veth0", "up"]);
    ip(&["-n", c, "link", "set", "veth1", "up"]);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            client_ns.enter();
            checksums_in_software("veth1");
        });
    });
    server_ns.enter();
    checksums_in_software("veth0");
    let worker = sticky_tests::demo_worker_bin();
    // [::]: dual-stack, IPv4 and IPv6 clients alike.
    let cluster = Cluster::start_custom(
        "[::]:0",
        2,
        BPF_COOKIE,
        &[worker.to_str().unwrap()],
        |cmd| server_ns.configure(cmd),
    );
    if !runs(&cluster) {
        return;
    }
    let attached = cluster.log_line("sticky's SYN cookies on the ingress of");
    let sessions = cluster.sessions_on_every_worker(2, 2);
    let before = cluster.stats();
    let port = cluster.addr.port();
    let remote = std::net::SocketAddr::from(([10, 201, 0, 1], port));
    let remote6 = std::net::SocketAddr::from(([0xfd00, 0x201, 0, 0, 0, 0, 0, 1], port));
    let (right, options) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                client_ns.enter();
                let right = (0..100)
                    .filter(|i| {
                        let (sid, owner) = &sessions[i % sessions.len()];
                        let to = if i % 2 == 0 { remote } else { remote6 };
                        let r = sticky_tests::request(to, "GET", &format!("/?sid={sid}"), b"");
                        assert_eq!(r.status, 200, "{}", r.text());
                        r.worker == Some(*owner)
                    })
                    .count();
                let r = sticky_tests::request(
                    remote,
                    "GET",
                    &format!("/tcp_info?sid={}", sessions[0].0),
                    b"",
                );
                (right, r.text())
            })
            .join()
            .unwrap()
    });
    let after = cluster.stats();
    let d = |k: &str| delta(&before, &after, k);
    println!(
        "veth, checksums verified in software: {attached:?}; 100 sid requests from the client \
         namespace (half IPv4, half IPv6), {right} on their owner, \
         cookie_syn_answered +{} cookie_assigned +{} syn +{}; server side {}",
        d("cookie_syn_answered"),
        d("cookie_assigned"),
        d("syn"),
        options.trim(),
    );
    assert!(attached.contains("veth0"), "{attached}");
    assert_eq!(right, 100);
    assert_eq!(d("cookie_assigned"), 101);
    assert_eq!(d("syn"), 0);
    assert!(options.contains("ts=1 sack=1"), "{options}");
}

#[test]
fn sessions_of_unmodified_engine_io_workers_are_learned() {
    let python = sticky_tests::python3_bin();
    let cluster = Cluster::start_with(
        "127.0.0.1:0",
        3,
        BPF_COOKIE,
        &[python.to_str().unwrap(), ENGINE_IO_POLLING_PY],
    );
    let bpf = runs(&cluster);
    let unknown = cluster.refused_polls(10, 3);
    let stats = cluster.stats();
    println!(
        "bpf-cookie {}, learning: 10 sessions x 3 requests, {unknown} unknown; learned={} cookie_assigned={}",
        if bpf { "on" } else { "off (fallback)" },
        stats["learned"],
        stats.get("cookie_assigned").map_or("-", |s| s.as_str()),
    );
    assert_eq!(unknown, 0);
    assert!(cluster.counter("learned") >= 10);
    if bpf {
        assert!(cluster.counter("cookie_assigned") >= 40);
    }
}
