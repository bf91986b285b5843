//! Hostile and malformed first segments over real sockets: real `sticky
//! run`, real demo workers, the kernel programs placing each connection.
//! Each row is a client behaviour and its defined outcome: where the
//! connection goes (its sid's owner, or balanced), which `sticky stats`
//! counter says why, and what the worker makes of it (an answer, or a
//! close). After all rows nothing has leaked: the supervisor and every
//! worker are alive, the supervisor's descriptors and the kernel maps are
//! back to their baseline.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    time::{Duration, Instant},
};

use sticky_tests::delta;
use sticky_tests::{
    fd_count, map_entries, parse_response, raise_nofile, random_sid, Cluster, NetNs,
};

/// The counters that say why a connection was balanced.
const REASONS: [&str; 4] = ["sid_unknown", "sid_invalid", "no_sid", "not_http"];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    /// On the worker owning this sid (index into the row's sids).
    Owner(usize),
    Balanced,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    /// The worker answers with this status.
    Status(u16),
    /// The client half-closes; the worker closes without an answer.
    Closed,
}

struct Row {
    name: String,
    /// Written in order, `gap` apart, TCP_NODELAY: one segment each.
    pieces: Vec<Vec<u8>>,
    gap: Duration,
    place: Place,
    /// The counter that must grow by one (None: none of REASONS).
    reason: Option<&'static str>,
    answer: Answer,
}

fn row(name: &str, request: impl Into<Vec<u8>>, place: Place, reason: Option<&'static str>) -> Row {
    Row {
        name: name.to_owned(),
        pieces: vec![request.into()],
        gap: Duration::ZERO,
        place,
        reason,
        answer: Answer::Status(200),
    }
}

/// `GET <target>` with the headers the rows share.
fn get(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: sticky\r\nConnection: close\r\n\r\n")
}

/// Splits `text` into `n` pieces of about equal size.
fn split(text: &str, n: usize) -> Vec<Vec<u8>> {
    let size = text.len().div_ceil(n);
    text.as_bytes().chunks(size).map(<[u8]>::to_vec).collect()
}

/// Deterministic bytes (xorshift), never containing CR LF CR LF.
fn binary(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match (x >> 24) as u8 {
                b'\r' | b'\n' => 0,
                b => b,
            }
        })
        .collect()
}

/// The start of a TLS 1.2 ClientHello (record header, handshake header,
/// version, random, session id, cipher suites, compression, SNI).
fn client_hello() -> Vec<u8> {
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0x4c, 0x01, 0x00, 0x00, 0x48, 0x03, 0x03,
    ];
    hello.extend(binary(32, 7)); // random
    hello.extend([0x00, 0x00, 0x04, 0x13, 0x01, 0xc0, 0x2f, 0x01, 0x00]);
    hello.extend([
        0x00, 0x13, 0x00, 0x00, 0x00, 0x0f, 0x00, 0x0d, 0x00, 0x00, 0x0a,
    ]);
    hello.extend(b"sticky.dev");
    hello
}

