//! A new `sticky run` adopts the workers a SIGKILLed supervisor left
//! running: their listeners, their sessions, and their exits.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use sticky_tests::{demo_worker_bin, signal, Cluster, TempDir};

#[test]
fn a_new_sticky_adopts_the_workers_of_a_killed_one() {
    const WORKERS: usize = 3;
    let worker = demo_worker_bin();
    let worker = worker.to_str().unwrap();
    let dir = TempDir::new();
    // The default control path is per port; a fixed one plays that role.
    let control = dir.0.join("control.sock");
    let mut old = Cluster::start_with_control("127.0.0.1:0", &control, WORKERS, &[], &[worker]);
    let addr = old.addr;
    let sessions = old.sessions_on_every_worker(WORKERS, 2);
    let pids: Vec<u32> = (0..WORKERS).map(|i| old.worker_pid(i).unwrap()).collect();
    signal(old.pid(), libc::SIGKILL);
    old.terminate(Duration::from_secs(5));

    let new = Cluster::start_with_control(&addr.to_string(), &control, WORKERS, &[], &[worker]);
    let log = new.log.lock().unwrap().clone();
    println!("{log}");
    for (i, pid) in pids.iter().enumerate() {
        assert!(
            log.contains(&format!("adopted worker {i} (pid {pid})")),
            "worker {i} not adopted:\n{log}"
        );
        assert_eq!(new.worker_pid(i), Some(*pid), "slot {i}");
    }
    assert!(
        !log.contains("started (pid"),
        "a worker was started anew:\n{log}"
    );
    assert_eq!(new.counter("sessions"), sessions.len() as u64);

    // Sessions kept: every sid reaches its owner, the same process.
    for round in 0..5 {
        for (sid, owner) in &sessions {
            let r = new.get(&format!("/?sid={sid}&round={round}"));
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(
                (r.worker, r.pid),
                (Some(*owner), Some(pids[*owner])),
                "sid {sid} left its owner after adoption"
            );
        }
    }
    // Adopted workers register new sessions with the new supervisor.
    let fresh = format!("fresh{}", sticky_tests::random_sid(12));
    let owner = new.register_any(&fresh);
    for _ in 0..5 {
        assert_eq!(new.get(&format!("/?sid={fresh}")).worker, Some(owner));
    }
    sticky_tests::report(&format!(
        "adopted {WORKERS} workers {pids:?}; {} kept sessions x 5 rounds and a new one all on \
         their owners",
        sessions.len()
    ));

    // An adopted worker that dies is restarted, as a child this time.
    signal(pids[1], libc::SIGKILL);
    let start = Instant::now();
    new.wait_for("worker 1 restarted", Duration::from_secs(10), |c| {
        c.worker_pid(1).is_some_and(|p| p != pids[1])
    });
    let restarted = new.worker_pid(1).unwrap();
    sticky_tests::report(&format!(
        "adopted worker 1 (pid {}) SIGKILLed: restarted as pid {restarted} after {:.1?}",
        pids[1],
        start.elapsed()
    ));
    let log = new.log.lock().unwrap().clone();
    assert!(
        log.contains(&format!("worker 1 (pid {}) (adopted) exited", pids[1])),
        "{log}"
    );
    let mut seen: HashMap<usize, u32> = HashMap::new();
    for _ in 0..30 {
        let r = new.get("/");
        assert_eq!(r.status, 200);
        seen.insert(r.worker.unwrap(), r.pid.unwrap());
    }
    assert_eq!(seen.get(&1), Some(&restarted), "{seen:?}");

    // A clean stop ends adopted workers too and frees the port.
    let mut new = new;
    let status = new.terminate(Duration::from_secs(20)).expect("sticky exit");
    assert!(status.success());
    for pid in [pids[0], pids[2], restarted] {
        // Adopted workers are not our children: whoever inherited them
        // reaps them, so a zombie counts as gone.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s[s.rfind(')')? + 2..].chars().next());
        assert!(
            matches!(state, None | Some('Z')),
            "worker pid {pid} survived the stop (state {state:?})"
        );
    }
    assert!(
        std::net::TcpListener::bind(addr).is_ok(),
        "port still taken after the adopting sticky stopped"
    );
}

#[test]
fn learned_sessions_survive_adoption_and_too_few_workers_is_refused() {
    const WORKERS: usize = 3;
    let python = sticky_tests::python3_bin();
    let command = [python.to_str().unwrap(), sticky_tests::ENGINE_IO_POLLING_PY];
    let dir = TempDir::new();
    let control = dir.0.join("control.sock");
    // Round-robin: without their sessions, most requests would land on a
    // worker that does not know the sid.
    let extra = ["--balance", "round-robin"];
    let mut old = Cluster::start_with_control("127.0.0.1:0", &control, WORKERS, &extra, &command);
    let addr = old.addr.to_string();
    let sids: Vec<String> = (0..12).map(|_| old.engine_io_handshake()).collect();
    assert_eq!(old.counter("learned"), 12);
    signal(old.pid(), libc::SIGKILL);
    old.terminate(Duration::from_secs(5));

    // Fewer slots than the orphans need: one line, nothing taken.
    let out = std::process::Command::new(sticky_tests::sticky_bin())
        .args(["run", "--listen", &addr, "--workers", "2", "--control"])
        .arg(&control)
        .arg("--")
        .args(command)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    sticky_tests::report(&format!(
        "--workers 2 over 3 orphans: {} -> {stderr:?}",
        out.status
    ));
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("pass --workers 3 or more"), "{stderr}");

    let new = Cluster::start_with_control(&addr, &control, WORKERS, &extra, &command);
    let log = new.log.lock().unwrap().clone();
    assert!(
        log.contains("kept 0 registered and 12 learned sessions"),
        "{log}"
    );
    assert_eq!(new.counter("learned_sessions"), 12);
    let mut unknown = 0;
    for sid in &sids {
        for _ in 0..5 {
            let r = new.get(&format!("/socket.io/?EIO=4&transport=polling&sid={sid}"));
            if r.status != 200 {
                unknown += 1;
            }
        }
    }
    sticky_tests::report(&format!(
        "12 learned sessions x 5 requests after adoption: {unknown} not on their worker"
    ));
    assert_eq!(unknown, 0);
}
