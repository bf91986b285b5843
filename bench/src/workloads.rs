//! The Socket.IO workloads, each run by `clients` threads for a fixed time
//! against one server variant. Each client has its own source address
//! (`127.1.x.y`; for each new connection of the new-connection workloads
//! another `y`), as distinct users would: nginx's `ip_hash` balances by
//! the first three octets.
//!
//! A failure is counted, never fatal: a wrong-worker answer (Engine.IO's
//! "Session ID unknown", or another worker's pid) in `wrong_worker`,
//! anything else in `errors`; the client then carries on (with a new
//! session where its session is unusable).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http;
use crate::measure::{run_clients, Rng, Stats};
use crate::session::{Failure, Polling, Session};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Workload {
    /// A sid-carrying polling request (`POST` of one event) on a new TCP
    /// connection, one client.
    NewConnSerial,
    /// The same from `clients` concurrent clients, one session each.
    NewConnConcurrent,
    /// Long-polling sessions on two keep-alive connections each, as
    /// browsers hold them: `POST` an event with an ack on one, `GET` the
    /// ack on the other; timed per cycle.
    LongPolling,
    /// Session establishment: handshake, Socket.IO connect, upgrade to
    /// WebSocket (probe), one `whoami` over it; timed per session.
    Establish,
    /// Acked `echo` round trips on an established (WebSocket-only)
    /// session, one client.
    WsRoundTrip,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::NewConnSerial,
        Workload::NewConnConcurrent,
        Workload::LongPolling,
        Workload::Establish,
        Workload::WsRoundTrip,
    ];

    pub fn parse(key: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.key() == key)
    }

    pub fn key(self) -> &'static str {
        match self {
            Workload::NewConnSerial => "new_connection_serial",
            Workload::NewConnConcurrent => "new_connection_concurrent",
            Workload::LongPolling => "long_polling_keepalive",
            Workload::Establish => "session_establishment",
            Workload::WsRoundTrip => "websocket_round_trip",
        }
    }

    pub fn label(self, clients: usize) -> String {
        match self {
            Workload::NewConnSerial => "sid request, new connection, serial".into(),
            Workload::NewConnConcurrent => {
                format!("sid request, new connection, {clients} clients")
            }
            Workload::LongPolling => format!("long-polling, keep-alive, {clients} clients"),
            Workload::Establish => format!("handshake + WebSocket upgrade, {clients} clients"),
            Workload::WsRoundTrip => "WebSocket round trip, serial".into(),
        }
    }

    /// What one timed operation is.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::NewConnSerial | Workload::NewConnConcurrent => "requests",
            Workload::LongPolling => "POST+GET cycles",
            Workload::Establish => "sessions",
            Workload::WsRoundTrip => "round trips",
        }
    }

    /// Whether the front's CPU time is best counted per connection (each
    /// operation opens its own) or per operation (on kept connections,
    /// where only a front on the data path works at all).
    pub fn per_connection(self) -> bool {
        matches!(
            self,
            Workload::NewConnSerial | Workload::NewConnConcurrent | Workload::Establish
        )
    }

    pub fn clients(self, concurrency: usize) -> usize {
        match self {
            Workload::NewConnSerial | Workload::WsRoundTrip => 1,
            _ => concurrency,
        }
    }

    pub fn run(self, addr: SocketAddr, clients: usize, duration: Duration) -> Stats {
        match self {
            Workload::NewConnSerial | Workload::NewConnConcurrent => {
                new_connections(addr, clients, duration)
            }
            Workload::LongPolling => long_polling(addr, clients, duration),
            Workload::Establish => establish(addr, clients, duration),
            Workload::WsRoundTrip => ws_round_trips(addr, clients, duration),
        }
    }
}

/// Client `t`'s source address. `ip_hash` hashes the first three octets.
fn source(t: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (t % 256) as u8, 1 + (t / 256) as u8)
}

/// The source address of client `t`'s `n`-th new connection: its own
/// first three octets (what `ip_hash` sees), the last one cycling through
/// 254 values. From one address the kernel's random ports soon hit
/// 4-tuples the server holds in TIME_WAIT (it closes first), whose SYNs get
/// a request socket whatever the placement: cookie placement then takes
/// its queue path (README, "Under sustained load from one address"), which
/// clients spread over many addresses do not make it take. Clients past
/// the 256th keep their one address.
fn connection_source(t: usize, n: u64) -> Ipv4Addr {
    match t {
        0..256 => Ipv4Addr::new(127, 1, t as u8, 1 + (n % 254) as u8),
        _ => source(t),
    }
}

fn running(start: Instant, duration: Duration) -> bool {
    start.elapsed() < duration && !crate::host::interrupted()
}

fn count(stats: &mut Stats, failure: Failure) {
    match failure {
        Failure::WrongWorker => stats.wrong_worker += 1,
        Failure::Error(e) => stats.fail(e),
    }
}

/// Opens a session on `conn`, retrying a few times (a session that lands
/// on the wrong worker during its own set-up is retried); failures counted.
fn open_session(conn: &mut Polling, stats: &mut Stats) -> Option<Session> {
    for _ in 0..10 {
        match Session::open(conn) {
            Ok(s) => return Some(s),
            Err(f) => count(stats, f),
        }
        conn.close();
        if crate::host::interrupted() {
            break;
        }
    }
    None
}

/// Sessions per client in the new-connection workloads: several for one
/// client (so that its requests spread over the workers), one each for many.
fn sessions_per_client(clients: usize) -> usize {
    (8 / clients).max(1)
}

