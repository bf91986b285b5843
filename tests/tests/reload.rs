//! `sticky reload` / SIGHUP with the demo worker: which process a request
//! reaches across a reload, when an old process is stopped, what a new one
//! sees, and what a new sticky adopts after a SIGKILL during a drain.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use sticky_tests::{control_line, demo_worker_bin, Cluster, TempDir};

/// pid -> (generation, state) of every running worker, from `stats`.
fn workers(c: &Cluster) -> HashMap<u32, (u64, String)> {
    c.stats()
        .into_iter()
        .filter(|(k, v)| k.starts_with("worker") && v.starts_with("pid:"))
        .map(|(_, v)| {
            let field = |name: &str| {
                v.split(',')
                    .find_map(|f| f.strip_prefix(name))
                    .unwrap_or_default()
                    .to_owned()
            };
            let pid = field("pid:").parse().unwrap();
            (
                pid,
                (field("generation:").parse().unwrap(), field("state:")),
            )
        })
        .collect()
}

fn pids_of(c: &Cluster, generation: u64) -> HashSet<u32> {
    workers(c)
        .into_iter()
        .filter(|(_, (g, _))| *g == generation)
        .map(|(pid, _)| pid)
        .collect()
}

fn env_of(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|&b| b == 0).find_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        kv.strip_prefix(name)?.strip_prefix('=').map(str::to_owned)
    })
}

#[test]
fn sighup_starts_a_generation_and_an_old_worker_stops_once_its_last_session_closes() {
    let cluster = Cluster::start(2, &["--drain", "60s", "--learn", "off"]);
    let sessions = cluster.sessions_on_every_worker(2, 1);
    let old: Vec<u32> = (0..2).map(|i| cluster.worker_pid(i).unwrap()).collect();
    unsafe { libc::kill(cluster.pid() as i32, libc::SIGHUP) };
    cluster.wait_for("the new generation", Duration::from_secs(10), |c| {
        pids_of(c, 1).len() == 2
    });
    let new = pids_of(&cluster, 1);
    for &pid in &new {
        assert_eq!(env_of(pid, "STICKY_GENERATION").as_deref(), Some("1"));
        let index: usize = env_of(pid, "STICKY_WORKER").unwrap().parse().unwrap();
        assert!(index < 2, "STICKY_WORKER stays the worker index: {index}");
    }
    for &pid in &old {
        assert_eq!(env_of(pid, "STICKY_GENERATION").as_deref(), Some("0"));
    }

    // Requests without a sid: the new generation only. With their sid: the
    // old owner, on new connections.
    let mut spread: HashMap<u32, usize> = HashMap::new();
    for _ in 0..20 {
        let r = cluster.get("/");
        assert!(new.contains(&r.pid.unwrap()), "balanced onto an old worker");
        *spread.entry(r.pid.unwrap()).or_default() += 1;
    }
    assert!(
        spread.len() == 2 && spread.values().all(|&n| n >= 5),
        "balanced unevenly over the new generation: {spread:?}"
    );
    for round in 0..5 {
        for (sid, owner) in &sessions {
            let r = cluster.get(&format!("/?sid={sid}&round={round}"));
            assert_eq!(r.pid, Some(old[*owner]), "sid {sid} left its old owner");
        }
    }

    // The last session of old worker 0 closes: it is stopped long before
    // the 60 s deadline; old worker 1 keeps serving its session.
    let (sid0, _) = sessions.iter().find(|(_, w)| *w == 0).unwrap();
    let closed = Instant::now();
    let r = cluster.get(&format!("/unregister?sid={sid0}"));
    assert_eq!((r.status, r.pid), (200, Some(old[0])), "{}", r.text());
    cluster.wait_for("old worker 0 stopped", Duration::from_secs(10), |c| {
        !workers(c).contains_key(&old[0])
    });
    let stopped_after = closed.elapsed();
    let (sid1, _) = sessions.iter().find(|(_, w)| *w == 1).unwrap();
    assert_eq!(
        cluster.get(&format!("/?sid={sid1}")).pid,
        Some(old[1]),
        "old worker 1 still has its session"
    );
    assert_eq!(workers(&cluster)[&old[1]], (0, "draining".to_owned()));
    let log = cluster.log.lock().unwrap().clone();
    assert!(
        log.contains("worker 0: no session left, stopping it"),
        "{log}"
    );
    sticky_tests::report(&format!(
        "SIGHUP: generation 1 {new:?} took 20/20 new connections ({spread:?}), {} old sids x 5 \
         rounds stayed on {old:?}; old worker 0 stopped {stopped_after:.1?} after its last \
         session closed",
        sessions.len()
    ));
}

