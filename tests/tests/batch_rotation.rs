//! Rotation per batch (`--rotation-batch`), end to end: real `sticky run`,
//! real demo workers and Engine.IO workers, real connections on loopback.
//! Every guarantee of the default rotation holds (each sid on its owner,
//! learning), a lone connection still rotates at once (it takes the softirq
//! path even with a long window), and under concurrency one rotation serves
//! several connections.

use std::{
    io::Write,
    net::TcpStream,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use sticky_tests::delta;
use sticky_tests::{
    demo_worker_bin, python3_bin, read_response, signal, Cluster, TempDir, ENGINE_IO_POLLING_PY,
};

/// Long enough that a connection made to wait for the window would find
/// its listener still open and take the queue path.
const LONG_WINDOW: &str = "50ms";

#[test]
fn sid_connections_from_64_clients_reach_their_owner_in_fewer_rotations() {
    let cluster = Cluster::start(3, &["--rotation-batch", "2ms"]);
    let sessions = cluster.sessions_on_every_worker(3, 4);
    let before = cluster.stats();
    let total = 10_000;
    let wrong = cluster.sid_requests_from(&sessions, total, 64);
    let after = cluster.stats();
    let d = |k| delta(&before, &after, k);
    println!(
        "{total} connections from 64 clients, --rotation-batch 2ms: wrong={wrong} by_sid={} \
         rotations={} ({:.2} per connection) placed_queue={} placed_softirq={}",
        d("by_sid"),
        d("rotations"),
        d("rotations") as f64 / total as f64,
        d("placed_queue"),
        d("placed_softirq")
    );
    assert_eq!(wrong, 0, "connections reached the wrong worker");
    assert!(d("by_sid") >= total as u64);
    assert_eq!(d("placed_queue") + d("placed_softirq"), total as u64);
    // Per SYN makes about one rotation per connection; per batch, one
    // rotation serves several.
    assert!(
        d("rotations") * 2 < total as u64,
        "{} rotations for {total} connections: not batched",
        d("rotations")
    );
}

#[test]
fn serial_connections_still_rotate_at_once() {
    // A connection that arrives alone must not wait for the window: its
    // listener is rotated before its request arrives, which then takes the
    // softirq path. Had it waited for the window (50 ms), its request would
    // have queued on the open listener (queue path).
    let cluster = Cluster::start(3, &["--rotation-batch", LONG_WINDOW]);
    let sessions = cluster.sessions_on_every_worker(3, 1);
    let before = cluster.stats();
    let n = 60;
    for (sid, owner) in sessions.iter().cycle().take(n) {
        let mut s = TcpStream::connect(cluster.addr).unwrap();
        s.write_all(
            format!("GET /?sid={sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        assert_eq!(read_response(s).worker, Some(*owner), "sid {sid}");
    }
    let after = cluster.stats();
    let d = |k| delta(&before, &after, k);
    println!(
        "{n} serial connections, --rotation-batch {LONG_WINDOW}: {} placed in softirq, {} from \
         the queue, {} rotations",
        d("placed_softirq"),
        d("placed_queue"),
        d("rotations")
    );
    assert_eq!(d("by_sid"), n as u64, "placed by their sid, not balanced");
    assert!(
        d("placed_softirq") >= 40,
        "the softirq path placed only {}/{n}: lone connections waited for the window",
        d("placed_softirq")
    );
}

#[test]
fn connections_that_wait_for_the_window_are_placed_from_the_queue() {
    // 64 clients at once with a long window: most requests arrive while
    // their listener waits for the window to close, and are migrated from
    // the sorting queue to their owners when it does.
    let cluster = Cluster::start(2, &["--rotation-batch", LONG_WINDOW]);
    let sessions = cluster.sessions_on_every_worker(2, 3);
    let before = cluster.stats();
    let total = 2_000;
    let wrong = cluster.sid_requests_from(&sessions, total, 64);
    let after = cluster.stats();
    let d = |k| delta(&before, &after, k);
    println!(
        "{total} connections from 64 clients, --rotation-batch {LONG_WINDOW}: wrong={wrong} \
         placed_queue={} placed_softirq={} rotations={}",
        d("placed_queue"),
        d("placed_softirq"),
        d("rotations")
    );
    assert_eq!(wrong, 0, "connections reached the wrong worker");
    assert!(
        d("placed_queue") * 2 > total as u64,
        "only {} of {total} from the queue",
        d("placed_queue")
    );
}

#[test]
fn far_clients_take_the_softirq_path_in_few_rotations() {
    // Clients that wait 30 ms between connect and their request, as far
    // ones do: a busy loop rotates once a window is over and nothing is
    // queued for QUIET_MAX (10 ms), before their data comes, which then
    // migrates in softirq: no rotation per connection, no queue wait.
    let cluster = Cluster::start(2, &["--rotation-batch", "1ms"]);
    let sessions = Arc::new(cluster.sessions_on_every_worker(2, 3));
    let before = cluster.stats();
    let (clients, each) = (64, 20);
    let wrong = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (sessions, wrong, addr) = (sessions.clone(), wrong.clone(), cluster.addr);
            std::thread::spawn(move || {
                for n in 0..each {
                    let (sid, owner) = &sessions[(c + n) % sessions.len()];
                    let mut s = TcpStream::connect(addr).unwrap();
                    std::thread::sleep(Duration::from_millis(30));
                    s.write_all(
                        format!("GET /?sid={sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                            .as_bytes(),
                    )
                    .unwrap();
                    if read_response(s).worker != Some(*owner) {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let after = cluster.stats();
    let d = |k| delta(&before, &after, k);
    let total = (clients * each) as u64;
    let wrong = wrong.load(Ordering::Relaxed);
    println!(
        "{total} connections 30 ms away from 64 clients, --rotation-batch 1ms: wrong={wrong} \
         placed_softirq={} placed_queue={} rotations={}",
        d("placed_softirq"),
        d("placed_queue"),
        d("rotations")
    );
    assert_eq!(wrong, 0, "connections reached the wrong worker");
    assert_eq!(d("by_sid"), total);
    assert!(
        d("placed_softirq") * 2 > total,
        "only {} of {total} in softirq",
        d("placed_softirq")
    );
    assert!(
        d("rotations") * 2 < total,
        "{} rotations for {total} connections: not batched",
        d("rotations")
    );
}

#[test]
fn learned_sessions_stay_on_their_worker_with_batch_rotation() {
    let python = python3_bin();
    let cluster = Cluster::start_with(
        "127.0.0.1:0",
        3,
        &["--balance", "round-robin", "--rotation-batch", "1ms"],
        &[python.to_str().unwrap(), ENGINE_IO_POLLING_PY],
    );
    let mut unknown = 0;
    for _ in 0..30 {
        let sid = cluster.engine_io_handshake();
        unknown += (0..5)
            .filter(|_| {
                let r = cluster.get(&format!("/socket.io/?EIO=4&transport=polling&sid={sid}"));
                r.status == 400 && r.text().contains("Session ID unknown")
            })
            .count();
    }
    let stats = cluster.stats();
    println!(
        "30 learned sessions x 5 requests, --rotation-batch 1ms: {unknown} unknown; learned={} \
         by_sid={}",
        stats["learned"], stats["by_sid"]
    );
    assert_eq!(
        unknown, 0,
        "requests of learned sessions reached other workers"
    );
    assert!(cluster.counter("learned") >= 30);
}

#[test]
fn sids_stay_on_their_owner_across_a_reload_and_an_adoption() {
    const WORKERS: usize = 2;
    let extra = [
        "--rotation-batch",
        "1ms",
        "--drain",
        "60s",
        "--learn",
        "off",
    ];
    let worker = demo_worker_bin();
    let worker = worker.to_str().unwrap();
    let dir = TempDir::new();
    let control = dir.0.join("control.sock");
    let mut old = Cluster::start_with_control("127.0.0.1:0", &control, WORKERS, &extra, &[worker]);
    let sessions = old.sessions_on_every_worker(WORKERS, 3);
    let pids: Vec<u32> = (0..WORKERS).map(|i| old.worker_pid(i).unwrap()).collect();
    // A reload: the sessions stay with the old, draining generation.
    signal(old.pid(), libc::SIGHUP);
    old.wait_for("the new generation", Duration::from_secs(10), |c| {
        c.stats()
            .values()
            .filter(|v| v.contains("generation:1"))
            .count()
            == WORKERS
    });
    let wrong_reloaded = old.sid_requests_from(&sessions, 2_000, 64);
    // The supervisor killed: a new one, per batch too, adopts both generations.
    let addr = old.addr.to_string();
    signal(old.pid(), libc::SIGKILL);
    old.terminate(Duration::from_secs(5));
    let new = Cluster::start_with_control(&addr, &control, WORKERS, &extra, &[worker]);
    let log = new.log.lock().unwrap().clone();
    assert!(
        pids.iter().all(|pid| log.contains(&format!("(pid {pid})"))),
        "the old generation was not adopted:\n{log}"
    );
    let before = new.stats();
    let wrong_adopted = new.sid_requests_from(&sessions, 2_000, 64);
    let after = new.stats();
    println!(
        "--rotation-batch 1ms, 2,000 sid connections from 64 clients: after a reload wrong={}, \
         after an adoption wrong={} (rotations={}, by_sid={})",
        wrong_reloaded,
        wrong_adopted,
        delta(&before, &after, "rotations"),
        delta(&before, &after, "by_sid")
    );
    assert_eq!(wrong_reloaded, 0, "after the reload");
    assert_eq!(wrong_adopted, 0, "after the adoption");
}

#[test]
fn a_window_over_100ms_is_refused() {
    let ran = sticky_tests::run_sticky(
        &["run", "--rotation-batch", "1s", "--", "true"],
        std::time::Duration::from_secs(10),
    );
    println!("--rotation-batch 1s: {} -> {:?}", ran.status, ran.stderr);
    assert!(!ran.status.success());
    let first = ran.stderr.lines().next().unwrap_or_default();
    assert!(
        first.contains("--rotation-batch") && first.contains("100ms"),
        "{}",
        ran.stderr
    );
}
