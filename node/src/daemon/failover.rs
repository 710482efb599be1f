//! A submitted job's phase, and when the submitter takes the job away from its worker: the rules in one
//! place, as pure functions of the phase, what the submitter observes and the clock, so unit tests drive
//! every case without sockets.
//!
//! - A worker that is disconnected for [`DISCONNECT_GRACE`] (or the heartbeat timeout, if shorter) is lost.
//! - A worker that accepted the job and then sent nothing for the heartbeat timeout is lost (before the
//!   acceptance a large job may still be in transit: the request's own timeout covers that).
//! - Neither applies while the result is being written here (the worker owes nothing more), nor, after
//!   this daemon restarted, until `[jobs] reattach_secs` have passed (the worker is given time to
//!   reconnect and report; its first update ends that grace). A worker that did not report within the
//!   grace has been silent all along, and is lost at once.
//!
//! What happens next (another device, a pinned job failing, `max_attempts`) is `JobManager::attempt_failed`
//! and `JobManager::place`.
use libp2p::PeerId;
use std::time::{Duration, Instant};

/// A worker that is disconnected (rather than silent) is given this long to come back.
pub(super) const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

/// Where a submitted job stands. One enum rather than a set of flags, so that no combination can say
/// two things at once (an accepted job without a worker, a finishing one still under watch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Phase {
    /// No device holds it: being placed, or between a failed attempt and the next.
    Unplaced,
    /// Sent to `worker`; its acknowledgement has not come.
    Offered {
        worker: PeerId,
        disconnected_since: Option<Instant>,
    },
    /// The worker (this node itself for a local run) accepted it; `last_heard` is its last word.
    Running {
        worker: PeerId,
        last_heard: Instant,
        disconnected_since: Option<Instant>,
    },
    /// Taken up after this daemon restarted: the worker that held it has until `until` to report.
    Reattaching {
        worker: PeerId,
        until: Instant,
        last_heard: Instant,
    },
    /// The result arrived from `worker` and is being written to `--out`; the worker owes nothing more.
    Finishing { worker: PeerId },
}

/// What an update from the job's worker meant for its phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Heard {
    /// From the worker holding the job (and it now counts as running).
    Live,
    /// Its first word after this daemon restarted.
    Reattached,
    /// The result is already being written: a resent one (our acknowledgement was lost).
    Finishing,
    /// Not from the worker holding the job.
    Stranger,
}

impl Phase {
    /// The device holding the job, the one whose result is being written included.
    pub(super) fn worker(&self) -> Option<PeerId> {
        match *self {
            Phase::Unplaced => None,
            Phase::Offered { worker, .. }
            | Phase::Running { worker, .. }
            | Phase::Reattaching { worker, .. }
            | Phase::Finishing { worker } => Some(worker),
        }
    }

    /// The device the job is still exchanged with (not once its result arrived).
    pub(super) fn live_worker(&self) -> Option<PeerId> {
        match self {
            Phase::Finishing { .. } => None,
            p => p.worker(),
        }
    }

    pub(super) fn finishing(&self) -> bool {
        matches!(self, Phase::Finishing { .. })
    }

    /// `worker` accepted the job: true when it still holds it (the job may have moved or ended while
    /// the answer was on its way).
    pub(super) fn accept(&mut self, worker: PeerId, now: Instant) -> bool {
        match *self {
            Phase::Offered {
                worker: w,
                disconnected_since,
            } if w == worker => {
                *self = Phase::Running {
                    worker,
                    last_heard: now,
                    disconnected_since,
                };
                true
            }
            Phase::Running { worker: w, .. } | Phase::Reattaching { worker: w, .. } if w == worker => {
                self.heard(worker, now);
                true
            }
            _ => false,
        }
    }

    /// An update from `worker` arrived.
    pub(super) fn heard(&mut self, worker: PeerId, now: Instant) -> Heard {
        if self.worker() != Some(worker) {
            return Heard::Stranger;
        }
        let (disconnected_since, heard) = match *self {
            Phase::Finishing { .. } => return Heard::Finishing,
            Phase::Reattaching { .. } => (None, Heard::Reattached),
            Phase::Offered { disconnected_since, .. } | Phase::Running { disconnected_since, .. } => {
                (disconnected_since, Heard::Live)
            }
            Phase::Unplaced => return Heard::Stranger,
        };
        *self = Phase::Running {
            worker,
            last_heard: now,
            disconnected_since,
        };
        heard
    }
}

