//! Placement, end to end: real `sticky run`, real demo workers, real
//! connections on loopback, real kernel programs.

use std::{collections::HashMap, io::Write, net::TcpStream, time::Duration};

use sticky_tests::{read_response, request, Cluster};

fn per_worker(cluster: &Cluster, n: usize, target: &str, workers: usize) -> Vec<usize> {
    let mut counts = vec![0; workers];
    for _ in 0..n {
        let r = cluster.get(target);
        assert_eq!(r.status, 200);
        counts[r.worker.unwrap()] += 1;
    }
    counts
}

#[test]
fn ten_thousand_sid_connections_from_64_clients_reach_their_owner() {
    let cluster = Cluster::start(3, &[]);
    let sessions = cluster.sessions_on_every_worker(3, 4);
    let before = cluster.stats();
    let (total, clients) = (10_000usize, 64usize);
    let wrong = cluster.sid_requests_from(&sessions, total, clients);
    let after = cluster.stats();
    let delta = |k: &str| after[k].parse::<u64>().unwrap() - before[k].parse::<u64>().unwrap();
    println!(
        "{total} connections: wrong={} by_sid={} placed_queue={} placed_softirq={}",
        wrong,
        delta("by_sid"),
        delta("placed_queue"),
        delta("placed_softirq")
    );
    assert_eq!(wrong, 0, "connections reached the wrong worker");
    assert!(delta("by_sid") >= total as u64);
}

