//! Foreign requests on real sockets: a keep-alive connection placed on
//! worker A that carries a request with worker B's sid is reset before A
//! sees a byte of it, and the request resent on a new connection reaches B.
//! Workers have no sticky code (`workers/request_log.py`: Engine.IO
//! handshakes that sticky learns, and a log line per request line read).

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sticky_tests::{open_packet_sid, parse_response, python3_bin, report, Cluster, Response};

fn request_log_cluster(listen: &str, workers: usize, extra: &[&str]) -> Cluster {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/workers/request_log.py");
    let python = python3_bin();
    let args = [&["--balance", "round-robin"], extra].concat();
    Cluster::start_with(listen, workers, &args, &[python.to_str().unwrap(), script])
}

/// One learned session per worker: `sids[w]` is owned by worker `w`.
fn session_per_worker(cluster: &Cluster, workers: usize) -> Vec<String> {
    let mut sids: Vec<Option<String>> = vec![None; workers];
    for _ in 0..100 {
        if sids.iter().all(Option::is_some) {
            break;
        }
        let sid = cluster.engine_io_handshake();
        let owner = cluster
            .get(&format!("/?sid={sid}"))
            .worker
            .expect("worker header");
        sids[owner].get_or_insert(sid);
    }
    sids.into_iter()
        .map(|s| s.expect("a session on every worker"))
        .collect()
}

/// A client keep-alive connection, HTTP/1.1 with Content-Length answers.
struct KeepAlive {
    s: TcpStream,
}

impl KeepAlive {
    fn connect(addr: SocketAddr) -> KeepAlive {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        KeepAlive { s }
    }

    /// One write, so one segment, as browsers send a request head.
    fn send(&mut self, target: &str) {
        let head = format!("GET {target} HTTP/1.1\r\nHost: sticky\r\n\r\n");
        self.s.write_all(head.as_bytes()).expect("send");
    }

    /// One answer; the error if the connection fails first (with how many
    /// answer bytes had arrived).
    fn answer(&mut self) -> Result<Response, (io::Error, usize)> {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if raw.len() >= end + 4 + len {
                    return Ok(parse_response(&raw));
                }
            }
            match self.s.read(&mut buf) {
                Ok(0) => return Err((io::ErrorKind::UnexpectedEof.into(), raw.len())),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) => return Err((e, raw.len())),
            }
        }
    }

    fn get(&mut self, target: &str) -> Result<Response, (io::Error, usize)> {
        self.send(target);
        self.answer()
    }
}