/// Why the worker is lost now, or None. Keeps the phase's memory of when the worker went away up to date,
/// and turns a reattaching job whose grace ended into a running one.
pub(super) fn lost(phase: &mut Phase, connected: bool, now: Instant, timeout: Duration) -> Option<String> {
    if let Phase::Reattaching {
        worker,
        until,
        last_heard,
    } = *phase
    {
        if now < until {
            return None;
        }
        *phase = Phase::Running {
            worker,
            last_heard,
            disconnected_since: None,
        };
    }
    let (last_heard, disconnected_since) = match phase {
        Phase::Offered { disconnected_since, .. } => (None, disconnected_since),
        Phase::Running {
            last_heard,
            disconnected_since,
            ..
        } => (Some(*last_heard), disconnected_since),
        Phase::Unplaced | Phase::Finishing { .. } | Phase::Reattaching { .. } => return None,
    };
    if connected {
        *disconnected_since = None;
    } else if disconnected_since.is_none() {
        *disconnected_since = Some(now);
    }
    if disconnected_since.is_some_and(|t| now - t >= DISCONNECT_GRACE.min(timeout)) {
        return Some("disconnected".into());
    }
    if last_heard.is_some_and(|h| now - h >= timeout) {
        return Some(format!("sent no heartbeat for {} s", timeout.as_secs()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(8);

    fn running(w: PeerId, at: Instant) -> Phase {
        Phase::Running {
            worker: w,
            last_heard: at,
            disconnected_since: None,
        }
    }

    #[test]
    fn silence_after_acceptance_and_disconnection_past_the_grace_lose_the_worker() {
        let (w, t0) = (PeerId::random(), Instant::now());
        let mut p = running(w, t0);
        assert_eq!(lost(&mut p, true, t0 + Duration::from_secs(7), T), None);
        assert_eq!(
            lost(&mut p, true, t0 + T, T).as_deref(),
            Some("sent no heartbeat for 8 s")
        );
        // Not yet accepted: silence is not held against it.
        let mut p = Phase::Offered {
            worker: w,
            disconnected_since: None,
        };
        assert_eq!(lost(&mut p, true, t0 + 10 * T, T), None);
        // Disconnected: the grace starts at the first tick that sees it gone.
        let mut p = running(w, t0);
        assert_eq!(lost(&mut p, false, t0, T), None);
        assert!(matches!(p, Phase::Running { disconnected_since: Some(t), .. } if t == t0));
        assert_eq!(lost(&mut p, false, t0 + Duration::from_secs(1), T), None);
        assert_eq!(
            lost(&mut p, false, t0 + DISCONNECT_GRACE, T).as_deref(),
            Some("disconnected")
        );
        // Back in time: forgotten.
        let mut p = running(w, t0);
        assert_eq!(lost(&mut p, false, t0, T), None);
        assert_eq!(lost(&mut p, true, t0 + Duration::from_secs(1), T), None);
        assert_eq!(p, running(w, t0));
    }

    #[test]
    fn a_result_being_written_and_a_restart_grace_hold_every_verdict() {
        let (w, t0) = (PeerId::random(), Instant::now());
        let mut p = Phase::Finishing { worker: w };
        assert_eq!(lost(&mut p, false, t0 + 100 * T, T), None);
        let back = Phase::Reattaching {
            worker: w,
            until: t0 + Duration::from_secs(60),
            last_heard: t0,
        };
        let mut p = back;
        assert_eq!(lost(&mut p, false, t0 + Duration::from_secs(59), T), None);
        assert_eq!(p, back, "the grace does not start the disconnection clock");
        // A worker that did not report within the grace is lost at once: it has been silent all along.
        assert_eq!(
            lost(&mut p, true, t0 + Duration::from_secs(60), T).as_deref(),
            Some("sent no heartbeat for 8 s")
        );
        // One that reported within it is running, and is held to the running rules from then on.
        let mut p = back;
        assert_eq!(p.heard(w, t0 + Duration::from_secs(30)), Heard::Reattached);
        assert_eq!(p, running(w, t0 + Duration::from_secs(30)));
        assert_eq!(lost(&mut p, true, t0 + Duration::from_secs(37), T), None);
    }

    #[test]
    fn only_the_worker_holding_the_job_moves_its_phase() {
        let (w, other, t0) = (PeerId::random(), PeerId::random(), Instant::now());
        let mut p = Phase::Offered {
            worker: w,
            disconnected_since: None,
        };
        assert!(!p.accept(other, t0), "an answer from a device the job moved away from");
        assert_eq!(p.heard(other, t0), Heard::Stranger);
        assert!(p.accept(w, t0));
        assert_eq!(p, running(w, t0));
        assert_eq!(p.live_worker(), Some(w));
        // An update may overtake the acceptance: either order ends running.
        let mut q = Phase::Offered {
            worker: w,
            disconnected_since: None,
        };
        assert_eq!(q.heard(w, t0), Heard::Live);
        assert!(q.accept(w, t0));
        assert_eq!(q, running(w, t0));
        // Finishing: the worker is still named (the job view shows it), but no longer watched.
        let mut f = Phase::Finishing { worker: w };
        assert_eq!(f.heard(w, t0), Heard::Finishing);
        assert_eq!((f.worker(), f.live_worker()), (Some(w), None));
        assert!(!f.accept(w, t0));
        assert_eq!(Phase::Unplaced.worker(), None);
        assert_eq!(Phase::Unplaced.heard(w, t0), Heard::Stranger);
    }
}
