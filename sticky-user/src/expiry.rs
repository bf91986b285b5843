//! The learned-session expiry loop, on a thread of its own: every
//! `--learn-idle`/4 (at most 5 s) one pass over the kernel `sessions` map
//! forgets idle and closed learned sessions and recounts each worker's.
//!
//! A pass costs about a quarter of a microsecond per entry, measured on a
//! loaded 2-CPU machine (1,000,000 sessions: 250-290 ms), so two rules keep
//! the idle supervisor's CPU small whatever the table holds:
//! - no pass while nothing can have been learned: the last pass found no
//!   learned entry and the kernel's `learned` counter has not moved since
//!   (registered sessions never expire);
//! - the wait between passes is at least `BUDGET` times the last pass's
//!   own time, so passes take at most about 0.5% of a CPU (5 ms/s); with
//!   1,000,000 learned sessions an expiry may then come about a minute
//!   late (a closed session, already unroutable, lingers as long).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sticky_common::counter;

use crate::{sessions::SessionTable, steering::Counters};

/// Wait between passes, in multiples of the last pass's duration.
const BUDGET: u32 = 200;

/// Starts the loop, forever.
pub fn spawn(sessions: Arc<Mutex<SessionTable>>, counters: Arc<Counters>, idle: Duration) {
    let every = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    std::thread::Builder::new()
        .name("learned-expiry".into())
        .spawn(move || {
            let mut wait = every;
            // Unknown at start (adoption may have carried learned sessions).
            let mut last: Option<(u64, usize)> = None;
            loop {
                std::thread::sleep(wait);
                let learned = counters.get(counter::LEARNED);
                if last == Some((learned, 0)) {
                    continue;
                }
                let start = Instant::now();
                let pass = sessions.lock().unwrap().expire_learned(idle);
                wait = every.max(start.elapsed() * BUDGET);
                last = Some((learned, pass.learned_left));
            }
        })
        .expect("spawning the learned-session expiry thread");
}
