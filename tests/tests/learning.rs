//! Session learning end to end: workers with no sticky code (a minimal
//! Engine.IO long-polling responder in Python) get their sessions routed,
//! because the kernel reads the sid from their own handshake answers.

use std::time::Duration;

use sticky_tests::{python3_bin, Cluster, ENGINE_IO_POLLING_PY};

fn engine_io_cluster(workers: usize, extra: &[&str]) -> Cluster {
    let python = python3_bin();
    Cluster::start_with(
        "127.0.0.1:0",
        workers,
        extra,
        &[python.to_str().unwrap(), ENGINE_IO_POLLING_PY],
    )
}

/// Sends `n` requests carrying `sid`; returns how many got "Session ID unknown".
fn unknown_answers(cluster: &Cluster, sid: &str, n: usize) -> usize {
    (0..n)
        .filter(|_| {
            let r = cluster.get(&format!("/socket.io/?EIO=4&transport=polling&sid={sid}"));
            r.status == 400 && r.text().contains("Session ID unknown")
        })
        .count()
}

#[test]
fn unmodified_workers_get_sticky_sessions() {
    let cluster = engine_io_cluster(3, &["--balance", "round-robin"]);
    let mut unknown = 0;
    for _ in 0..40 {
        let sid = cluster.engine_io_handshake();
        unknown += unknown_answers(&cluster, &sid, 5);
    }
    let stats = cluster.stats();
    println!(
        "40 sessions x 5 requests: {unknown} unknown; learned={} by_sid={}",
        stats["learned"], stats["by_sid"]
    );
    assert_eq!(
        unknown, 0,
        "requests of learned sessions reached other workers"
    );
    assert!(cluster.counter("learned") >= 40);
}

#[test]
fn without_learning_round_robin_scatters_sessions() {
    // The control experiment: the same workers, learning off.
    let cluster = engine_io_cluster(3, &["--balance", "round-robin", "--learn", "off"]);
    let sid = cluster.engine_io_handshake();
    let unknown = unknown_answers(&cluster, &sid, 6);
    println!("learning off: {unknown}/6 unknown");
    assert!(
        unknown >= 3,
        "expected most requests to miss the session's worker"
    );
    assert_eq!(cluster.counter("learned"), 0);
}

#[test]
fn idle_learned_sessions_expire() {
    let cluster = engine_io_cluster(2, &["--learn-idle", "1s"]);
    let active = cluster.engine_io_handshake();
    let idle = cluster.engine_io_handshake();
    cluster.wait_for("two learned sessions", Duration::from_secs(12), |c| {
        c.stats()["learned_sessions"] == "2"
    });
    // Keep one busy; leave the other alone past --learn-idle.
    for _ in 0..12 {
        assert_eq!(unknown_answers(&cluster, &active, 1), 0);
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster.wait_for("the idle session to expire", Duration::from_secs(5), |c| {
        c.stats()["learned_sessions"] == "1"
    });
    assert_eq!(
        unknown_answers(&cluster, &active, 3),
        0,
        "the active session must stay"
    );
    let before = cluster.counter("sid_unknown");
    let _ = unknown_answers(&cluster, &idle, 1);
    assert_eq!(
        cluster.counter("sid_unknown"),
        before + 1,
        "the idle sid should be unknown to the kernel"
    );
}

#[test]
fn learned_sessions_are_forgotten_when_their_worker_exits() {
    let cluster = engine_io_cluster(2, &[]);
    let sid = cluster.engine_io_handshake();
    let owner_pid = {
        let r = cluster.get(&format!("/socket.io/?EIO=4&transport=polling&sid={sid}"));
        r.text()
            .split("pid=")
            .nth(1)
            .unwrap()
            .trim()
            .parse::<i32>()
            .unwrap()
    };
    cluster.wait_for("the learned session", Duration::from_secs(12), |c| {
        c.stats()["learned_sessions"] == "1"
    });
    unsafe { libc::kill(owner_pid, libc::SIGKILL) };
    cluster.wait_for("the session to be forgotten", Duration::from_secs(5), |c| {
        c.stats()["learned_sessions"] == "0"
    });
    let before = cluster.counter("sid_unknown");
    let _ = unknown_answers(&cluster, &sid, 1);
    assert_eq!(cluster.counter("sid_unknown"), before + 1);
}

#[test]
fn requests_on_a_keep_alive_connection_keep_a_learned_session() {
    use std::io::{Read, Write};
    let cluster = engine_io_cluster(3, &["--learn-idle", "1s", "--balance", "round-robin"]);
    let sid = cluster.engine_io_handshake();
    // One keep-alive connection carries the session's requests for three
    // times --learn-idle. Only its first request is placed (and seen by the
    // placement paths); sticky_watch sees the others.
    let mut conn = std::net::TcpStream::connect(cluster.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request =
        format!("GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\r\n");
    for i in 0..15 {
        conn.write_all(request.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        // The worker's answers are small: head and body, Content-Length.
        while !answer.windows(4).any(|w| w == b"\r\n\r\n")
            || !String::from_utf8_lossy(&answer).contains("pid=")
        {
            let n = conn.read(&mut chunk).unwrap();
            assert!(n > 0, "request {i}: the worker closed the connection");
            answer.extend_from_slice(&chunk[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"), "request {i}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The session is still known: new connections reach its owner.
    assert_eq!(
        unknown_answers(&cluster, &sid, 6),
        0,
        "the session expired while its keep-alive connection was busy"
    );
}
