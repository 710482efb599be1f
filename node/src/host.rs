//! `bitnode engine-host`: the long-lived process in which a device keeps its inference engines warm and
//! batches the generations that run on them.
//!
//! The daemon starts it on the first inference it runs and hands it jobs as job directories (the same
//! `job.json` that `bitnode job-exec` reads), each under a number of the daemon's choosing. Loading a model
//! (reading, converting and uploading its weights) is paid once per model, not per request. It is still a
//! process of its own, so a GPU fault cannot take the daemon down; the daemon starts a new one after a
//! crash.
//!
//! **Continuous batching.** Each warm engine has a [`Batcher`]: the jobs for one model decode together, one
//! token each per step, joining and leaving between steps (a joining job's prefill is a step of its own).
//! At most `--max-batch` decode together; more wait in arrival order. The loop takes every command that
//! has arrived, then steps each engine that has work once (round-robin, so two models share the device),
//! and again; with nothing to do it blocks on the next command. Loading a new model holds every batch up
//! for as long as the load takes.
//!
//! Protocol ([`HostIn`], [`HostOut`]), one JSON object per line:
//! - in: `{"run": "<job dir>", "id": N}` runs that job (an inference) as job N; `{"cancel": N}` ends job
//!   N's generation at the next step (stop reason "stop"; the engine stays loaded); `{"evict": true}` drops
//!   every engine that runs nothing (a fine-tune is about to need the memory);
//! - out: `{"id": N, "line": <ExecLine>}`: job N's events, then its `result` or `error`, then `end`, which
//!   closes job N; `{"warm_bytes": B}`: the warm engines now hold B bytes (after a load or an eviction),
//!   which the daemon takes off the memory it advertises.
//!
//! Engines are kept by (model, adapter), least recently used first out, within `--budget` bytes (a
//! model's size on disk stands for its device memory: the weights dominate), and dropped after
//! `--idle-secs` unused; an engine that runs a job is never dropped. With no engine left and nothing to do,
//! the process exits; the daemon starts it again when needed.
use crate::exec::{self, ExecLine, JobEvent, TextStream};
use bitnode_engine::batch::{Batcher, SeqEvent, SeqId, SeqRequest};
use bitnode_engine::session::{Engine, EngineOptions};
use bitnode_engine::tokenizer::Tokenizer;
use bitnode_protocol::job::JobSpec;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A line the daemon writes to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HostIn {
    /// Run the job laid out in directory `run` as job `id`.
    Run { run: PathBuf, id: u64 },
    /// End job `cancel`'s generation at the next step.
    Cancel { cancel: u64 },
    /// Drop every engine that runs nothing.
    Evict { evict: bool },
}

/// A line the host writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HostOut {
    /// One of job `id`'s lines; [`ExecLine::End`] is its last.
    Job { id: u64, line: ExecLine },
    /// The bytes the warm engines hold now.
    Warm { warm_bytes: u64 },
}

/// How the host runs (`bitnode engine-host`'s arguments).
#[derive(Debug, Clone)]
pub struct HostOptions {
    pub engine: EngineOptions,
    /// Bytes of models kept loaded at once.
    pub budget: u64,
    /// An engine unused this long is dropped.
    pub idle: Duration,
    /// Most sequences one engine decodes in a step (at least 1).
    pub max_batch: usize,
}

/// Runs the host on stdin and stdout until stdin closes (the daemon went away) or it has been idle with
/// nothing loaded.
pub fn run(opts: HostOptions) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<HostIn>();
    // A reader thread, so that commands wait in the channel while a step runs on this one.
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let Ok(m) = serde_json::from_str::<HostIn>(&line) else {
                eprintln!("engine host: ignoring a malformed line");
                continue;
            };
            if tx.send(m).is_err() {
                break;
            }
        }
    });
    serve(&rx, &mut std::io::stdout().lock(), &opts)
}