fn new_connections(addr: SocketAddr, clients: usize, duration: Duration) -> Stats {
    run_clients(clients, None, |t, barrier| {
        let mut stats = Stats::default();
        let src = Some(source(t));
        let mut sessions = Vec::new();
        for _ in 0..sessions_per_client(clients) {
            // Each session opened on one keep-alive connection of its own,
            // closed before the clock starts (so that a server without
            // stickiness gets sessions too: they are what it misroutes).
            let mut conn = Polling::single(addr, src);
            sessions.extend(open_session(&mut conn, &mut stats));
            stats.connections += conn.opened();
        }
        let requests: Vec<Vec<u8>> = sessions
            .iter()
            .map(|s| http::request("POST", &s.target("polling"), br#"42["tick"]"#, true))
            .collect();
        barrier.wait();
        let mut rng = Rng::seeded(t as u64);
        let start = Instant::now();
        while !sessions.is_empty() && running(start, duration) {
            let i = (rng.next() % sessions.len() as u64) as usize;
            let begin = Instant::now();
            let from = Some(connection_source(t, stats.connections));
            stats.connections += 1;
            match http::exchange(addr, from, &requests[i]) {
                Ok(r) => {
                    // Answered, right or wrong: timed either way.
                    let ns = (r.complete - begin).as_nanos() as u64;
                    stats.latencies.push(ns);
                    match sessions[i].check(r) {
                        Ok(_) => stats.right_latencies.push(ns),
                        Err(f) => count(&mut stats, f),
                    }
                }
                Err(e) => count(&mut stats, e.into()),
            }
        }
        stats.elapsed = start.elapsed();
        for s in &sessions {
            s.close_polling(addr, src);
        }
        stats
    })
}

fn long_polling(addr: SocketAddr, clients: usize, duration: Duration) -> Stats {
    run_clients(clients, None, |t, barrier| {
        let mut stats = Stats::default();
        let mut conn = Polling::new(addr, Some(source(t)));
        let mut session = open_session(&mut conn, &mut stats);
        let payload = [Value::from("x")];
        barrier.wait();
        let start = Instant::now();
        while running(start, duration) {
            let Some(s) = session.as_mut() else {
                session = open_session(&mut conn, &mut stats);
                continue;
            };
            let begin = Instant::now();
            match s.call_polling(&mut conn, "echo", &payload) {
                Ok(_) => stats.latencies.push(begin.elapsed().as_nanos() as u64),
                Err(f) => {
                    count(&mut stats, f);
                    conn.close();
                    session = None;
                }
            }
        }
        stats.elapsed = start.elapsed();
        stats.connections += conn.opened();
        if let Some(s) = session {
            let _ = s.post(&mut conn, "1");
        }
        stats
    })
}

/// One session from handshake to an acked `whoami` over WebSocket.
fn establish_one(
    addr: SocketAddr,
    src: Option<Ipv4Addr>,
    stats: &mut Stats,
) -> Result<(), Failure> {
    let mut conn = Polling::new(addr, src);
    let result = (|| {
        let mut session = Session::open(&mut conn)?;
        let mut ws = session.upgrade(addr, src)?;
        stats.connections += 1;
        let me = session.call_ws(&mut ws, "whoami", &[])?;
        session.check_whoami(&me)?;
        ws.send_text("1")?; // Engine.IO close: the session ends at once
        ws.close();
        Ok(())
    })();
    stats.connections += conn.opened();
    result
}

fn establish(addr: SocketAddr, clients: usize, duration: Duration) -> Stats {
    run_clients(clients, None, |t, barrier| {
        let mut stats = Stats::default();
        let src = Some(source(t));
        barrier.wait();
        let start = Instant::now();
        while running(start, duration) {
            let begin = Instant::now();
            match establish_one(addr, src, &mut stats) {
                Ok(()) => stats.latencies.push(begin.elapsed().as_nanos() as u64),
                Err(f) => count(&mut stats, f),
            }
        }
        stats.elapsed = start.elapsed();
        stats
    })
}

fn ws_round_trips(addr: SocketAddr, clients: usize, duration: Duration) -> Stats {
    run_clients(clients, None, |t, barrier| {
        let mut stats = Stats::default();
        let src = Some(source(t));
        let payload = [Value::from("x")];
        // Established before the clock starts, WebSocket-only: how it was
        // established does not matter here, and the floor could not keep a
        // polling session long enough to upgrade it.
        let connect = |stats: &mut Stats| {
            stats.connections += 1;
            Session::open_websocket(addr, src)
                .map_err(|f| count(stats, f))
                .ok()
        };
        let mut open = connect(&mut stats);
        barrier.wait();
        let start = Instant::now();
        while running(start, duration) {
            let Some((session, ws)) = open.as_mut() else {
                open = connect(&mut stats);
                if open.is_none() {
                    break;
                }
                continue;
            };
            let begin = Instant::now();
            match session.call_ws(ws, "echo", &payload) {
                Ok(v) if v == Value::Array(payload.to_vec()) => {
                    stats.latencies.push(begin.elapsed().as_nanos() as u64)
                }
                Ok(v) => stats.fail(format!("echo acked {v}")),
                Err(f) => {
                    count(&mut stats, f);
                    open = None;
                }
            }
        }
        stats.elapsed = start.elapsed();
        if let Some((_, mut ws)) = open {
            let _ = ws.send_text("1");
            ws.close();
        }
        stats
    })
}