#[test]
fn first_segments_are_placed_in_softirq_after_the_doorbell_rotation() {
    // The selector rings the CPU's doorbell at each SYN; the sorter rotates
    // before the request arrives, which then migrates straight to its owner.
    let cluster = Cluster::start(3, &[]);
    let sessions = cluster.sessions_on_every_worker(3, 1);
    let before = cluster.stats();
    for (sid, owner) in sessions.iter().cycle().take(60) {
        let mut s = TcpStream::connect(cluster.addr).unwrap();
        if *owner == 0 {
            std::thread::sleep(Duration::from_millis(5)); // a slower client
        }
        // One write: `write!` would send "GET /?sid=" in a segment of its
        // own, and a cut sid is balanced, not placed.
        s.write_all(
            format!("GET /?sid={sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let r = read_response(s);
        assert_eq!(r.worker, Some(*owner), "sid {sid}");
    }
    let after = cluster.stats();
    let delta = |k: &str| after[k].parse::<u64>().unwrap() - before[k].parse::<u64>().unwrap();
    println!(
        "60 connections: {} placed in softirq, {} from the queue",
        delta("placed_softirq"),
        delta("placed_queue")
    );
    assert_eq!(delta("by_sid"), 60, "placed by their sid, not balanced");
    assert!(
        delta("placed_softirq") >= 40,
        "the softirq path placed only {}/60",
        delta("placed_softirq")
    );
}

#[test]
fn connections_queued_while_the_supervisor_is_stopped_are_placed_by_the_filter() {
    // With the supervisor frozen no rotation happens: first segments land on
    // the sorting listener, the socket filter records each decision, and the
    // queue is migrated at the first rotation after SIGCONT.
    let cluster = Cluster::start(3, &[]);
    let sessions = cluster.sessions_on_every_worker(3, 2);
    let before = cluster.stats();
    unsafe { libc::kill(cluster.pid() as i32, libc::SIGSTOP) };
    // Let every supervisor thread (sorters included) reach the stop.
    std::thread::sleep(Duration::from_millis(100));
    let pending: Vec<_> = sessions
        .iter()
        .cycle()
        .take(30)
        .map(|(sid, owner)| {
            let mut s = TcpStream::connect(cluster.addr).unwrap();
            s.write_all(
                format!("GET /?sid={sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            (s, *owner)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    unsafe { libc::kill(cluster.pid() as i32, libc::SIGCONT) };
    for (s, owner) in pending {
        assert_eq!(read_response(s).worker, Some(owner));
    }
    let after = cluster.stats();
    let delta = |k: &str| after[k].parse::<u64>().unwrap() - before[k].parse::<u64>().unwrap();
    println!(
        "30 connections during a stop: {} from the queue",
        delta("placed_queue")
    );
    assert!(
        delta("placed_queue") >= 25,
        "queue path placed only {}/30",
        delta("placed_queue")
    );
}

#[test]
fn round_robin_spreads_within_one_connection_per_worker() {
    let cluster = Cluster::start(3, &["--balance", "round-robin"]);
    let counts = per_worker(&cluster, 30, "/", 3);
    println!("round-robin over 30 connections: {counts:?}");
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 1, "round-robin uneven: {counts:?}");
}

#[test]
fn random_uses_every_worker() {
    let cluster = Cluster::start(3, &["--balance", "random"]);
    let counts = per_worker(&cluster, 60, "/", 3);
    println!("random over 60 connections: {counts:?}");
    assert!(
        counts.iter().all(|&c| c > 0),
        "random skipped a worker: {counts:?}"
    );
}

#[test]
fn least_connection_goes_to_the_worker_with_fewest_sessions() {
    let cluster = Cluster::start(3, &["--balance", "least-connection"]);
    let sessions = cluster.sessions_on_every_worker(3, 2);
    // Drop every session of worker 1: routed by its sid, the unregister
    // request reaches the owner, which closes it.
    for (sid, owner) in &sessions {
        if *owner == 1 {
            let r = cluster.get(&format!("/unregister?sid={sid}"));
            assert_eq!((r.status, r.worker), (200, Some(1)), "{}", r.text());
        }
    }
    let counts = per_worker(&cluster, 10, "/", 3);
    assert_eq!(
        counts,
        vec![0, 10, 0],
        "least-connection should pick worker 1 every time"
    );
}

#[test]
fn unknown_and_malformed_sids_are_balanced() {
    let cluster = Cluster::start(2, &["--balance", "round-robin"]);
    let unknown = cluster.counter("sid_unknown");
    let counts = per_worker(&cluster, 10, "/?sid=NoSuchSessionAtAll", 2);
    assert_eq!(counts, vec![5, 5]);
    assert!(cluster.counter("sid_unknown") >= unknown + 10);
    let counts = per_worker(&cluster, 4, "/?sid=bad.sid", 2);
    assert_eq!(counts, vec![2, 2]);
}

#[test]
fn a_request_line_split_across_segments_is_balanced() {
    // Defined behaviour: the sid must be in the first data segment (the
    // kernel places the connection when that segment arrives). A request
    // line split before its sid is balanced, and answered normally.
    let cluster = Cluster::start(2, &["--balance", "round-robin"]);
    let (sid, owner) = cluster
        .sessions_on_every_worker(2, 1)
        .into_iter()
        .find(|(_, w)| *w == 1)
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(cluster.addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(b"GET /?EIO=4&si").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        write!(
            s,
            "d={sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let r = read_response(s);
        assert_eq!(r.status, 200);
        seen.push(r.worker.unwrap());
    }
    assert!(
        seen.contains(&0) && seen.contains(&owner),
        "split requests should be balanced: {seen:?}"
    );
}

#[test]
fn eight_mib_bodies_cross_the_sorting_path_intact() {
    let cluster = Cluster::start(2, &[]);
    let sessions = cluster.sessions_on_every_worker(2, 1);
    let body: Vec<u8> = (0..8 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    for (sid, owner) in &sessions {
        let r = request(cluster.addr, "POST", &format!("/echo?sid={sid}"), &body);
        assert_eq!((r.status, r.worker), (200, Some(*owner)));
        assert!(
            r.body == body,
            "echoed body differs ({} bytes back)",
            r.body.len()
        );
        let r = cluster.get(&format!("/bytes?n={}&sid={sid}", 8 << 20));
        assert_eq!((r.status, r.worker), (200, Some(*owner)));
        assert_eq!(r.body.len(), 8 << 20);
        assert!(
            r.body
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8),
            "response body corrupted"
        );
    }
}

#[test]
fn ipv6_listeners_place_by_sid_too() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here: skipped");
        return;
    }
    let worker = sticky_tests::demo_worker_bin();
    let cluster = Cluster::start_with("[::1]:0", 3, &[], &[worker.to_str().unwrap()]);
    let sessions = cluster.sessions_on_every_worker(3, 2);
    for (sid, owner) in sessions.iter().cycle().take(60) {
        assert_eq!(cluster.get(&format!("/?sid={sid}")).worker, Some(*owner));
    }
}

#[test]
fn counters_account_for_every_connection() {
    let cluster = Cluster::start(2, &[]);
    let sessions = cluster.sessions_on_every_worker(2, 1);
    let before = cluster.stats();
    for (sid, _) in sessions.iter().cycle().take(50) {
        cluster.get(&format!("/?sid={sid}"));
    }
    for _ in 0..50 {
        cluster.get("/");
    }
    let after = cluster.stats();
    let d: HashMap<&str, u64> = [
        "syn",
        "placed_queue",
        "placed_softirq",
        "by_sid",
        "balanced",
    ]
    .into_iter()
    .map(|k| {
        (
            k,
            after[k].parse::<u64>().unwrap() - before[k].parse::<u64>().unwrap(),
        )
    })
    .collect();
    println!("{d:?}");
    assert_eq!(d["syn"], 100);
    assert_eq!(d["placed_queue"] + d["placed_softirq"], 100);
    assert_eq!(d["by_sid"], 50);
    assert_eq!(d["balanced"], 50);
}
