//! The job table (Mesh II): every job this node submitted or ran, with its state, where it ran, why that
//! device was chosen, and how it ended. Persisted in `<home>/jobs.json` (0600, written atomically by the
//! daemon's store actor after every change of state; progress is not in the table), so the history
//! survives daemon restarts. A job that was running when the daemon stopped
//! is marked failed with that reason on the next start: no job is ever silently lost.
use crate::fsutil::write_private;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    /// The name the JSON output uses.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Cancelled)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// 32 hex digits.
    pub id: String,
    /// "infer", "score" or "finetune".
    pub kind: String,
    /// Peer id of the submitter, and of the device that ran (or runs) it.
    pub submitter: String,
    pub executed_by: Option<String>,
    pub state: State,
    pub created_unix: u64,
    pub updated_unix: u64,
    /// Why this device was chosen: the scheduler's verdict on every candidate, best first.
    pub placement: Vec<String>,
    /// The reason of a failure or cancellation.
    pub reason: Option<String>,
    /// The local command's JSON result, once succeeded.
    pub result: Option<serde_json::Value>,
    /// Devices tried before (failover), oldest first.
    pub attempts: Vec<String>,
    /// Name of the device in `executed_by`, as the trust list knows it.
    #[serde(default)]
    pub executed_by_name: Option<String>,
    /// Where a fine-tune's adapter lands on the submitter.
    #[serde(default)]
    pub out: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct JobTable {
    pub jobs: Vec<Job>,
}

/// What a submitter needs to take its job up again after a restart: written to
/// `<home>/jobs/<id>/submission.bin` (bincode, 0600, atomically) before the job is placed, removed with
/// the job's directory when it succeeds. With the last checkpoint kept beside it
/// (`<home>/jobs/<id>/checkpoint/`), a restarted daemon re-attaches to the worker still running the job,
/// or places it again from that checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    pub job_id: [u8; 16],
    /// The job as it travels, dataset included.
    pub spec: bitnode_protocol::job::JobSpec,
    pub need: crate::schedule::Need,
    /// Where it may run: "auto", "local", or a peer id (pinned: no failover).
    pub target: String,
    /// Where a fine-tune's adapter lands.
    pub out: Option<PathBuf>,
}

/// The largest submission record read back (a dataset is at most `[jobs] max_dataset_bytes`, 16 MiB by
/// default; the rest is small).
const MAX_SUBMISSION: usize = 1 << 30;

impl Submission {
    pub fn path(home: &Path, id: &str) -> PathBuf {
        home.join("jobs").join(id).join("submission.bin")
    }

    pub fn encode(&self) -> anyhow::Result<Vec<u8>> {
        Ok(bitnode_protocol::wire::encode(self, MAX_SUBMISSION)?)
    }

