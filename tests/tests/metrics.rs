//! `--metrics`: `/metrics` scraped and parsed (OpenMetrics text) while
//! traffic flows, every value checked against `sticky stats` (the control
//! socket's answer) taken just before and just after the scrape; once the
//! traffic stops, they are equal.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use sticky_tests::{random_sid, request, Cluster};

fn metrics_addr(cluster: &Cluster) -> SocketAddr {
    let log = cluster.log.lock().unwrap().clone();
    let line = log
        .lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .unwrap_or_else(|| panic!("no metrics line in:\n{log}"));
    line.trim_end_matches("/metrics").parse().unwrap()
}

/// Samples of one scrape: `name` or `name{labels}` -> value, after checking
/// the exposition's shape (TYPE before samples, `# EOF` last).
fn scrape(addr: SocketAddr) -> HashMap<String, u64> {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert_eq!(body.lines().last(), Some("# EOF"));
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        let family = match name.strip_suffix("_total") {
            Some(base) if types.get(base).map(String::as_str) == Some("counter") => base,
            _ => name,
        };
        assert!(types.contains_key(family), "sample {line} without a TYPE");
        samples.insert(series.to_owned(), value.parse().unwrap());
    }
    samples
}

/// The `stats` answer's numeric values.
fn numeric_stats(cluster: &Cluster) -> HashMap<String, u64> {
    cluster
        .stats()
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect()
}

/// The metric series that carries `stats` value `name`.
fn series_of(name: &str, metrics: &HashMap<String, u64>) -> String {
    let counter = format!("sticky_{name}_total");
    if metrics.contains_key(&counter) {
        counter
    } else {
        format!("sticky_{name}")
    }
}

#[test]
fn metrics_match_stats_while_traffic_flows() {
    let cluster = Cluster::start(3, &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&cluster);
    let sessions = cluster.sessions_on_every_worker(3, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, sent, sessions, target) =
                (stop.clone(), sent.clone(), sessions.clone(), cluster.addr);
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let path = match n % 3 {
                        0 => "/".to_owned(),
                        1 => format!("/?sid={}", sessions[(n + c) % sessions.len()].0),
                        _ => format!("/?sid={}", random_sid(20)),
                    };
                    assert_eq!(request(target, "GET", &path, b"").status, 200);
                    sent.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();

    // While traffic flows: each counter between the stats before and after.
    let mut checked = 0;
    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        let before = numeric_stats(&cluster);
        let metrics = scrape(addr);
        let after = numeric_stats(&cluster);
        for (name, &low) in &before {
            let series = series_of(name, &metrics);
            let value = *metrics
                .get(&series)
                .unwrap_or_else(|| panic!("stats value {name} missing from /metrics"));
            let high = after[name];
            let (low, high) = (low.min(high), low.max(high));
            assert!(
                (low..=high).contains(&value),
                "{series} = {value}, stats said {low} then {high}"
            );
            checked += 1;
        }
        if round == 9 {
            println!(
                "under traffic ({} requests so far): syn {} .. {} .. {}, rotations {} .. {} .. {}",
                sent.load(Ordering::Relaxed),
                before["syn"],
                metrics["sticky_syn_total"],
                after["syn"],
                before["rotations"],
                metrics["sticky_rotations_total"],
                after["rotations"],
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(sent.load(Ordering::Relaxed) > 100);

    // Quiet: equal, every value; per-worker series as `stats` has them.
    let (metrics, stats) = loop {
        let before = numeric_stats(&cluster);
        let metrics = scrape(addr);
        if numeric_stats(&cluster) == before {
            break (metrics, before);
        }
    };
    for (name, value) in &stats {
        assert_eq!(metrics[&series_of(name, &metrics)], *value, "{name}");
    }
    let raw = cluster.stats();
    for w in 0..3 {
        let field = &raw[&format!("worker{w}")];
        let sessions: u64 = field
            .split("sessions:")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(metrics[&format!("sticky_worker_up{{worker=\"{w}\"}}")], 1);
        assert_eq!(
            metrics[&format!("sticky_worker_sessions{{worker=\"{w}\"}}")],
            sessions
        );
    }
    println!(
        "{checked} values checked under traffic; quiet: {} values equal to stats (syn {}, by_sid {}, rotations {}, sessions {}, live_workers {})",
        stats.len(),
        stats["syn"],
        stats["by_sid"],
        stats["rotations"],
        stats["sessions"],
        stats["live_workers"]
    );
    assert!(stats["rotations"] > 0 && stats["by_sid"] > 0);

    // A restart shows up in both.
    let pid = cluster.worker_pid(1).unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    cluster.wait_for("worker 1 replaced", Duration::from_secs(10), |c| {
        c.worker_pid(1).is_some_and(|p| p != pid)
    });
    let metrics = scrape(addr);
    println!(
        "after a worker kill: restarts {} (stats {}), worker 1 restarts {}",
        metrics["sticky_restarts_total"],
        cluster.counter("restarts"),
        metrics["sticky_worker_restarts_total{worker=\"1\"}"]
    );
    assert_eq!(metrics["sticky_restarts_total"], 1);
    assert_eq!(metrics["sticky_worker_restarts_total{worker=\"1\"}"], 1);
    assert_eq!(cluster.counter("restarts"), 1);
}

#[test]
fn only_get_metrics_is_served() {
    let cluster = Cluster::start(1, &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&cluster);
    let other = request(addr, "GET", "/", b"");
    let post = request(addr, "POST", "/metrics", b"x");
    println!(
        "GET / -> {}, POST /metrics -> {}",
        other.status, post.status
    );
    assert_eq!(other.status, 404);
    assert_eq!(post.status, 405);
}