/// Workers whose log shows a request line containing `marker`, once at
/// least one does (worker stderr reaches the test through a pipe, after the
/// answer may have), plus a moment for any other.
fn saw(cluster: &Cluster, marker: &str) -> Vec<usize> {
    let workers = || -> Vec<usize> {
        cluster
            .log
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.contains(marker))
            .filter_map(|l| {
                l.split("request-log worker=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    cluster.wait_for(marker, Duration::from_secs(10), |_| !workers().is_empty());
    std::thread::sleep(Duration::from_millis(200));
    workers()
}

/// Whether sticky resets foreign requests on this kernel. Where it cannot
/// (no SOCK_DESTROY: a kernel without CONFIG_INET_DIAG_DESTROY, or without
/// the tcp_diag module), one line at start says why, and the reset tests
/// stop there.
fn resets_here(cluster: &Cluster) -> bool {
    if cluster.stats()["foreign_requests"] == "reset" {
        return true;
    }
    let log = cluster.log.lock().unwrap().clone();
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reaches the connection's worker"))
        .collect();
    assert_eq!(
        why.len(),
        1,
        "one line saying why foreign requests pass:\n{log}"
    );
    report(&format!("not resetting on this kernel: {}", why[0]));
    false
}

/// Sends a request with `sid` on `conn` (placed on another worker) and
/// expects a reset before any answer byte; returns how long it took.
fn expect_reset(conn: &mut KeepAlive, target: &str) -> Duration {
    let start = Instant::now();
    match conn.get(target) {
        Err((e, 0)) if e.kind() == io::ErrorKind::ConnectionReset => start.elapsed(),
        Err((e, n)) => panic!("{target}: {e} after {n} answer bytes, not a reset before any"),
        Ok(r) => panic!(
            "{target}: answered {} by worker {:?}, not reset",
            r.status, r.worker
        ),
    }
}

#[test]
fn a_foreign_request_is_reset_and_its_resend_reaches_the_owner() {
    let cluster = request_log_cluster("127.0.0.1:0", 3, &[]);
    let sids = session_per_worker(&cluster, 3);
    if !resets_here(&cluster) {
        return;
    }
    let mut conn = KeepAlive::connect(cluster.addr);
    let first = conn
        .get(&format!("/?sid={}", sids[0]))
        .expect("first request");
    assert_eq!(first.worker, Some(0), "placed by its sid");
    // Untouched: the connection's own sid, no sid, unknown, malformed.
    for (what, target) in [
        ("own sid", format!("/?sid={}&n=own", sids[0])),
        ("no sid", "/plain?n=nosid".to_owned()),
        (
            "unknown sid",
            "/?sid=AAAAAAAAAAAAAAAAAAAA&n=unknown".to_owned(),
        ),
        ("malformed sid", "/?sid=%25bad%25&n=malformed".to_owned()),
    ] {
        let r = conn
            .get(&target)
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!((r.status, r.worker), (200, Some(0)), "{what}");
    }
    let before = cluster.stats();
    let target = format!(
        "/socket.io/?EIO=4&transport=polling&sid={}&n=MARK-foreign",
        sids[1]
    );
    let took = expect_reset(&mut conn, &target);
    // What a browser does: the same request on a new connection.
    let mut fresh = KeepAlive::connect(cluster.addr);
    let resent = fresh.get(&target).expect("resend");
    assert_eq!(resent.worker, Some(1), "the resend is placed by its sid");
    assert_eq!(
        saw(&cluster, "MARK-foreign"),
        vec![1],
        "only the owner saw it"
    );
    cluster.wait_for("the reset counted", Duration::from_secs(5), |c| {
        c.counter("connections_reset") > before["connections_reset"].parse().unwrap()
    });
    let after = cluster.stats();
    let delta = |k: &str| after[k].parse::<u64>().unwrap() - before[k].parse::<u64>().unwrap();
    report(&format!(
        "foreign request on worker 0's connection: reset after {:.2} ms, resent to worker {:?}; \
         foreign_dropped +{} connections_reset +{} reset_failures +{} unmapped +{}",
        took.as_secs_f64() * 1e3,
        resent.worker,
        delta("foreign_dropped"),
        delta("connections_reset"),
        delta("reset_failures"),
        delta("unmapped"),
    ));
    assert_eq!(
        (delta("foreign_dropped"), delta("connections_reset")),
        (1, 1)
    );
    assert_eq!(delta("reset_failures"), 0);
}

/// A dual-stack listener: an IPv4 client (an IPv4-mapped socket) and an
/// IPv6 one are both reset by their tuple and cookie.
#[test]
fn ipv6_and_ipv4_mapped_connections_are_reset() {
    let cluster = request_log_cluster("[::]:0", 2, &[]);
    let sids = session_per_worker(&cluster, 2);
    if !resets_here(&cluster) {
        return;
    }
    let port = cluster.addr.port();
    for host in ["127.0.0.1", "::1"] {
        let addr: SocketAddr = match host.parse().unwrap() {
            std::net::IpAddr::V4(ip) => (ip, port).into(),
            std::net::IpAddr::V6(ip) => (ip, port).into(),
        };
        let mut conn = KeepAlive::connect(addr);
        assert_eq!(
            conn.get(&format!("/?sid={}", sids[0])).unwrap().worker,
            Some(0)
        );
        let marker = format!("MARK-{host}");
        let took = expect_reset(&mut conn, &format!("/?sid={}&n={marker}", sids[1]));
        let resent = KeepAlive::connect(addr).get(&format!("/?sid={}&n={marker}", sids[1]));
        assert_eq!(resent.unwrap().worker, Some(1));
        assert_eq!(saw(&cluster, &marker), vec![1], "{host}");
        report(&format!(
            "{host}: reset after {:.2} ms",
            took.as_secs_f64() * 1e3
        ));
    }
    assert_eq!(cluster.counter("reset_failures"), 0);
}

/// A connection that sent nothing before TCP_DEFER_ACCEPT gave up is
/// balanced without a sid (a browser's preconnected socket); its first
/// request is checked like any later one.
#[test]
fn a_preconnected_socket_is_checked_on_its_first_request() {
    let cluster = request_log_cluster("127.0.0.1:0", 3, &[]);
    let sids = session_per_worker(&cluster, 3);
    if !resets_here(&cluster) {
        return;
    }
    let before = cluster.stats();
    let idle: Vec<KeepAlive> = (0..3).map(|_| KeepAlive::connect(cluster.addr)).collect();
    let start = Instant::now();
    cluster.wait_for(
        "the idle connections balanced",
        Duration::from_secs(60),
        |c| {
            let placed = c.counter("placed_queue") - before["placed_queue"].parse::<u64>().unwrap();
            placed >= idle.len() as u64
        },
    );
    let waited = start.elapsed();
    let (mut answered, mut reset) = (0, 0);
    for (i, mut conn) in idle.into_iter().enumerate() {
        let target = format!("/?sid={}&n=MARK-idle{i}", sids[0]);
        match conn.get(&target) {
            Ok(r) => {
                assert_eq!(r.worker, Some(0), "answered only by the sid's owner");
                answered += 1;
            }
            Err((e, 0)) if e.kind() == io::ErrorKind::ConnectionReset => {
                let resent = KeepAlive::connect(cluster.addr).get(&target).unwrap();
                assert_eq!(resent.worker, Some(0));
                reset += 1;
            }
            Err((e, n)) => panic!("idle connection {i}: {e} after {n} bytes"),
        }
        assert_eq!(saw(&cluster, &format!("MARK-idle{i}")), vec![0]);
    }
    report(&format!(
        "3 preconnected sockets, balanced round-robin after {:.1} s idle, then a request for \
         worker 0: {answered} answered by worker 0 (their own), {reset} reset and resent to it",
        waited.as_secs_f64()
    ));
    assert!(reset >= 2, "round-robin put at least two on other workers");
}

/// The mapping of a connection to its worker lives with the socket: an old
/// connection is still checked after many others, and after every entry of
/// `placed_flows` (the LRU that only bridges placement and first answer)
/// has been evicted.
#[test]
fn an_old_connection_is_checked_after_placed_flows_turned_over() {
    let cluster = request_log_cluster("127.0.0.1:0", 2, &[]);
    let sids = session_per_worker(&cluster, 2);
    if !resets_here(&cluster) {
        return;
    }
    let mut old = KeepAlive::connect(cluster.addr);
    assert_eq!(
        old.get(&format!("/?sid={}", sids[0])).unwrap().worker,
        Some(0)
    );
    // Many real connections in between.
    let others = 1000;
    for i in 0..others {
        let r = KeepAlive::connect(cluster.addr).get(&format!("/?sid={}&n={i}", sids[i % 2]));
        assert_eq!(r.unwrap().worker, Some(i % 2));
    }
    // Then more placements than placed_flows holds (it is an LRU of
    // PLACED_MAX): written into the supervisor's own map, as the selector
    // would.
    let survived = flood_placed_flows(cluster.pid(), old.s.local_addr().unwrap());
    let took = expect_reset(&mut old, &format!("/?sid={}&n=MARK-old", sids[1]));
    let resent = KeepAlive::connect(cluster.addr).get(&format!("/?sid={}&n=MARK-old", sids[1]));
    assert_eq!(resent.unwrap().worker, Some(1));
    assert_eq!(saw(&cluster, "MARK-old"), vec![1]);
    report(&format!(
        "old connection after {others} connections and {} placed_flows entries written (its own \
         entry {}): reset after {:.2} ms",
        sticky_common::PLACED_MAX + 1024,
        if survived {
            "survived the LRU, deleted"
        } else {
            "evicted"
        },
        took.as_secs_f64() * 1e3
    ));
}

/// Fills sticky's `placed_flows` with fake flows, then makes sure the entry
/// of the connection from `client` is gone (the LRU is approximate); true
/// if it had survived the flood.
fn flood_placed_flows(pid: u32, client: SocketAddr) -> bool {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapInfo};
    use sticky_common::{FlowKey, Placed, PLACED_MAX};
    let id = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|i| {
            i.lines()
                .find_map(|l| l.strip_prefix("map_id:"))?
                .trim()
                .parse()
                .ok()
        })
        .find(|&id| MapInfo::from_id(id).is_ok_and(|i| i.name_as_str() == Some("placed_flows")))
        .expect("sticky's placed_flows map");
    let map = Map::LruHashMap(MapData::from_id(id).unwrap());
    let mut placed: BpfHashMap<_, FlowKey, Placed> = BpfHashMap::try_from(map).unwrap();
    let key_of = |remote: [u8; 4], port: u16| FlowKey {
        local: [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0],
        remote: [u32::from_ne_bytes(remote), 0, 0, 0],
        remote_port: port.to_be(),
        family: 2,
    };
    for n in 0..PLACED_MAX + 1024 {
        let fake = key_of([10, 200, (n >> 16) as u8, (n >> 8) as u8], n as u16);
        let value = Placed {
            worker: 0,
            segments: 0,
            idle: 0,
        };
        placed.insert(fake, value, 0).unwrap();
    }
    let std::net::IpAddr::V4(ip) = client.ip() else {
        unreachable!("an IPv4 test")
    };
    let own = key_of(ip.octets(), client.port());
    let survived = placed.get(&own, 0).is_ok();
    if survived {
        placed.remove(&own).unwrap();
    }
    survived
}

/// After `101 Switching Protocols` the connection carries WebSocket frames,
/// never parsed: bytes that look like a foreign request pass.
#[test]
fn an_upgraded_connection_is_never_parsed() {
    let cluster = request_log_cluster("127.0.0.1:0", 2, &[]);
    let sids = session_per_worker(&cluster, 2);
    let mut conn = KeepAlive::connect(cluster.addr);
    conn.send(&format!("/upgrade?sid={}", sids[0]));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        conn.s.read_exact(&mut byte).expect("101 head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let line = format!("GET /?sid={}&n=MARK-ws HTTP/1.1\r\n", sids[1]);
    conn.s.write_all(line.as_bytes()).unwrap();
    let mut echo = vec![0u8; 5 + line.len()];
    conn.s
        .read_exact(&mut echo)
        .expect("echo after the upgrade");
    assert_eq!(echo, [b"echo ", line.as_bytes()].concat());
    assert_eq!(saw(&cluster, "MARK-ws"), vec![0]);
    assert_eq!(cluster.counter("foreign_dropped"), 0);
}

/// Workers that register their sessions (`--learn off`, the integrations)
/// are checked too: a connection that served a page (no sid, balanced) and
/// then carries another worker's session is reset, and only the owner
/// answers the resend. The check keeps each connection's worker without
/// learning anything.
#[test]
fn registered_sessions_are_checked_with_learning_off() {
    let cluster = Cluster::start(3, &["--learn", "off", "--balance", "round-robin"]);
    let owned = cluster.sessions_on_every_worker(3, 1);
    if !resets_here(&cluster) {
        return;
    }
    let mut conn = KeepAlive::connect(cluster.addr);
    let page = conn.get("/").expect("the page");
    let page_worker = page.worker.expect("worker header");
    let (sid, owner) = owned
        .iter()
        .find(|(_, w)| *w != page_worker)
        .expect("a session on another worker");
    let before = cluster.stats();
    let target = format!("/?sid={sid}&n=registered");
    expect_reset(&mut conn, &target);
    let resent = KeepAlive::connect(cluster.addr)
        .get(&target)
        .expect("resend");
    let after = cluster.stats();
    let delta = |k: &str| after[k].parse::<u64>().unwrap() - before[k].parse::<u64>().unwrap();
    report(&format!(
        "--learn off: page on worker {page_worker}, worker {owner}'s session on its connection reset,          resent to worker {:?}; foreign_dropped +{} unmapped +{} learned {}",
        resent.worker,
        delta("foreign_dropped"),
        delta("unmapped"),
        after["learned"],
    ));
    assert_eq!(
        resent.worker,
        Some(*owner),
        "the resend is placed by its sid"
    );
    assert_eq!((delta("foreign_dropped"), delta("unmapped")), (1, 0));
    assert_eq!(after["learned"], "0", "nothing learned with --learn off");
}

/// `--foreign-requests pass`: counted, answered by the connection's worker.
#[test]
fn pass_lets_the_connection_worker_answer() {
    let cluster = request_log_cluster("127.0.0.1:0", 2, &["--foreign-requests", "pass"]);
    let sids = session_per_worker(&cluster, 2);
    let mut conn = KeepAlive::connect(cluster.addr);
    assert_eq!(
        conn.get(&format!("/?sid={}", sids[0])).unwrap().worker,
        Some(0)
    );
    let r = conn
        .get(&format!("/?sid={}&n=MARK-pass", sids[1]))
        .expect("passed");
    assert_eq!(r.worker, Some(0));
    assert_eq!(cluster.counter("foreign_passed"), 1);
    assert_eq!(cluster.counter("foreign_dropped"), 0);
}

/// Frequent resets get one log line naming the usual cause and its fix.
#[test]
fn frequent_resets_are_logged_once_with_the_fix() {
    let cluster = request_log_cluster("127.0.0.1:0", 2, &[]);
    let sids = session_per_worker(&cluster, 2);
    if !resets_here(&cluster) {
        return;
    }
    let n = 60;
    let start = Instant::now();
    for i in 0..n {
        let mut conn = KeepAlive::connect(cluster.addr);
        assert_eq!(
            conn.get(&format!("/?sid={}", sids[0])).unwrap().worker,
            Some(0)
        );
        expect_reset(&mut conn, &format!("/?sid={}&n={i}", sids[1]));
    }
    let took = start.elapsed();
    cluster.wait_for("every reset counted", Duration::from_secs(5), |c| {
        c.counter("connections_reset") == n
    });
    let log = cluster.log.lock().unwrap().clone();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connections reset in"))
        .collect();
    report(&format!(
        "{n} foreign requests in {:.0} ms: log says {lines:?}",
        took.as_secs_f64() * 1e3
    ));
    assert_eq!(lines.len(), 1, "one line per window");
    assert!(lines[0].contains("http-reuse never") && lines[0].contains("keepalive"));
}

/// An Engine.IO handshake on a keep-alive connection past its first answers
/// (one that served a page and its assets) is learned too, for the
/// connection's worker: the session's next requests, on any connection,
/// reach it.
#[test]
fn a_handshake_on_a_reused_connection_is_learned() {
    let cluster = request_log_cluster("127.0.0.1:0", 3, &[]);
    let mut conn = KeepAlive::connect(cluster.addr);
    let page = conn.get("/index.html").unwrap();
    let worker = page.worker.expect("worker header");
    for asset in ["/app.js", "/style.css", "/api/items"] {
        assert_eq!(conn.get(asset).unwrap().worker, Some(worker));
    }
    let mut owners = Vec::new();
    for _ in 0..3 {
        let open = conn.get("/socket.io/?EIO=4&transport=polling").unwrap();
        let sid = open_packet_sid(&String::from_utf8_lossy(&open.body));
        for _ in 0..3 {
            let r = KeepAlive::connect(cluster.addr)
                .get(&format!("/?sid={sid}"))
                .unwrap();
            owners.push(r.worker);
        }
    }
    report(&format!(
        "3 handshakes on worker {worker}'s connection after 4 answers: their sids' requests on new \
         connections answered by {owners:?}; learned={}",
        cluster.counter("learned")
    ));
    assert!(owners.iter().all(|w| *w == Some(worker)));
}

/// The same from a connection's very first answer: a handshake there is
/// learned from the placement record, which then goes; the next
/// handshakes (a browser reusing the connection for other tabs) come while
/// the connection has sent fewer than `STICKY_LEARN_SEGMENTS` answer
/// segments, and are learned from its storage.
#[test]
fn handshakes_right_after_the_first_on_a_connection_are_learned() {
    let cluster = request_log_cluster("127.0.0.1:0", 3, &[]);
    let mut conn = KeepAlive::connect(cluster.addr);
    let mut opened = Vec::new();
    for _ in 0..3 {
        let open = conn.get("/socket.io/?EIO=4&transport=polling").unwrap();
        let sid = open_packet_sid(&String::from_utf8_lossy(&open.body));
        opened.push((sid, open.worker.expect("worker header")));
    }
    let worker = opened[0].1;
    let owners: Vec<Option<usize>> = opened
        .iter()
        .map(|(sid, _)| {
            KeepAlive::connect(cluster.addr)
                .get(&format!("/?sid={sid}"))
                .unwrap()
                .worker
        })
        .collect();
    report(&format!(
        "3 handshakes as worker {worker}'s connection's first answers: their sids' requests on \
         new connections answered by {owners:?}; learned={}",
        cluster.counter("learned")
    ));
    assert!(
        opened.iter().all(|(_, w)| *w == worker),
        "one connection, one worker"
    );
    assert!(owners.iter().all(|w| *w == Some(worker)));
}

/// A connection placed by a sid-carrying request: its answer is searched
/// for no open packet (only a request without a sid is a handshake), so its
/// placement record goes at once; handshakes later on the same connection
/// (a browser reusing it for another tab) are learned from its storage.
#[test]
fn handshakes_after_a_sid_request_on_a_connection_are_learned() {
    let cluster = request_log_cluster("127.0.0.1:0", 3, &[]);
    let open = KeepAlive::connect(cluster.addr)
        .get("/socket.io/?EIO=4&transport=polling")
        .unwrap();
    let first = open_packet_sid(&String::from_utf8_lossy(&open.body));
    let worker = open.worker.expect("worker header");
    let mut conn = KeepAlive::connect(cluster.addr);
    let placed_by_sid = conn.get(&format!("/?sid={first}")).unwrap().worker;
    let mut owners = Vec::new();
    for _ in 0..3 {
        let open = conn.get("/socket.io/?EIO=4&transport=polling").unwrap();
        assert_eq!(open.worker, Some(worker), "one connection, one worker");
        let sid = open_packet_sid(&String::from_utf8_lossy(&open.body));
        owners.push(
            KeepAlive::connect(cluster.addr)
                .get(&format!("/?sid={sid}"))
                .unwrap()
                .worker,
        );
    }
    report(&format!(
        "a connection placed by worker {worker}'s sid (on {placed_by_sid:?}), then 3 handshakes \
         on it: their sids' requests on new connections answered by {owners:?}; learned={}",
        cluster.counter("learned")
    ));
    assert_eq!(placed_by_sid, Some(worker));
    assert!(owners.iter().all(|w| *w == Some(worker)));
    assert_eq!(cluster.counter("learned"), 4);
}