/// Plays one row; returns a description of what went wrong, if anything.
fn play(cluster: &Cluster, owners: &[usize], row: &Row) -> Result<String, String> {
    let before = cluster.stats();
    let mut s = TcpStream::connect(cluster.addr).map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    for (i, piece) in row.pieces.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(row.gap);
        }
        s.write_all(piece).map_err(|e| format!("write: {e}"))?;
    }
    if row.answer == Answer::Closed {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    let (got_answer, worker) = match (&read, raw.is_empty()) {
        (Ok(_), true) => (Answer::Closed, None),
        (Ok(_), false) => {
            let r = parse_response(&raw);
            (Answer::Status(r.status), r.worker)
        }
        (Err(e), _) => return Err(format!("read: {e}")),
    };
    let after = cluster.stats();
    let d = |k: &str| delta(&before, &after, k);
    let mut wrong = Vec::new();
    if got_answer != row.answer {
        wrong.push(format!("answer {got_answer:?}, want {:?}", row.answer));
    }
    match row.place {
        Place::Owner(i) => {
            if worker != Some(owners[i]) || d("by_sid") != 1 {
                wrong.push(format!(
                    "want owner {}, got worker {worker:?}, by_sid +{}",
                    owners[i],
                    d("by_sid")
                ));
            }
        }
        Place::Balanced => {
            if d("balanced") != 1 || d("by_sid") != 0 {
                wrong.push(format!(
                    "want balanced, got balanced +{} by_sid +{}",
                    d("balanced"),
                    d("by_sid")
                ));
            }
        }
    }
    let grew: Vec<&str> = REASONS.into_iter().filter(|k| d(k) > 0).collect();
    let queue = d("placed_queue") == 1;
    // The socket filter (queue path) skips segments not starting with A-Z
    // without counting them; the softirq path counts them `not_http`.
    let uncounted_ok = row.reason == Some("not_http") && queue && grew.is_empty();
    if grew != row.reason.into_iter().collect::<Vec<_>>() && !uncounted_ok
        || REASONS.iter().any(|k| d(k) > 1)
    {
        wrong.push(format!("want counter {:?}, grew {grew:?}", row.reason));
    }
    let path = if queue { "queue" } else { "softirq" };
    if wrong.is_empty() {
        Ok(format!(
            "{:<44} {:<12} {:<14} {got_answer:?} ({path})",
            row.name,
            match worker {
                Some(w) => format!("worker {w}"),
                None => "-".into(),
            },
            grew.first().copied().unwrap_or("by_sid"),
        ))
    } else {
        Err(format!("{}: {} ({path})", row.name, wrong.join("; ")))
    }
}

/// The supervisor's baseline: descriptors and the growable kernel maps.
fn footprint(cluster: &Cluster) -> (usize, usize, usize, usize) {
    let pid = cluster.pid();
    (
        fd_count(pid),
        map_entries(pid, "flows"),
        map_entries(pid, "placed_flows"),
        map_entries(pid, "sessions"),
    )
}

/// After a hostile run: supervisor and workers alive (same pids), no
/// descriptor or map entry left behind. The fd count may differ by the
/// connections the control socket serves at that moment.
fn assert_nothing_leaked(cluster: &Cluster, pids: &[u32], baseline: (usize, usize, usize, usize)) {
    let now = footprint(cluster);
    println!("supervisor fds / flows / placed_flows / sessions: {baseline:?} -> {now:?}");
    assert!(
        std::path::Path::new(&format!("/proc/{}", cluster.pid())).exists(),
        "the supervisor died"
    );
    for (i, pid) in pids.iter().enumerate() {
        assert_eq!(
            cluster.worker_pid(i),
            Some(*pid),
            "worker {i} was restarted"
        );
    }
    assert!(
        now.0 <= baseline.0 + 2,
        "supervisor descriptors grew: {baseline:?} -> {now:?}"
    );
    assert!(
        now.1 <= baseline.1,
        "flows entries left behind: {baseline:?} -> {now:?}"
    );
    assert!(
        now.2 <= baseline.2,
        "placed_flows entries left behind: {baseline:?} -> {now:?}"
    );
    assert_eq!(now.3, baseline.3, "sessions changed");
}

