//! Rotation per batch (`--rotation-batch WINDOW`): when a sorting loop
//! rotates at once, and when it lets a window close first so that one
//! rotation serves every connection that arrived meanwhile.
//!
//! A rotation costs the supervisor 20-40 µs (a listener made, a map
//! update, a shutdown, wake-ups), whether it serves one connection or a
//! hundred, plus a few µs per queued connection it migrates. Per SYN (the default) the doorbell rings at
//! every SYN and each rotation serves about one. Per batch, once a rotation
//! served more than one SYN the loop stops listening to the doorbell: after
//! one window it rotates as soon as a connection is queued on the sorting
//! listener (at once, under load), or QUIET_MAX later if SYNs came but no
//! data (far clients: their data takes the softirq path after that
//! rotation); with no SYN at all it goes back to the doorbell. The
//! connections whose data arrives before the rotation queue on the sorting
//! listener (`sticky_sort` records their owner) and the rotation migrates
//! them all through the selector (queue path); those whose data comes after
//! it take the softirq path. Either way the placement is the one per SYN
//! would make: only its moment changes, a queued connection waiting at most
//! the window. Pinning, the handoff and the rotation itself are the per-SYN
//! loop's (`SortingLoop::rotate`).
//!
//! A connection that rings the doorbell alone still rotates at once, so
//! that serial clients pay nothing extra: the window is past, or the last
//! rotation served at most one SYN, every connection it served has been
//! placed, and no other SYN came since. Otherwise it waits for the window's
//! end. Placements are read from this CPU's counters (softirq and queue); a
//! connection that never sends data is never counted, which only makes the
//! next connection wait for one window.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use sticky_common::counter;

use super::{readable, wait, SortingLoop};

/// While busy, the longest a sorting listener stays in its slot after its
/// window with no connection queued on it, taking SYNs whose data has not
/// come: it bounds the requests one listener holds and, with no SYN then,
/// ends the batch.
const QUIET_MAX: Duration = Duration::from_millis(10);

/// What a sorting loop's counters say, read just before a rotation or at a
/// wake-up: SYNs taken by this CPU's sorting listeners, and connections
/// placed from them (softirq and queue paths).
#[derive(Clone, Copy, Default)]
pub struct Progress {
    pub syns: u64,
    pub placed: u64,
}

pub struct Pacer {
    window: Duration,
    /// When the last rotation began, and the counters just before it.
    last: Option<(Instant, Progress)>,
    /// SYNs that rotation retired (taken since the rotation before it).
    served: u64,
}

impl Pacer {
    pub fn new(window: Duration) -> Pacer {
        Pacer {
            window,
            last: None,
            served: 0,
        }
    }

    /// When to rotate, given the counters now: `None` at once, else at the
    /// end of the window opened by the last rotation.
    pub fn due(&self, now: Progress) -> Option<Instant> {
        let (at, before) = self.last?;
        let end = at + self.window;
        if Instant::now() >= end {
            return None;
        }
        let alone = self.served <= 1
            && now.placed.wrapping_sub(before.placed) >= self.served
            && now.syns.wrapping_sub(before.syns) <= 1;
        if alone {
            None
        } else {
            Some(end)
        }
    }

    /// A rotation begins; `before` is what the counters said just before.
    pub fn rotating(&mut self, before: Progress) {
        self.served = match self.last {
            Some((_, last)) => before.syns.wrapping_sub(last.syns),
            None => 0,
        };
        self.last = Some((Instant::now(), before));
    }

    /// While the last rotation served a batch: the end of its window.
    pub fn busy_until(&self) -> Option<Instant> {
        match self.last {
            Some((at, _)) if self.served > 1 => Some(at + self.window),
            _ => None,
        }
    }

    /// A window closed with no SYN: back to the doorbell.
    pub fn idle(&mut self) {
        self.served = 0;
    }

    /// SYNs counted before the last rotation.
    pub fn syns_at_rotation(&self) -> u64 {
        self.last.map_or(0, |(_, p)| p.syns)
    }
}