/// The host's loop over its commands (`rx`) and its output (`out`); returns when `rx` disconnects, when
/// it has been idle with no engine left, or when `out` fails (its reader went away).
pub fn serve(rx: &mpsc::Receiver<HostIn>, out: &mut dyn Write, opts: &HostOptions) -> anyhow::Result<()> {
    let mut host = Host {
        opts: opts.clone(),
        warm: vec![],
        reported_bytes: 0,
        delay: exec::test_step_delay(),
    };
    loop {
        if host.warm.iter().any(Warm::busy) {
            // Between steps: whatever has arrived joins (or cancels) before the next one.
            loop {
                match rx.try_recv() {
                    Ok(c) => host.command(c, out)?,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            host.step_all(out)?;
            host.drop_idle(out)?;
            continue;
        }
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(c) => host.command(c, out)?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                host.drop_idle(out)?;
                if host.warm.is_empty() {
                    // Idle with nothing loaded: the daemon starts a new host when it needs one.
                    return Ok(());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// One job's generation in a batch.
struct Seq {
    job: u64,
    stop: Vec<String>,
    stream: TextStream,
    /// Tokens so far.
    tokens: usize,
    /// The most sequences that decoded a token in one step with this one (itself included).
    batch: usize,
}

/// (model directory, adapter directory): what an engine is kept by.
type Key = (PathBuf, Option<PathBuf>);

struct Warm {
    key: Key,
    engine: Engine,
    /// A second copy of the model's tokenizer: a step holds the engine while it reports each sequence's
    /// token, and the token's text is decoded (and checked for stop strings) then, to end that sequence at
    /// once.
    tokenizer: Tokenizer,
    device: String,
    batcher: Batcher,
    seqs: HashMap<SeqId, Seq>,
    bytes: u64,
    used: Instant,
}

impl Warm {
    /// Runs or holds a sequence: it must be stepped, and must not be dropped.
    fn busy(&self) -> bool {
        !self.seqs.is_empty() || !self.batcher.is_idle()
    }
}

struct Host {
    opts: HostOptions,
    warm: Vec<Warm>,
    /// The warm bytes last written as a [`HostOut::Warm`] line.
    reported_bytes: u64,
    delay: Option<Duration>,
}

/// Writes one of job `id`'s lines.
fn emit(out: &mut dyn Write, id: u64, line: ExecLine) -> std::io::Result<()> {
    write_out(out, &HostOut::Job { id, line })
}

fn write_out(out: &mut dyn Write, o: &HostOut) -> std::io::Result<()> {
    // A HostOut is strings, numbers and a JSON value: it always encodes.
    let text = serde_json::to_string(o).map_err(std::io::Error::other)?;
    writeln!(out, "{text}")?;
    out.flush()
}

/// Ends job `id` with `reason`: its error line, then its end.
fn fail(out: &mut dyn Write, id: u64, reason: String) -> std::io::Result<()> {
    emit(out, id, ExecLine::Error { reason })?;
    emit(out, id, ExecLine::End)
}

impl Host {
    fn command(&mut self, c: HostIn, out: &mut dyn Write) -> anyhow::Result<()> {
        match c {
            HostIn::Run { run, id } => {
                if let Err(e) = self.admit(&run, id, out) {
                    fail(out, id, format!("{e:#}"))?;
                }
            }
            HostIn::Cancel { cancel } => {
                // A job that already ended has nothing left to cancel.
                for w in &mut self.warm {
                    if let Some(sid) = w.seqs.iter().find(|(_, s)| s.job == cancel).map(|(sid, _)| *sid) {
                        w.batcher.cancel(sid);
                    }
                }
            }
            HostIn::Evict { .. } => {
                self.warm.retain(Warm::busy);
                self.report_bytes(out)?;
            }
        }
        Ok(())
    }

    /// Reads job `id`'s file, finds (or loads) its engine and has the sequence join that engine's batch.
    fn admit(&mut self, dir: &Path, id: u64, out: &mut dyn Write) -> anyhow::Result<()> {
        if self.warm.iter().any(|w| w.seqs.values().any(|s| s.job == id)) {
            anyhow::bail!("job {id} already runs on this engine host");
        }
        let f = exec::read_exec_file(dir)?;
        let JobSpec::Infer(req) = &f.spec else {
            anyhow::bail!("an engine host runs inference only");
        };
        exec::validate(&f.spec)?;
        let i = self.engine_for((f.paths.model.clone(), f.paths.adapter.clone()), out)?;
        let w = &mut self.warm[i];
        w.used = Instant::now();
        let p = exec::prepare_infer(&w.engine, req, &w.key.0)?;
        let stream = TextStream::new(req, &p, w.engine.model.config.max_position_embeddings);
        let sid = w.batcher.join(SeqRequest {
            prompt: p.ids,
            max_tokens: p.max_tokens,
            params: p.params,
            seed: req.seed,
            stop_at_eos: true,
        });
        w.seqs.insert(
            sid,
            Seq {
                job: id,
                stop: req.stop.clone(),
                stream,
                tokens: 0,
                batch: 0,
            },
        );
        Ok(())
    }

    /// The index of the warm engine for `key`, loaded (after dropping what must go to fit the budget)
    /// if there is none.
    fn engine_for(&mut self, key: Key, out: &mut dyn Write) -> anyhow::Result<usize> {
        if let Some(i) = self.warm.iter().position(|w| w.key == key) {
            return Ok(i);
        }
        let bytes = dir_bytes(&key.0) + key.1.as_deref().map(dir_bytes).unwrap_or(0);
        let held: Vec<(u64, Instant, bool)> = self.warm.iter().map(|w| (w.bytes, w.used, w.busy())).collect();
        let mut gone = to_evict(&held, bytes, self.opts.budget);
        gone.sort_unstable();
        for i in gone.into_iter().rev() {
            let w = self.warm.remove(i);
            eprintln!("engine host: evicting {} to make room", w.key.0.display());
        }
        self.report_bytes(out)?;
        let t0 = Instant::now();
        let engine = exec::load_engine(&key.0, &key.1, &self.opts.engine)?;
        let tokenizer = Tokenizer::load(&key.0)?;
        eprintln!(
            "engine host: loaded {} in {:.2} s",
            key.0.display(),
            t0.elapsed().as_secs_f64()
        );
        self.warm.push(Warm {
            device: engine.backend.device_name(),
            key,
            engine,
            tokenizer,
            batcher: Batcher::new(self.opts.max_batch.max(1)),
            seqs: HashMap::new(),
            bytes,
            used: Instant::now(),
        });
        self.report_bytes(out)?;
        Ok(self.warm.len() - 1)
    }

    /// One step of every engine that has work, in turn. An engine that fails takes every job on it down
    /// with its reason, and is dropped (its state is unknown).
    fn step_all(&mut self, out: &mut dyn Write) -> anyhow::Result<()> {
        let mut broken = vec![];
        for i in 0..self.warm.len() {
            if !self.warm[i].busy() {
                continue;
            }
            if let Some(d) = self.delay {
                std::thread::sleep(d);
            }
            if let Err(e) = step(&mut self.warm[i], out)? {
                let w = &mut self.warm[i];
                eprintln!("engine host: the engine for {} failed: {e}", w.key.0.display());
                for s in std::mem::take(&mut w.seqs).into_values() {
                    fail(out, s.job, format!("the engine failed: {e}"))?;
                }
                broken.push(i);
            }
        }
        if !broken.is_empty() {
            for i in broken.into_iter().rev() {
                self.warm.remove(i);
            }
            self.report_bytes(out)?;
        }
        Ok(())
    }

    /// Drops the engines unused for `idle` that run nothing.
    fn drop_idle(&mut self, out: &mut dyn Write) -> anyhow::Result<()> {
        let idle = self.opts.idle;
        self.warm.retain(|w| w.busy() || w.used.elapsed() < idle);
        self.report_bytes(out)?;
        Ok(())
    }

    /// Writes the warm bytes when they changed since the last report.
    fn report_bytes(&mut self, out: &mut dyn Write) -> std::io::Result<()> {
        let b = self.warm.iter().map(|w| w.bytes).sum();
        if b != self.reported_bytes {
            self.reported_bytes = b;
            write_out(out, &HostOut::Warm { warm_bytes: b })?;
        }
        Ok(())
    }
}

/// One step of `w`'s batch: tokens go out as they come, and each sequence that ended has its result (or
/// error) and end written after the step, once the step's batch size is known. The outer error is the
/// output's (the daemon went away); the inner one the engine's.
fn step(w: &mut Warm, out: &mut dyn Write) -> std::io::Result<bitnode_engine::error::Result<()>> {
    w.used = Instant::now();
    let Warm {
        engine,
        tokenizer,
        batcher,
        seqs,
        device,
        ..
    } = w;
    let eos = engine.eos.clone();
    let mut made: Vec<SeqId> = vec![];
    let mut ended: Vec<(SeqId, SeqEvent)> = vec![];
    let mut io: Option<std::io::Error> = None;
    let res = batcher.step(engine, &mut |sid, ev| {
        let Some(s) = seqs.get_mut(&sid) else {
            // Not a sequence of this host's: end it.
            return false;
        };
        match ev {
            SeqEvent::Token(t) => {
                // Its first token comes from its own prefill; the next ones from decode steps.
                if s.tokens > 0 {
                    made.push(sid);
                }
                s.tokens += 1;
                let job = s.job;
                s.stream.push(t, tokenizer, &eos, &mut |e: JobEvent<'_>| {
                    if let Err(e) = emit(out, job, ExecLine::from_event(&e)) {
                        io.get_or_insert(e);
                    }
                })
            }
            other => {
                ended.push((sid, other));
                true
            }
        }
    });
    if let Some(e) = io {
        return Err(e);
    }
    // The sequences that decoded a token in this step decoded together.
    made.sort_unstable();
    made.dedup();
    for sid in &made {
        if let Some(s) = seqs.get_mut(sid) {
            s.batch = s.batch.max(made.len());
        }
    }
    for (sid, ev) in ended {
        let Some(s) = seqs.remove(&sid) else { continue };
        let line = match ev {
            SeqEvent::Done(g) => match exec::infer_result(g, tokenizer, &s.stop, device.clone(), Some(s.batch.max(1)))
                .and_then(|r| Ok(serde_json::to_value(r)?))
            {
                Ok(result) => ExecLine::Result { result },
                Err(e) => ExecLine::Error {
                    reason: format!("{e:#}"),
                },
            },
            SeqEvent::Failed(e) => ExecLine::Error { reason: e.to_string() },
            // Tokens never land here.
            SeqEvent::Token(_) => continue,
        };
        emit(out, s.job, line)?;
        emit(out, s.job, ExecLine::End)?;
    }
    Ok(res)
}

/// Which warm engines (indices into `held`: bytes, last use, busy) go so that a new one of `new` bytes fits
/// in `budget`: the least recently used first, only engines that run nothing, and no more than needed.
/// Where the busy ones alone leave no room, the new one loads anyway (a model larger than the budget still
/// runs, alone if it must).
fn to_evict(held: &[(u64, Instant, bool)], new: u64, budget: u64) -> Vec<usize> {
    let mut idle: Vec<usize> = (0..held.len()).filter(|&i| !held[i].2).collect();
    idle.sort_by_key(|&i| held[i].1);
    let mut total: u64 = held.iter().map(|h| h.0).sum();
    let mut gone = vec![];
    for i in idle {
        if total.saturating_add(new) <= budget {
            break;
        }
        total -= held[i].0;
        gone.push(i);
    }
    gone
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::tests::{cpu, infer_request as request, tiny};
    use crate::exec::{ExecFile, JobPaths};
    use bitnode_protocol::InferResult;

    #[test]
    fn eviction_takes_the_least_recently_used_idle_engines_only_as_needed() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // (bytes, used, busy)
        let held = [
            (40, at(3), false),
            (30, at(1), true),
            (20, at(2), false),
            (10, at(0), false),
        ];
        // Fits already: nothing goes.
        assert_eq!(to_evict(&held, 0, 100), Vec::<usize>::new());
        // 10 bytes short: the oldest idle engine (3) is enough.
        assert_eq!(to_evict(&held, 10, 100), vec![3]);
        // 25 short: 3, then 2 (1 is older, but busy).
        assert_eq!(to_evict(&held, 25, 100), vec![3, 2]);
        // Nothing fits beside the busy engine: every idle one goes, the busy one stays, the new one loads.
        assert_eq!(to_evict(&held, 1000, 100), vec![3, 2, 0]);
    }

    #[test]
    fn host_lines_keep_their_wire_shape() {
        let run: HostIn = serde_json::from_str(r#"{"run": "/w/j", "id": 7}"#).expect("run");
        assert_eq!(
            run,
            HostIn::Run {
                run: "/w/j".into(),
                id: 7
            }
        );
        let c: HostIn = serde_json::from_str(r#"{"cancel": 7}"#).expect("cancel");
        assert_eq!(c, HostIn::Cancel { cancel: 7 });
        let e: HostIn = serde_json::from_str(r#"{"evict": true}"#).expect("evict");
        assert_eq!(e, HostIn::Evict { evict: true });
        let line = HostOut::Job {
            id: 7,
            line: ExecLine::End,
        };
        let text = serde_json::to_string(&line).expect("encodes");
        assert_eq!(text, r#"{"id":7,"line":{"event":"end"}}"#);
        assert_eq!(serde_json::from_str::<HostOut>(&text).expect("decodes"), line);
        let warm: HostOut = serde_json::from_str(r#"{"warm_bytes": 12}"#).expect("warm");
        assert_eq!(warm, HostOut::Warm { warm_bytes: 12 });
    }

    /// Output lines, handed to the test as they are written.
    struct Lines(mpsc::Sender<HostOut>, Vec<u8>);

    impl Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.extend_from_slice(b);
            while let Some(n) = self.1.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.1.drain(..=n).collect();
                let o = serde_json::from_slice(&line).map_err(std::io::Error::other)?;
                self.0.send(o).map_err(std::io::Error::other)?;
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What each job of a host run wrote: its streamed text, its result (or error), and whether it ended.
    #[derive(Default, Debug)]
    struct Job {
        streamed: String,
        tokens: usize,
        result: Option<InferResult>,
        error: Option<String>,
        ended: bool,
    }

    #[test]
    fn concurrent_jobs_share_steps_and_each_equals_its_lone_run() {
        let model = tiny("host-batch");
        let root = model.parent().expect("the model's test directory").to_path_buf();
        let mut reqs = vec![
            request(&model, "The mesh of my own devices", 12),
            request(&model, "A phone, a laptop and a desktop", 9),
            request(&model, "Once upon a time", 16),
        ];
        reqs[2].messages = Some(vec![bitnode_protocol::ChatMessage {
            role: "user".into(),
            content: "Hi there".into(),
        }]);
        // A long one, cancelled after its first token.
        reqs.push(request(&model, "a long story", 200));
        let opts = HostOptions {
            engine: cpu(),
            budget: 1 << 40,
            idle: Duration::from_secs(600),
            max_batch: 16,
        };
        let dirs: Vec<PathBuf> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let d = root.join(format!("job{i}"));
                std::fs::create_dir_all(&d).expect("job dir");
                exec::write_exec_file(
                    &d,
                    &ExecFile {
                        spec: JobSpec::Infer(r.clone()),
                        paths: JobPaths::model(&model),
                    },
                )
                .expect("job file");
                d
            })
            .collect();

        let (cmd, rx) = mpsc::channel();
        let (otx, lines) = mpsc::channel();
        let o = opts.clone();
        let host = std::thread::spawn(move || serve(&rx, &mut Lines(otx, vec![]), &o));
        for (i, d) in dirs.iter().enumerate() {
            cmd.send(HostIn::Run {
                run: d.clone(),
                id: i as u64 + 1,
            })
            .expect("send");
        }
        // A job whose directory holds no job file fails alone.
        cmd.send(HostIn::Run {
            run: root.join("nothing"),
            id: 99,
        })
        .expect("send");
        let mut jobs: HashMap<u64, Job> = HashMap::new();
        let mut warm = vec![];
        let long = reqs.len() as u64;
        while jobs.values().filter(|j| j.ended).count() < reqs.len() + 1 {
            let o = lines.recv_timeout(Duration::from_secs(120)).expect("the host answers");
            let (id, line) = match o {
                HostOut::Warm { warm_bytes } => {
                    warm.push(warm_bytes);
                    continue;
                }
                HostOut::Job { id, line } => (id, line),
            };
            let j = jobs.entry(id).or_default();
            assert!(!j.ended, "job {id} wrote after its end: {line:?}");
            match line {
                ExecLine::Token { text, .. } => {
                    j.streamed.push_str(&text);
                    j.tokens += 1;
                    if id == long && j.tokens == 1 {
                        cmd.send(HostIn::Cancel { cancel: long }).expect("send");
                        // An engine that runs a job is not evicted.
                        cmd.send(HostIn::Evict { evict: true }).expect("send");
                    }
                }
                ExecLine::Result { result } => j.result = Some(serde_json::from_value(result).expect("a result")),
                ExecLine::Error { reason } => j.error = Some(reason),
                ExecLine::End => j.ended = true,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            jobs[&99].error.as_deref().is_some_and(|e| e.contains("job.json")),
            "{:?}",
            jobs[&99]
        );
        let cancelled = jobs[&long].result.as_ref().expect("the cancelled job's result");
        assert_eq!(cancelled.stop_reason, "stop");
        assert!(cancelled.tokens.len() < 200);
        assert!(warm.first().is_some_and(|&b| b > 0), "{warm:?}");
        assert!(!warm.contains(&0), "the busy engine was evicted: {warm:?}");

        // Each equals the same request run alone; together they decoded in shared steps.
        let mut engine = exec::load_engine(&model, &None, &opts.engine).expect("engine");
        let mut most = 0;
        for (i, r) in reqs.iter().enumerate().take(3) {
            let j = &jobs[&(i as u64 + 1)];
            let got = j.result.as_ref().unwrap_or_else(|| panic!("job {i}: {j:?}"));
            let alone = exec::infer_on(&mut engine, r, &model, &mut |_| {}).expect("alone");
            assert_eq!(got.tokens, alone.tokens, "job {i}");
            assert_eq!(got.text, alone.text, "job {i}");
            assert_eq!(got.stop_reason, alone.stop_reason, "job {i}");
            assert_eq!(j.streamed, got.text, "job {i}: the streamed pieces add up to the text");
            assert_eq!(j.tokens, got.tokens.len(), "job {i}: one token line per token");
            assert_eq!(alone.batch, None);
            most = most.max(got.batch.unwrap_or(0));
        }
        assert!(most >= 3, "the jobs never decoded together (largest batch {most})");

        // Idle now: an eviction drops the engine, and the host ends when its input does.
        cmd.send(HostIn::Evict { evict: true }).expect("send");
        assert_eq!(
            lines.recv_timeout(Duration::from_secs(30)).expect("warm line"),
            HostOut::Warm { warm_bytes: 0 }
        );
        drop(cmd);
        host.join().expect("the host thread").expect("the host ends cleanly");
    }
}
