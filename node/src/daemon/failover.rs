//! When a submitter takes a job away from its worker: the rules in one place, as a pure function of what
//! the submitter has observed and the clock, so a unit test can drive every case without sockets.
//!
//! - A worker that is disconnected for [`DISCONNECT_GRACE`] (or the heartbeat timeout, if shorter) is lost.
//! - A worker that accepted the job and then sent nothing for the heartbeat timeout is lost (before the
//!   acceptance a large job may still be in transit: the request's own timeout covers that).
//! - Neither applies while the result is being written here (the worker owes nothing more), nor, after
//!   this daemon restarted, until `[jobs] reattach_secs` have passed (the worker is given time to
//!   reconnect and report; its first update ends that grace).
//!
//! What happens next (another device, a pinned job failing, `max_attempts`) is `Daemon::attempt_failed`
//! and `Daemon::place`.
use std::time::{Duration, Instant};

/// A worker that is disconnected (rather than silent) is given this long to come back.
pub(super) const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

/// What the submitter knows of its job's worker at a tick.
#[derive(Debug, Clone, Copy)]
pub(super) struct Observed {
    pub connected: bool,
    pub accepted: bool,
    pub last_heard: Instant,
    pub reattach_until: Option<Instant>,
    pub finishing: bool,
}

/// Why the worker is lost now, or None. `disconnected_since` is the submitter's memory of when the worker
/// went away (kept up to date here).
pub(super) fn lost(
    o: Observed,
    disconnected_since: &mut Option<Instant>,
    now: Instant,
    timeout: Duration,
) -> Option<String> {
    if o.finishing || o.reattach_until.is_some_and(|t| now < t) {
        return None;
    }
    if o.connected {
        *disconnected_since = None;
    } else if disconnected_since.is_none() {
        *disconnected_since = Some(now);
    }
    if disconnected_since.is_some_and(|t| now - t >= DISCONNECT_GRACE.min(timeout)) {
        return Some("disconnected".into());
    }
    if o.accepted && now - o.last_heard >= timeout {
        return Some(format!("sent no heartbeat for {} s", timeout.as_secs()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(8);

    fn seen(at: Instant) -> Observed {
        Observed {
            connected: true,
            accepted: true,
            last_heard: at,
            reattach_until: None,
            finishing: false,
        }
    }

    #[test]
    fn silence_after_acceptance_and_disconnection_past_the_grace_lose_the_worker() {
        let t0 = Instant::now();
        let mut gone = None;
        assert_eq!(lost(seen(t0), &mut gone, t0 + Duration::from_secs(7), T), None);
        assert_eq!(
            lost(seen(t0), &mut gone, t0 + T, T).as_deref(),
            Some("sent no heartbeat for 8 s")
        );
        // Not yet accepted: silence is not held against it.
        let o = Observed {
            accepted: false,
            ..seen(t0)
        };
        assert_eq!(lost(o, &mut gone, t0 + 10 * T, T), None);
        // Disconnected: the grace starts at the first tick that sees it gone.
        let away = Observed {
            connected: false,
            ..seen(t0)
        };
        assert_eq!(lost(away, &mut gone, t0, T), None);
        assert_eq!(gone, Some(t0));
        assert_eq!(lost(away, &mut gone, t0 + Duration::from_secs(1), T), None);
        assert_eq!(
            lost(away, &mut gone, t0 + DISCONNECT_GRACE, T).as_deref(),
            Some("disconnected")
        );
        // Back in time: forgotten.
        let mut gone = Some(t0);
        assert_eq!(lost(seen(t0), &mut gone, t0 + Duration::from_secs(1), T), None);
        assert_eq!(gone, None);
    }

    #[test]
    fn a_result_being_written_and_a_restart_grace_hold_every_verdict() {
        let t0 = Instant::now();
        let mut gone = None;
        let away = Observed {
            connected: false,
            finishing: true,
            ..seen(t0)
        };
        assert_eq!(lost(away, &mut gone, t0 + 100 * T, T), None);
        let back = Observed {
            connected: false,
            reattach_until: Some(t0 + Duration::from_secs(60)),
            ..seen(t0)
        };
        assert_eq!(lost(back, &mut gone, t0 + Duration::from_secs(59), T), None);
        assert_eq!(gone, None, "the grace does not start the disconnection clock");
        // A worker that did not report within the grace is lost at once: it has been silent all along.
        assert_eq!(
            lost(back, &mut gone, t0 + Duration::from_secs(60), T).as_deref(),
            Some("sent no heartbeat for 8 s")
        );
        // One that had not even accepted: the disconnection clock starts when the grace ends.
        let mut gone = None;
        let unsure = Observed {
            accepted: false,
            ..back
        };
        assert_eq!(lost(unsure, &mut gone, t0 + Duration::from_secs(60), T), None);
        assert_eq!(
            lost(unsure, &mut gone, t0 + Duration::from_secs(62), T).as_deref(),
            Some("disconnected")
        );
    }
}
