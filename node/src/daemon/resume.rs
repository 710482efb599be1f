//! Taking up, at start, the jobs this node submitted before it stopped (their records are on disk): a
//! job whose worker was another device waits for that worker to report back (`[jobs] reattach_secs`);
//! one that ran here, or whose worker is gone, is placed again from its last checkpoint.
use super::failover::Phase;
use super::*;
#[allow(unused_imports)]
use super::{jobs::*, submitter::*};

impl JobManager {
    /// At start: takes up the jobs this node submitted that had not ended when its daemon last stopped
    /// (a crash, a kill, a phone that closed the app). A job some peer was running is left to that peer,
    /// which kept running it: the worker gets `[jobs] reattach_secs` to reconnect and report before it is
    /// held to the usual heartbeat rules (and replaced from the last checkpoint kept here). A job that ran
    /// here, or was still being placed, is placed again at once, a fine-tune from its last checkpoint.
    /// Runs before the event loop, so its reads from disk block nothing.
    pub(super) fn resume_submissions(&mut self) {
        let me = self.me.to_base58();
        let live: Vec<Job> = self
            .work
            .table
            .jobs
            .iter()
            .filter(|j| !j.state.is_final() && j.submitter == me)
            .cloned()
            .collect();
        let now = Instant::now();
        let grace = Duration::from_secs(self.cfg.jobs.reattach_secs);
        for j in live {
            let rec = match crate::jobs::Submission::load(&self.home, &j.id) {
                Ok(Some(r)) if hex(&r.job_id) == j.id => r,
                Ok(_) => {
                    self.end_unresumable(&j.id, "the daemon stopped while the job was running".into());
                    continue;
                }
                Err(e) => {
                    self.end_unresumable(
                        &j.id,
                        format!("the daemon stopped, and the job's record is unreadable: {e:#}"),
                    );
                    continue;
                }
            };
            let target = match rec.target.parse::<Target>() {
                Ok(t) => t,
                Err(e) => {
                    self.end_unresumable(&j.id, format!("the job's record is unreadable: {e}"));
                    continue;
                }
            };
            let ckpt_dir = self.home.join("jobs").join(&j.id).join("checkpoint");
            let checkpoint = if ckpt_dir.is_dir() {
                match read_checkpoint(&ckpt_dir, self.cfg.jobs.max_checkpoint_bytes) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(job = %j.id, "the last checkpoint is unusable, starting over: {e}");
                        None
                    }
                }
            } else {
                None
            };
            let worker = j
                .executed_by
                .as_deref()
                .and_then(|w| w.parse::<PeerId>().ok())
                .filter(|w| *w != self.me);
            tracing::info!(
                job = %j.id,
                worker = worker.map(|w| w.to_base58()).unwrap_or_else(|| "this device".into()),
                checkpoint_step = checkpoint.as_ref().map(|(s, _)| *s),
                "taking up a job submitted before the restart"
            );
            // Recorded jobs name models this device held, or ones a peer advertised; a failover of the
            // latter may only go to another device that holds them.
            let absent = match absent_inputs(&self.work.store, &rec.spec) {
                Ok(a) => a,
                Err(e) => {
                    self.end_unresumable(&j.id, format!("the job's record names no valid model: {e:#}"));
                    continue;
                }
            };
            let sub = Sub {
                job_id: rec.job_id,
                spec: rec.spec,
                need: rec.need,
                target,
                out: rec.out,
                absent,
                // The worker that held it is given time to reconnect and report.
                phase: match worker {
                    Some(w) => Phase::Reattaching {
                        worker: w,
                        until: now + grace,
                        last_heard: now,
                    },
                    None => Phase::Unplaced,
                },
                tried: worker.into_iter().collect(),
                attempt: j.attempts.len() as u32,
                checkpoint,
                progress: None,
                watchers: vec![],
                cancel_on_disconnect: false,
                finals: vec![],
            };
            self.work.subs.insert(j.id.clone(), sub);
            if worker.is_none() {
                self.update_job(&j.id, |x| x.state = State::Queued);
                self.place(&j.id, Some("this device restarted".into()));
            }
        }
    }

    /// A job left live by the last daemon that cannot be taken up: it ends failed, with the reason.
    pub(super) fn end_unresumable(&mut self, id: &str, reason: String) {
        self.update_job(id, |j| {
            j.state = State::Failed;
            j.reason = Some(reason);
        });
    }
}