#[test]
fn hostile_first_segments_have_defined_outcomes() {
    let cluster = Cluster::start(3, &["--balance", "round-robin"]);
    let sessions = cluster.sessions_on_every_worker(3, 1);
    // Two sids on two different workers.
    let (a, b) = (
        &sessions[0],
        sessions.iter().find(|s| s.1 != sessions[0].1).unwrap(),
    );
    let owners = [a.1, b.1];
    let (a, b) = (a.0.as_str(), b.0.as_str());
    let pids: Vec<u32> = (0..3).map(|i| cluster.worker_pid(i).unwrap()).collect();
    let baseline = footprint(&cluster);
    let sid65 = format!("{a}{}", "x".repeat(65 - a.len()));
    let polling = format!("/socket.io/?EIO=4&transport=polling&sid={a}");
    let big_body = "z".repeat(64 * 1024 - 200);
    let big = format!(
        "POST /echo?sid={a} HTTP/1.1\r\nHost: sticky\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{big_body}",
        big_body.len()
    );
    let long_path = format!("/{}?sid={a}", "p".repeat(60 * 1024));
    use Place::*;
    let mut rows = vec![
        row(
            "sid of worker A",
            get(&format!("/?sid={a}")),
            Owner(0),
            None,
        ),
        row(
            "sid of worker B, Engine.IO polling",
            get(&polling.replace(a, b)),
            Owner(1),
            None,
        ),
        row(
            "no sid",
            get("/socket.io/?EIO=4&transport=polling"),
            Balanced,
            Some("no_sid"),
        ),
        row("empty sid=", get("/?sid="), Balanced, Some("no_sid")),
        row(
            "empty sid= then sid=A",
            get(&format!("/?sid=&sid={a}")),
            Balanced,
            Some("no_sid"),
        ),
        row(
            "65-byte sid",
            get(&format!("/?sid={sid65}")),
            Balanced,
            Some("sid_invalid"),
        ),
        row(
            "sid with '.'",
            get(&format!("/?sid={a}.x")),
            Balanced,
            Some("sid_invalid"),
        ),
        row(
            "sid with '%2D'",
            get(&format!("/?sid={a}%2D")),
            Balanced,
            Some("sid_invalid"),
        ),
        row(
            "sid with a UTF-8 byte",
            get(&format!("/?sid={a}é")),
            Balanced,
            Some("sid_invalid"),
        ),
        row(
            "sid twice: A then B (first wins)",
            get(&format!("/?sid={a}&sid={b}")),
            Owner(0),
            None,
        ),
        row(
            "sid twice: B then A (first wins)",
            get(&format!("/?sid={b}&sid={a}")),
            Owner(1),
            None,
        ),
        row(
            "sid only in the path",
            get(&format!("/sid={a}/x")),
            Balanced,
            Some("no_sid"),
        ),
        row(
            "sid only in the fragment",
            get(&format!("/x#?sid={a}")),
            Balanced,
            Some("no_sid"),
        ),
        row(
            "sid only in a header",
            format!(
                "GET /x HTTP/1.1\r\nCookie: sid={a}\r\nX-Sid: {a}\r\nConnection: close\r\n\r\n"
            ),
            Balanced,
            Some("no_sid"),
        ),
        row(
            "xsid=",
            get(&format!("/?xsid={a}")),
            Balanced,
            Some("no_sid"),
        ),
        row("SID=", get(&format!("/?SID={a}")), Balanced, Some("no_sid")),
        row(
            "percent-encoded name %73id=",
            get(&format!("/?%73id={a}")),
            Balanced,
            Some("no_sid"),
        ),
        row(
            "unknown sid",
            get(&format!("/?sid=NoSuch{}", random_sid(14))),
            Balanced,
            Some("sid_unknown"),
        ),
        row("64 KiB first segment, sid in line", big, Owner(0), None),
        row(
            "60 KiB path before the sid",
            get(&long_path),
            Balanced,
            Some("no_sid"),
        ),
    ];
    // Request lines split across segments: only the first one is parsed.
    let mut split_rows = vec![
        (
            "split in 2, sid terminated in the first",
            format!("/?sid={a}&EIO=4"),
            format!("GET /?sid={a}&"),
            Owner(0),
            None,
        ),
        (
            "split in 2, before the sid",
            format!("/?EIO=4&sid={a}"),
            "GET /?EIO=4&s".to_owned(),
            Balanced,
            Some("no_sid"),
        ),
        (
            "split in 2, inside the sid value",
            format!("/?sid={a}"),
            format!("GET /?sid={}", &a[..5]),
            Balanced,
            Some("sid_invalid"),
        ),
        (
            "split in 2, right after the sid value",
            format!("/?sid={a}"),
            format!("GET /?sid={a}"),
            Balanced,
            Some("sid_invalid"),
        ),
        (
            "split in 2, request line then headers",
            format!("/?sid={b}"),
            format!("GET /?sid={b} HTTP/1.1\r\n"),
            Owner(1),
            None,
        ),
    ]
    .into_iter()
    .map(|(name, target, first, place, reason)| {
        let full = get(&target);
        let rest = full
            .strip_prefix(first.as_str())
            .unwrap_or_else(|| panic!("{name}"));
        Row {
            name: name.to_owned(),
            pieces: vec![first.clone().into_bytes(), rest.as_bytes().to_vec()],
            gap: Duration::from_millis(30),
            place,
            reason,
            answer: Answer::Status(200),
        }
    })
    .collect::<Vec<_>>();
    rows.append(&mut split_rows);
    rows.push(Row {
        name: "split in 10 segments".into(),
        pieces: split(&get(&polling), 10),
        gap: Duration::from_millis(20),
        place: Balanced,
        reason: Some("no_sid"),
        answer: Answer::Status(200),
    });
    for (name, bytes) in [
        ("TLS ClientHello", client_hello()),
        ("random binary, 1 KiB", binary(1024, 42)),
        (
            "random binary starting 'G'",
            [b"G".to_vec(), binary(300, 9)].concat(),
        ),
        ("NUL bytes", vec![0; 64]),
    ] {
        rows.push(Row {
            name: name.into(),
            pieces: vec![bytes],
            gap: Duration::ZERO,
            place: Balanced,
            reason: Some("not_http"),
            answer: Answer::Closed,
        });
    }

    let mut failures = Vec::new();
    for row in &rows {
        match play(&cluster, &owners, row) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                println!("FAILED {e}");
                failures.push(e);
            }
        }
    }
    assert_nothing_leaked(&cluster, &pids, baseline);
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Writes `first`, then after `gap` the rest, on a connection made while
/// the supervisor is stopped (so nothing rotates and the first segment
/// lands in the sorting queue: the socket filter decides).
#[test]
fn queue_path_decides_on_the_first_segment_only() {
    let cluster = Cluster::start(3, &["--balance", "round-robin"]);
    let sessions = cluster.sessions_on_every_worker(3, 1);
    let before = cluster.stats();
    unsafe { libc::kill(cluster.pid() as i32, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(100));
    let pending: Vec<(TcpStream, usize, &str)> = sessions
        .iter()
        .flat_map(|(sid, owner)| {
            let other = &sessions.iter().find(|s| s.1 != *owner).unwrap().0;
            [
                // Headers in their own segment: "Host: ..." starts with A-Z.
                (
                    vec![
                        format!("GET /?sid={sid} HTTP/1.1\r\n"),
                        "Host: x\r\nConnection: close\r\n\r\n".into(),
                    ],
                    *owner,
                    "request line, then headers",
                ),
                // A second request line in a later segment must not move it.
                (
                    vec![
                        format!("GET /?sid={sid} HTTP/1.1\r\n"),
                        format!(
                            "X: y\r\n\r\nGET /?sid={other} HTTP/1.1\r\nConnection: close\r\n\r\n"
                        ),
                    ],
                    *owner,
                    "pipelined second request for another sid",
                ),
            ]
        })
        .map(|(pieces, owner, what)| {
            let mut s = TcpStream::connect(cluster.addr).unwrap();
            s.set_nodelay(true).unwrap();
            for (i, p) in pieces.iter().enumerate() {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                s.write_all(p.as_bytes()).unwrap();
            }
            (s, owner, what)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    unsafe { libc::kill(cluster.pid() as i32, libc::SIGCONT) };
    let mut wrong = Vec::new();
    for (mut s, owner, what) in pending {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let r = parse_response(&raw);
        if r.worker != Some(owner) {
            wrong.push(format!("{what}: worker {:?}, owner {owner}", r.worker));
        }
    }
    let after = cluster.stats();
    println!(
        "queue path: placed_queue +{} by_sid +{} balanced +{} not_http +{}",
        delta(&before, &after, "placed_queue"),
        delta(&before, &after, "by_sid"),
        delta(&before, &after, "balanced"),
        delta(&before, &after, "not_http"),
    );
    assert!(wrong.is_empty(), "misplaced:\n{}", wrong.join("\n"));
}

/// Connects and sends nothing, or one byte a second: neither holds up
/// anyone else.
#[test]
fn slow_clients_do_not_block_others() {
    let cluster = Cluster::start(2, &["--balance", "round-robin"]);
    let (sid, owner) = cluster.sessions_on_every_worker(2, 1).remove(0);
    let addr = cluster.addr;
    let by_sid = format!("/?sid={sid}");
    let before = cluster.stats();
    // 20 silent connections, held.
    let silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // One client at a byte a second: "GET /" in 5 s, then the rest at once.
    let trickle = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        for b in b"GET /" {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        }
        write!(s, "?sid={sid} HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_response(&raw)
    });
    // Meanwhile everybody else is served, by sid.
    let start = Instant::now();
    let mut served = 0;
    while start.elapsed() < Duration::from_secs(6) {
        let r = cluster.get(&by_sid);
        assert_eq!((r.status, r.worker), (200, Some(owner)));
        served += 1;
    }
    let slow = trickle.join().unwrap();
    let mid = cluster.stats();
    println!(
        "1 byte/s client: answered {} by worker {:?} (balanced: its first segment was \"G\"); \
         {served} other requests served meanwhile",
        slow.status, slow.worker
    );
    assert_eq!(slow.status, 200);
    assert!(
        delta(&before, &mid, "no_sid") >= 1,
        "the 1-byte first segment should count no_sid"
    );
    // The silent ones: held by TCP_DEFER_ACCEPT, no worker sees them yet.
    let queued_before = delta(&before, &mid, "placed_queue");
    // After the kernel gives up deferring they are balanced to a worker,
    // which then serves them like any connection.
    let start = Instant::now();
    let held = loop {
        let now = cluster.stats();
        let placed = delta(&mid, &now, "placed_queue") + delta(&mid, &now, "placed_softirq");
        if placed >= silent.len() as u64 || start.elapsed() > Duration::from_secs(60) {
            break start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let end = cluster.stats();
    println!(
        "20 silent connections: placed_queue during the first 6 s +{queued_before}; \
         all handed to workers {:.1} s later (placed_queue +{}, balanced +{})",
        held.as_secs_f64() + 6.0,
        delta(&mid, &end, "placed_queue"),
        delta(&mid, &end, "balanced"),
    );
    assert!(delta(&mid, &end, "balanced") >= silent.len() as u64);
    for mut s in silent {
        s.set_nodelay(true).unwrap();
        write!(s, "GET /late HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        assert_eq!(parse_response(&raw).status, 200);
    }
}

/// A cluster of 2 demo workers inside `ns` (the calling thread enters it).
fn cluster_in(ns: &NetNs, workers: usize) -> Cluster {
    ns.enter();
    let worker = sticky_tests::demo_worker_bin();
    Cluster::start_custom(
        "127.0.0.1:0",
        workers,
        &["--balance", "round-robin"],
        &[worker.to_str().unwrap()],
        |cmd| ns.configure(cmd),
    )
}

/// Sends `n` sid-carrying requests (cycling over `sessions`); returns how
/// many reached the sid's owner. Every one must be answered.
fn requests_on_owner(cluster: &Cluster, sessions: &[(String, usize)], n: usize) -> usize {
    // Blocks of the same sid, so that balancing cannot land on the owner
    // by chance more than 1 in `sessions.len()` times.
    (0..n)
        .filter(|i| {
            let (sid, owner) = &sessions[i * sessions.len() / n];
            let r = cluster.get(&format!("/?sid={sid}"));
            assert_eq!(r.status, 200, "{}", r.text());
            r.worker == Some(*owner)
        })
        .count()
}

/// Closes with RST (SO_LINGER 0): the server forgets the connection at once.
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid struct on an open socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[test]
fn ten_thousand_silent_connections_do_not_stop_service() {
    let ns = match NetNs::new(&[]) {
        Ok(ns) => ns,
        Err(e) => return println!("skipped: no network namespace ({e})"),
    };
    let nofile = raise_nofile(40_000);
    assert!(
        nofile >= 12_000,
        "RLIMIT_NOFILE {nofile}: cannot hold 10,000 connections"
    );
    let cluster = cluster_in(&ns, 2);
    let sessions = cluster.sessions_on_every_worker(2, 1);
    let tcp = |n| NetNs::tcp_counter("TcpExt", n);
    let (cookies, overflows) = (tcp("SyncookiesSent"), tcp("ListenOverflows"));
    let before = cluster.stats();
    let start = Instant::now();
    let mut silent = Vec::new();
    let mut refused = 0;
    for _ in 0..10_000 {
        match TcpStream::connect_timeout(&cluster.addr, Duration::from_secs(5)) {
            Ok(s) => silent.push(s),
            Err(_) => refused += 1,
        }
    }
    let opened = start.elapsed();
    let mid = cluster.stats();
    let on_owner = requests_on_owner(&cluster, &sessions, 100);
    let after = cluster.stats();
    let d = |a: &HashMap<String, String>, b: &HashMap<String, String>, k: &str| delta(a, b, k);
    println!(
        "10,000 silent connections: {} connected in {opened:.1?}, {refused} failed; \
         kernel: syn +{}, absorbed +{}, handed to workers +{} (queue) +{} (softirq), \
         syncookies sent +{}, listen overflows +{}",
        silent.len(),
        d(&before, &mid, "syn"),
        d(&before, &mid, "absorbed"),
        d(&before, &mid, "placed_queue"),
        d(&before, &mid, "placed_softirq"),
        tcp("SyncookiesSent") - cookies,
        tcp("ListenOverflows") - overflows,
    );
    println!(
        "meanwhile 100 sid requests: all answered, {on_owner} on their owner \
         (by_sid +{}, balanced +{})",
        d(&mid, &after, "by_sid"),
        d(&mid, &after, "balanced")
    );
    let held = silent.len();
    for s in silent {
        reset(s);
    }
    assert_eq!(refused, 0, "connections were refused");
    assert!(held == 10_000);
    assert!(
        on_owner >= 90,
        "sid placement collapsed under 10,000 silent connections: {on_owner}/100"
    );
    // The workers are still the original processes: nothing crashed.
    assert!(cluster.worker_pid(0).is_some() && cluster.worker_pid(1).is_some());
}

#[test]
fn every_connection_syncookie_validated() {
    // tcp_syncookies=2 sends a cookie for every SYN, as under a SYN flood
    // with the request queue full: no request socket is kept, so neither
    // the softirq path nor the queue path applies; the selector places the
    // first data segment itself.
    let ns = match NetNs::new(&[("net.ipv4.tcp_syncookies", "2")]) {
        Ok(ns) => ns,
        Err(e) => return println!("skipped: no network namespace ({e})"),
    };
    let cluster = cluster_in(&ns, 3);
    let sessions = cluster.sessions_on_every_worker(3, 1);
    let cookies = NetNs::tcp_counter("TcpExt", "SyncookiesSent");
    let recv = NetNs::tcp_counter("TcpExt", "SyncookiesRecv");
    let before = cluster.stats();
    let n = 90;
    let on_owner = requests_on_owner(&cluster, &sessions, n);
    let after = cluster.stats();
    let d = |k: &str| delta(&before, &after, k);
    println!(
        "syncookies=2: {n} sid requests, all answered, {on_owner} on their owner; \
         cookies sent +{} validated +{}; placed_cookie +{} placed_softirq +{} \
         placed_queue +{} by_sid +{} balanced +{} absorbed +{}",
        NetNs::tcp_counter("TcpExt", "SyncookiesSent") - cookies,
        NetNs::tcp_counter("TcpExt", "SyncookiesRecv") - recv,
        d("placed_cookie"),
        d("placed_softirq"),
        d("placed_queue"),
        d("by_sid"),
        d("balanced"),
        d("absorbed"),
    );
    assert!(NetNs::tcp_counter("TcpExt", "SyncookiesSent") - cookies >= n as u64);
    // The cookie-carrying pure ACK goes to the sink and vanishes (absorbed);
    // the first data segment, carrying the same cookie, is placed by sid.
    assert_eq!(on_owner, n, "sid placement under syncookies");
    assert_eq!(d("placed_cookie"), n as u64);
    assert_eq!(d("by_sid"), n as u64);
    assert!(d("absorbed") >= n as u64);
}

#[test]
fn sessions_are_learned_from_syncookie_connections_too() {
    // Unmodified Engine.IO workers (learning) with every connection
    // syncookie-validated: the handshake's connection must be noted for
    // the learner like any other.
    let ns = match NetNs::new(&[("net.ipv4.tcp_syncookies", "2")]) {
        Ok(ns) => ns,
        Err(e) => return println!("skipped: no network namespace ({e})"),
    };
    ns.enter();
    let python = sticky_tests::python3_bin();
    let cluster = Cluster::start_custom(
        "127.0.0.1:0",
        3,
        &["--balance", "round-robin"],
        &[python.to_str().unwrap(), sticky_tests::ENGINE_IO_POLLING_PY],
        |cmd| ns.configure(cmd),
    );
    let unknown = cluster.refused_polls(10, 3);
    let stats = cluster.stats();
    println!(
        "syncookies=2, learning: 10 sessions x 3 requests, {unknown} unknown; learned={} placed_cookie={}",
        stats["learned"], stats["placed_cookie"]
    );
    assert_eq!(unknown, 0);
    assert!(cluster.counter("learned") >= 10);
}

/// Internet checksum (RFC 1071) over `chunks`.
fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `n` SYNs to `dst` from spoofed addresses in 10.99.0.0/16 (routed
/// out of lo: their SYN-ACKs vanish, as a flood's do). Needs a raw
/// socket (root); returns how many were sent.
fn syn_flood(dst: std::net::SocketAddrV4, n: u32) -> u32 {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain syscalls; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut sent = 0;
    for i in 0..n {
        let src = [10, 99, (i >> 8) as u8, i as u8];
        let sport = 10_000 + (i % 50_000) as u16;
        // TCP: ports, seq, ack 0, data offset 6 (MSS option), SYN, window.
        let mut tcp = Vec::with_capacity(24);
        tcp.extend(sport.to_be_bytes());
        tcp.extend(dst.port().to_be_bytes());
        tcp.extend((i.wrapping_mul(2_654_435_761)).to_be_bytes());
        tcp.extend([0, 0, 0, 0, 6 << 4, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        tcp.extend([2, 4, 0x05, 0xb4]); // MSS 1460
        let pseudo = [
            &src[..],
            &dst.ip().octets(),
            &[0, 6],
            &(tcp.len() as u16).to_be_bytes(),
        ]
        .concat();
        let sum = checksum(&[&pseudo, &tcp]);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        let total = (20 + tcp.len()) as u16;
        let mut packet = vec![0x45, 0];
        packet.extend(total.to_be_bytes());
        packet.extend([0, 0, 0x40, 0, 64, 6, 0, 0]);
        packet.extend(src);
        packet.extend(dst.ip().octets());
        packet.extend(tcp);
        // SAFETY: valid buffer and address.
        let rc = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc > 0 {
            sent += 1;
        }
    }
    sent
}

/// Request sockets (SYN_RECV) to local `port` in this thread's network
/// namespace.
fn syn_recv_count(port: u16) -> usize {
    let local = format!(":{port:04X}");
    std::fs::read_to_string("/proc/thread-self/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[3] == "03" && f[1].ends_with(&local)
        })
        .count()
}

/// A SYN flood of spoofed sources (no handshake ever completes), compared
/// with the same flood against a plain listener with the same backlog.
/// Sorting listeners are rotated, so no request queue of theirs ever fills
/// and the kernel would keep one request socket per SYN (30,000 of 30,000,
/// measured before the flood guard). The guard (sticky-user/src/flood.rs)
/// sends SYNs to the overflow listener once handshakes pile up, and the
/// kernel answers with cookies; cookie connections keep their sid placement.
#[test]
fn syn_flood_is_answered_with_cookies_and_sid_placement_continues() {
    let ns = match NetNs::new(&[]) {
        Ok(ns) => ns,
        Err(e) => return println!("skipped: no network namespace ({e})"),
    };
    // Spoofed sources routed out of lo: their SYN-ACKs come back in, are
    // not local and are not forwarded, so they vanish as a flood's do (no
    // route at all would free each request at once).
    let ok = std::process::Command::new("ip")
        .args(["-n", &ns.name, "route", "add", "10.99.0.0/16", "dev", "lo"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip route add");
    let cluster = cluster_in(&ns, 2);
    let sessions = cluster.sessions_on_every_worker(2, 1);
    let n = 30_000;

    // The baseline: a plain listener, backlog 4096 like sticky's.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::listen(plain.as_raw_fd(), 4096) }, 0);
    let std::net::SocketAddr::V4(plain_addr) = plain.local_addr().unwrap() else {
        unreachable!()
    };
    let cookies = NetNs::tcp_counter("TcpExt", "SyncookiesSent");
    syn_flood(plain_addr, n);
    std::thread::sleep(Duration::from_millis(300));
    let plain_pending = syn_recv_count(plain_addr.port());
    let plain_cookies = NetNs::tcp_counter("TcpExt", "SyncookiesSent") - cookies;

    let std::net::SocketAddr::V4(addr) = cluster.addr else {
        unreachable!()
    };
    let cookies = NetNs::tcp_counter("TcpExt", "SyncookiesSent");
    let before = cluster.stats();
    let start = Instant::now();
    let sent = syn_flood(addr, n);
    let took = start.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let pending = syn_recv_count(addr.port());
    let sticky_cookies = NetNs::tcp_counter("TcpExt", "SyncookiesSent") - cookies;
    let on_owner = requests_on_owner(&cluster, &sessions, 60);
    let after = cluster.stats();
    println!(
        "SYN flood of {n} spoofed SYNs: plain listener keeps {plain_pending} request sockets \
         and sends {plain_cookies} cookies; sticky ({sent} sent in {took:.1?}, syn +{}) keeps \
         {pending} and sends {sticky_cookies}; meanwhile 60 sid requests, all answered, \
         {on_owner} on their owner (by_sid +{}, placed_cookie +{})",
        delta(&before, &after, "syn"),
        delta(&before, &after, "by_sid"),
        delta(&before, &after, "placed_cookie"),
    );
    assert!(
        plain_pending <= 4097 && plain_cookies > 0,
        "the baseline flood did not overflow"
    );
    assert!(
        cluster.log.lock().unwrap().contains("SYN flood:"),
        "the flood guard did not report the flood"
    );
    // Detection takes a tick (100 ms): what arrives before is kept.
    assert!(pending < n as usize / 2, "{pending} request sockets kept");
    assert!(
        sticky_cookies > n as u64 / 4,
        "only {sticky_cookies} cookies"
    );
    assert_eq!(on_owner, 60, "sid placement during a SYN flood");
    // Once the flood stops, SYNs go to the sorting listeners again (the
    // kernel may still answer a few with cookies while the flood's request
    // sockets, migrated to the current listener, fill its queue).
    cluster.wait_for("the end of flood mode", Duration::from_secs(20), |c| {
        c.log.lock().unwrap().contains("SYN flood over")
    });
    let quiet = cluster.stats();
    assert_eq!(requests_on_owner(&cluster, &sessions, 10), 10);
    let end = cluster.stats();
    println!(
        "after the flood: 10 sid requests on their owner (placed_softirq +{}, placed_queue +{}, \
         placed_cookie +{})",
        delta(&quiet, &end, "placed_softirq"),
        delta(&quiet, &end, "placed_queue"),
        delta(&quiet, &end, "placed_cookie"),
    );
    assert!(std::path::Path::new(&format!("/proc/{}", cluster.pid())).exists());
}