impl SortingLoop {
    /// The loop of `--rotation-batch window`.
    pub(super) fn run_batched(&mut self, window: Duration) {
        let mut pacer = Pacer::new(window);
        let mut tick = self.period;
        let mut next_tick = Instant::now() + tick;
        while !self.stop.load(Ordering::Relaxed) {
            let now = if let Some(end) = pacer.busy_until() {
                std::thread::sleep(end.saturating_duration_since(Instant::now()));
                // Rotate once a connection waits; until then the SYNs
                // taken wait for their data anyway (which then takes the
                // softirq path): far clients cost no rotation each.
                let quiet = (end + QUIET_MAX).saturating_duration_since(Instant::now());
                let waiting = readable(&self.current, quiet);
                self.doorbell.drain(); // this rotation serves them
                let now = self.progress();
                if !waiting && now.syns == pacer.syns_at_rotation() {
                    pacer.idle();
                    continue;
                }
                now
            } else {
                let timeout = next_tick.saturating_duration_since(Instant::now());
                let (queued, rang) = wait(&self.current, self.doorbell.fd(), timeout);
                if rang {
                    self.doorbell.drain();
                }
                let mut now = self.progress();
                if !queued && !rang {
                    // The fallback clock, as per SYN.
                    let active;
                    (active, tick) = self.clock(tick, now.syns != pacer.syns_at_rotation());
                    next_tick = Instant::now() + tick;
                    if !active {
                        continue;
                    }
                }
                if let Some(end) = pacer.due(now) {
                    std::thread::sleep(end.saturating_duration_since(Instant::now()));
                    self.doorbell.drain();
                    now = self.progress();
                }
                now
            };
            pacer.rotating(now);
            self.rotate_or_log();
        }
    }

    fn progress(&self) -> Progress {
        let count = |index| self.counters.get_cpu(index, self.cpu);
        Progress {
            syns: count(counter::SYN),
            placed: count(counter::PLACED_SOFTIRQ) + count(counter::PLACED_QUEUE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn at(syns: u64, placed: u64) -> Progress {
        Progress { syns, placed }
    }

    #[test]
    fn the_first_rotation_is_at_once() {
        assert!(Pacer::new(WINDOW).due(at(1, 0)).is_none());
    }

    #[test]
    fn serial_connections_rotate_at_once() {
        let mut pacer = Pacer::new(WINDOW);
        pacer.rotating(at(0, 0));
        // Served SYN 1; then SYN 1 placed, SYN 2 rang: alone.
        pacer.rotating(at(1, 0));
        assert!(pacer.due(at(2, 1)).is_none());
        pacer.rotating(at(2, 1));
        assert!(pacer.due(at(3, 2)).is_none());
    }

    #[test]
    fn a_connection_still_in_flight_makes_the_next_one_wait() {
        let mut pacer = Pacer::new(WINDOW);
        pacer.rotating(at(0, 0));
        pacer.rotating(at(1, 0));
        assert!(pacer.due(at(2, 0)).is_some());
    }

    #[test]
    fn a_batch_makes_the_next_rotation_wait() {
        let mut pacer = Pacer::new(WINDOW);
        pacer.rotating(at(0, 0));
        pacer.rotating(at(5, 0)); // served 5 SYNs
                                  // All 5 placed, one new SYN: still busy (a batch came before).
        assert!(pacer.due(at(6, 5)).is_some());
    }

    #[test]
    fn two_syns_since_the_rotation_wait() {
        let mut pacer = Pacer::new(WINDOW);
        pacer.rotating(at(0, 0));
        pacer.rotating(at(1, 0));
        assert!(pacer.due(at(3, 1)).is_some());
    }

    #[test]
    fn a_batch_keeps_the_loop_on_the_clock_until_a_window_is_empty() {
        let mut pacer = Pacer::new(WINDOW);
        pacer.rotating(at(0, 0));
        assert!(pacer.busy_until().is_none());
        pacer.rotating(at(5, 0));
        assert!(pacer.busy_until().is_some());
        pacer.idle();
        assert!(pacer.busy_until().is_none());
        assert!(
            pacer.due(at(6, 5)).is_none(),
            "an empty window ends the batch"
        );
    }

    #[test]
    fn after_the_window_everything_rotates_at_once() {
        let mut pacer = Pacer::new(Duration::ZERO);
        pacer.rotating(at(0, 0));
        pacer.rotating(at(50, 0));
        assert!(pacer.due(at(80, 0)).is_none());
    }
}