    /// Reads the record of job `id`; None when there is none (a job submitted before this was kept).
    pub fn load(home: &Path, id: &str) -> anyhow::Result<Option<Submission>> {
        let p = Submission::path(home, id);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(
                bitnode_protocol::wire::decode(&b, MAX_SUBMISSION)
                    .with_context(|| format!("{} is corrupt", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
}

/// Jobs the table keeps; older finished ones are dropped.
pub const MAX_JOBS: usize = 1000;

pub fn path(home: &Path) -> PathBuf {
    home.join("jobs.json")
}

impl JobTable {
    /// Loads the table (empty when the file does not exist). Jobs left queued or running by a previous
    /// daemon end as failed, "the daemon stopped while the job was running", unless `resumable` says the
    /// daemon takes them up again (its own submissions with a record on disk). A corrupt file is an
    /// error, never silently replaced.
    pub fn load(home: &Path, now: u64, resumable: impl Fn(&Job) -> bool) -> anyhow::Result<JobTable> {
        let p = path(home);
        let mut t: JobTable = match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is corrupt; move it aside to start a new job history", p.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => JobTable::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        let mut changed = false;
        for j in &mut t.jobs {
            if !j.state.is_final() && !resumable(j) {
                j.state = State::Failed;
                j.reason = Some("the daemon stopped while the job was running".into());
                j.updated_unix = now;
                changed = true;
            }
        }
        if changed {
            t.save(home)?;
        }
        Ok(t)
    }

    pub fn save(&self, home: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        write_private(&path(home), &bytes)
    }

    /// The job whose id is `id` or starts with it (at least 4 digits, unique).
    pub fn find(&self, id: &str) -> anyhow::Result<&Job> {
        if id.len() < 4 {
            anyhow::bail!("give at least 4 digits of the job id");
        }
        let hits: Vec<&Job> = self.jobs.iter().filter(|j| j.id.starts_with(id)).collect();
        match hits.as_slice() {
            [j] => Ok(j),
            [] => anyhow::bail!("no job {id}"),
            _ => anyhow::bail!("{id} matches {} jobs; give more digits", hits.len()),
        }
    }

    /// The file's contents (the daemon hands them to its store actor, which writes them off the event loop).
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        Ok(serde_json::to_vec_pretty(self)?)
    }

    /// Applies `f` to job `id` (in memory; the caller persists the table).
    pub fn update(&mut self, id: &str, now: u64, f: impl FnOnce(&mut Job)) -> anyhow::Result<()> {
        let j = self
            .jobs
            .iter_mut()
            .find(|j| j.id == id)
            .with_context(|| format!("no job {id}"))?;
        f(j);
        j.updated_unix = now;
        Ok(())
    }

    /// Adds a job (in memory; the caller persists the table).
    pub fn insert(&mut self, job: Job) {
        self.jobs.push(job);
        // Bounded history: the oldest finished jobs go first.
        while self.jobs.len() > MAX_JOBS {
            match self.jobs.iter().position(|j| j.state.is_final()) {
                Some(i) => {
                    self.jobs.remove(i);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, state: State) -> Job {
        Job {
            id: id.into(),
            kind: "score".into(),
            submitter: "me".into(),
            executed_by: None,
            state,
            created_unix: 1,
            updated_unix: 1,
            placement: vec!["desktop: expected 1.00 s".into()],
            reason: None,
            result: None,
            attempts: vec![],
            executed_by_name: None,
            out: None,
        }
    }

    fn home(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bitnode-jobs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn history_survives_a_restart_and_running_jobs_end_failed_with_a_reason() {
        let h = home("restart");
        let mut t = JobTable::load(&h, 10, |_| false).expect("empty");
        t.insert(job("aaaa1111", State::Running));
        t.insert(job("bbbb2222", State::Queued));
        t.update("bbbb2222", 11, |j| {
            j.state = State::Succeeded;
            j.result = Some(serde_json::json!({"nll": 1.5}));
        })
        .expect("update");
        t.save(&h).expect("save");
        t.insert(job("cccc3333", State::Running));
        t.save(&h).expect("save");
        let t2 = JobTable::load(&h, 20, |j| j.id.starts_with("cccc")).expect("reload");
        assert_eq!(
            t2.find("cccc").expect("c").state,
            State::Running,
            "a resumable job stays live"
        );
        let a = t2.find("aaaa").expect("a");
        assert_eq!(a.state, State::Failed);
        assert!(a.reason.as_deref().unwrap_or("").contains("daemon stopped"));
        let b = t2.find("bbbb").expect("b");
        assert_eq!(
            (b.state, b.result.clone()),
            (State::Succeeded, Some(serde_json::json!({"nll": 1.5})))
        );
        assert!(t2.find("aa").is_err() && t2.find("dddd").is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path(&h)).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_corrupt_table_is_an_error_and_is_left_in_place() {
        let h = home("corrupt");
        std::fs::write(path(&h), b"{\"jobs\": [tru").expect("write");
        let e = JobTable::load(&h, 0, |_| false)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("corrupt"), "{e}");
        assert_eq!(std::fs::read(path(&h)).expect("still there"), b"{\"jobs\": [tru");
    }
}
