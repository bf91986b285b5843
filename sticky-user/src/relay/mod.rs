//! Broadcasting between workers: the supervisor as the cluster's relay.
//!
//! Two ways in, one bounded queue per member (`outbox`):
//! - `node`: a Node.js IPC channel per worker (a socketpair end as fd 4,
//!   `NODE_CHANNEL_FD=4`, `advanced` serialization), relayed the way
//!   `@socket.io/cluster-adapter`'s `setupPrimary()` does, so that adapter
//!   works unchanged;
//! - `pubsub`: a unix socket (`$STICKY_RELAY`) speaking a small pub/sub
//!   protocol (README, "Broadcasting between workers"), for the Python
//!   manager and the Rust driver.
//!
//! The relay never decodes payloads: frames go out as they came.

mod node;
mod outbox;
mod pubsub;
mod v8;

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use anyhow::Result;

use crate::{control::RemoveOnDrop, sessions::SessionTable};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Relay counters, reported by `sticky stats`.
#[derive(Default)]
pub struct Stats {
    /// Messages received from members (both ways in).
    received: Counter,
    /// Copies queued for a member.
    delivered: Counter,
    /// Copies dropped because the member's queue was full.
    dropped: Counter,
    /// Node messages that did not parse (relayed to every other worker).
    malformed: Counter,
}

pub struct Relay {
    stats: Arc<Stats>,
    node: node::NodeChannels,
    pubsub: Arc<pubsub::Broker>,
    path: PathBuf,
}

impl Relay {
    /// Serves the pub/sub socket beside the control socket (`default_path`);
    /// workers are identified through `sessions`, as on the control socket.
    /// The socket file goes when the returned guard is dropped.
    pub fn start(
        control: &Path,
        sessions: Arc<Mutex<SessionTable>>,
    ) -> Result<(Arc<Relay>, RemoveOnDrop)> {
        let path = default_path(control);
        let stats = Arc::new(Stats::default());
        let pubsub = pubsub::Broker::serve(&path, sessions, stats.clone())?;
        let relay = Arc::new(Relay {
            node: node::NodeChannels::new(stats.clone()),
            stats,
            pubsub,
            path: path.clone(),
        });
        Ok((relay, RemoveOnDrop(path)))
    }

    /// The pub/sub socket's path, given to workers as `STICKY_RELAY`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh Node IPC channel for worker `index`, replacing its previous
    /// one: the end the worker gets (fd 4) is returned.
    pub fn node_channel(&self, index: usize) -> std::io::Result<OwnedFd> {
        self.node.open(index)
    }

    /// Its values for `sticky stats` and the metrics: (name, is a counter,
    /// help, value).
    pub fn values(&self) -> [(&'static str, bool, &'static str, u64); 6] {
        let s = &self.stats;
        [
            (
                "relay_received",
                true,
                "messages the relay got from workers",
                s.received.get(),
            ),
            (
                "relay_delivered",
                true,
                "copies queued for a worker",
                s.delivered.get(),
            ),
            (
                "relay_dropped",
                true,
                "copies dropped: the worker's queue was full",
                s.dropped.get(),
            ),
            (
                "relay_malformed",
                true,
                "Node IPC messages the relay could not read",
                s.malformed.get(),
            ),
            (
                "relay_node_channels",
                false,
                "open Node IPC channels",
                self.node.open_count() as u64,
            ),
            (
                "relay_pubsub_connections",
                false,
                "open relay socket connections",
                self.pubsub.connection_count() as u64,
            ),
        ]
    }
}

/// The relay socket's default path, beside the control socket:
/// `sticky-3000.sock` gives `sticky-3000.relay.sock`.
fn default_path(control: &Path) -> PathBuf {
    let name = control
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let relay = match name.strip_suffix(".sock") {
        Some(stem) => format!("{stem}.relay.sock"),
        None => format!("{name}.relay"),
    };
    control.with_file_name(relay)
}