#[test]
fn a_sticky_killed_during_a_drain_is_succeeded_by_one_that_drains_again() {
    let worker = demo_worker_bin();
    let worker = worker.to_str().unwrap();
    let dir = TempDir::new();
    let control = dir.0.join("control.sock");
    let extra = ["--drain", "3s", "--learn", "off"];
    let mut first = Cluster::start_with_control("127.0.0.1:0", &control, 2, &extra, &[worker]);
    let addr = first.addr;
    let sessions = first.sessions_on_every_worker(2, 1);
    let old: Vec<u32> = (0..2).map(|i| first.worker_pid(i).unwrap()).collect();
    let answer = control_line(&control, "reload");
    assert!(answer.starts_with("ok generation 1 started"), "{answer}");
    let new = pids_of(&first, 1);
    unsafe { libc::kill(first.pid() as i32, libc::SIGKILL) };
    first.terminate(Duration::from_secs(5));

    let second = Cluster::start_with_control(&addr.to_string(), &control, 2, &extra, &[worker]);
    let started = Instant::now();
    let log = second.log.lock().unwrap().clone();
    assert!(
        log.contains("generation 0 was draining: it drains again for up to 3s"),
        "{log}"
    );
    assert!(
        !log.contains("started (pid"),
        "a worker was started anew:\n{log}"
    );
    assert_eq!(pids_of(&second, 1), new, "the new generation adopted");
    assert_eq!(
        pids_of(&second, 0),
        old.iter().copied().collect(),
        "the old one too"
    );
    for (sid, owner) in &sessions {
        let r = second.get(&format!("/?sid={sid}"));
        assert_eq!(r.pid, Some(old[*owner]), "sid {sid} after the takeover");
    }
    for _ in 0..10 {
        assert!(new.contains(&second.get("/").pid.unwrap()));
    }
    second.wait_for("the drain to end", Duration::from_secs(15), |c| {
        pids_of(c, 0).is_empty()
    });
    let drained = started.elapsed();
    // The line follows the last exit the stats already show: wait for it.
    second.wait_for("the reload's last line", Duration::from_secs(5), |c| {
        c.log
            .lock()
            .unwrap()
            .contains("reload done: generation 0 stopped, generation 1 serves")
    });
    sticky_tests::report(&format!(
        "supervisor SIGKILLed during a drain: its successor adopted both generations \
         ({old:?} draining, {new:?} accepting); the old one stopped {drained:.1?} later"
    ));
}

#[test]
fn reload_without_a_running_sticky_is_one_clear_line() {
    let dir = TempDir::new();
    let out = std::process::Command::new(sticky_tests::sticky_bin())
        .args(["reload", "--control"])
        .arg(dir.0.join("nothing.sock"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach a running sticky"), "{stderr}");
}

/// One request on a kept-alive connection: the answer's pid, or None if
/// the connection was closed or reset before any answer byte.
fn keep_alive_request(s: &mut std::net::TcpStream, target: &str) -> Option<u32> {
    use std::io::{Read, Write};
    s.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let Some(head_end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..head_end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        if raw.len() >= head_end + 4 + length {
            return sticky_tests::parse_response(&raw).pid;
        }
    }
}

#[test]
fn a_request_without_a_sid_on_a_kept_alive_connection_to_a_draining_worker_is_reset() {
    let cluster = Cluster::start(2, &["--drain", "60s"]);
    let (sid, owner) = cluster.sessions_on_every_worker(2, 1).remove(0);
    let old = cluster.worker_pid(owner).unwrap();
    let mut kept = std::net::TcpStream::connect(cluster.addr).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        keep_alive_request(&mut kept, &format!("/?sid={sid}")),
        Some(old)
    );
    // Before the reload a request without a sid there is the owner's to answer.
    assert_eq!(keep_alive_request(&mut kept, "/"), Some(old));
    let before = cluster.counter("drain_dropped");

    unsafe { libc::kill(cluster.pid() as i32, libc::SIGHUP) };
    cluster.wait_for("the new generation", Duration::from_secs(10), |c| {
        pids_of(c, 1).len() == 2
    });
    let new = pids_of(&cluster, 1);
    // Its own session still reaches the old worker on the same connection.
    assert_eq!(
        keep_alive_request(&mut kept, &format!("/?sid={sid}")),
        Some(old)
    );
    // A request without a sid does not: reset before any answer byte.
    assert_eq!(
        keep_alive_request(&mut kept, "/"),
        None,
        "answered by the draining worker"
    );
    assert_eq!(cluster.counter("drain_dropped"), before + 1);
    // Resent on a new connection, as a client does, it reaches the new generation.
    let r = cluster.get("/");
    assert!(new.contains(&r.pid.unwrap()), "{}", r.text());
    sticky_tests::report(&format!(
        "kept-alive connection to draining worker {old}: its sid still answered there, a request \
         without a sid reset (drain_dropped +1) and answered by {} of the new generation on a new \
         connection",
        r.pid.unwrap()
    ));
}
