//! Continuous batching: many sequences of one model share decode steps.
//!
//! A [`Batcher`] keeps up to `max_seqs` sequences in KV cache slots of the backend. Each [`Batcher::step`]
//! either prefills one joining sequence (its prompt in chunks, as `session::generate` does) or runs one
//! decode step over every running sequence at once: a batched ternary GEMM over the active rows, each row
//! attending to its own slot. Sequences join and leave between steps.
//!
//! Every sequence reproduces `session::generate` for the same request: the same random draws in the same
//! order (one for the prompt's last chunk, one per decode step), the same stop rules and stop reasons. On
//! the CPU reference the tokens are the same bits (each row's arithmetic does not depend on the others);
//! on a GPU the batched kernels sum in another order than the single-sequence ones, so greedy output can
//! differ where two logits nearly tie.
//!
//! Choices:
//! - A sequence that arrives while others decode waits for the current step, then its prefill runs alone
//!   (the others pause for it): prefill is short next to a generation, and joining at once keeps the time
//!   to first token low.
//! - Slots hold `positions` each, sized to the longest request seen (rounded up to 256) when the batch is
//!   empty. A request longer than the slots waits until the running ones end, then the caches grow; in
//!   arrival order, so it is not starved.
//! - While the batch does not change, the next decode step is queued before the last one is read (the
//!   rows feed their picks back on the device), as the single-sequence decode does.
use crate::backend::SlotRow;
use crate::cpu::SampleParams;
use crate::error::{EngineError, Result};
use crate::rng::Rng;
use crate::session::{Engine, Generation};
use std::collections::VecDeque;
use std::time::Instant;

pub type SeqId = u64;

/// One request: token ids (already templated and encoded) and how to sample.
#[derive(Debug, Clone)]
pub struct SeqRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SampleParams,
    pub seed: u64,
    pub stop_at_eos: bool,
}

pub enum SeqEvent {
    /// A new token; the callback returns false to end this sequence (stop reason "stop").
    Token(u32),
    /// The sequence ended, with what `session::generate` returns for the same request.
    Done(Generation),
    /// The sequence could not run (the prompt is empty or too long); the batch goes on.
    Failed(EngineError),
}

struct Seq {
    id: SeqId,
    slot: usize,
    req: SeqRequest,
    rng: Rng,
    /// Decode steps it may still take after the first token.
    steps_left: usize,
    out: Vec<u32>,
    prefill_seconds: f64,
    decode_start: Instant,
    cancelled: bool,
}

impl Seq {
    /// Position of the token it feeds next.
    fn pos(&self) -> usize {
        self.req.prompt.len() + self.out.len() - 1
    }
}

pub struct Batcher {
    max_seqs: usize,
    next_id: SeqId,
    waiting: VecDeque<(SeqId, SeqRequest)>,
    /// Running sequences, in row order.
    running: Vec<Seq>,
    /// Slots granted by the backend and positions per slot (0 before the first sequence).
    slots: usize,
    cap: usize,
    /// Decode steps queued on the backend and not yet read (0, 1 or 2), all over `running` as it is.
    inflight: usize,
    peak: usize,
    cancels: Vec<SeqId>,
}

impl Batcher {
    /// At most `max_seqs` sequences decode together; more wait in arrival order.
    pub fn new(max_seqs: usize) -> Batcher {
        Batcher {
            max_seqs: max_seqs.max(1),
            next_id: 1,
            waiting: VecDeque::new(),
            running: vec![],
            slots: 0,
            cap: 0,
            inflight: 0,
            peak: 0,
            cancels: vec![],
        }
    }

    /// Queues a sequence; it joins at a following step.
    pub fn join(&mut self, req: SeqRequest) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back((id, req));
        id
    }

    /// Ends a sequence at the next step (stop reason "stop"); its `Done` still comes. A sequence still
    /// waiting ends without running.
    pub fn cancel(&mut self, id: SeqId) {
        self.cancels.push(id);
    }

    /// Nothing queued or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.cancels.is_empty()
    }

    /// Sequences running or waiting.
    pub fn len(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequences running now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Most sequences that ran in one decode step so far.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// One step: a joining sequence's prefill, or one decode step of every running sequence. Events come
    /// through `on`; it returns false on a `Token` to end that sequence. An `Err` means the engine failed:
    /// every sequence in it is lost (the caller reports each), and the batcher is empty afterwards.
    pub fn step(&mut self, engine: &mut Engine, on: &mut dyn FnMut(SeqId, SeqEvent) -> bool) -> Result<()> {
        let r = self.step_inner(engine, on);
        if r.is_err() {
            self.waiting.clear();
            self.running.clear();
            self.inflight = 0;
            self.cancels.clear();
        }
        r
    }

    /// The ids of every sequence running or waiting (to report them when the engine fails).
    pub fn ids(&self) -> Vec<SeqId> {
        self.running
            .iter()
            .map(|s| s.id)
            .chain(self.waiting.iter().map(|w| w.0))
            .collect()
    }

    fn step_inner(&mut self, engine: &mut Engine, on: &mut dyn FnMut(SeqId, SeqEvent) -> bool) -> Result<()> {
        if !self.cancels.is_empty() {
            self.drain(engine, on)?;
            for id in std::mem::take(&mut self.cancels) {
                if let Some(i) = self.waiting.iter().position(|w| w.0 == id) {
                    if let Some((id, req)) = self.waiting.remove(i) {
                        on(id, SeqEvent::Done(empty(&req, "stop")));
                    }
                } else if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
                    s.cancelled = true;
                }
            }
            self.retire(on);
        }
        if self.admissible(engine) {
            self.drain(engine, on)?;
            if let Some((id, req)) = self.waiting.pop_front() {
                self.prefill(engine, id, req, on)?;
            }
            return Ok(());
        }
        if self.running.is_empty() {
            return Ok(());
        }
        self.decode(engine, on)
    }

    /// Whether the next waiting sequence can start now (a free slot, caches large enough or resizable).
    fn admissible(&self, engine: &Engine) -> bool {
        let Some((_, req)) = self.waiting.front() else {
            return false;
        };
        if self.running.is_empty() {
            return true;
        }
        let need = needed_positions(req, engine.model.config.max_position_embeddings);
        self.running.len() < self.slots.min(self.max_seqs) && need <= self.cap
    }

    /// Reads every queued decode step, delivering its tokens (then the batch may change).
    fn drain(&mut self, engine: &mut Engine, on: &mut dyn FnMut(SeqId, SeqEvent) -> bool) -> Result<()> {
        while self.inflight > 0 {
            self.collect(engine, on)?;
        }
        Ok(())
    }

    fn prefill(
        &mut self,
        engine: &mut Engine,
        id: SeqId,
        req: SeqRequest,
        on: &mut dyn FnMut(SeqId, SeqEvent) -> bool,
    ) -> Result<()> {
        let ctx = engine.model.config.max_position_embeddings;
        if req.prompt.is_empty() {
            on(
                id,
                SeqEvent::Failed(EngineError::Invalid("the prompt encodes to no tokens".into())),
            );
            return Ok(());
        }
        if req.prompt.len() >= ctx {
            let e = EngineError::PromptTooLong {
                tokens: req.prompt.len(),
                context: ctx,
                reserve: 1,
            };
            on(id, SeqEvent::Failed(e));
            return Ok(());
        }
        if req.max_tokens == 0 {
            on(id, SeqEvent::Done(empty(&req, "max_tokens")));
            return Ok(());
        }
        let positions = needed_positions(&req, ctx);
        if self.running.is_empty() && (positions > self.cap || self.slots == 0) {
            // Grow the caches (only when empty: growing drops their contents).
            let cap = positions.div_ceil(256) * 256;
            let cap = cap.max(self.cap).min(ctx.max(positions));
            self.slots = engine.backend.begin_slots(self.max_seqs, cap)?;
            self.cap = cap;
            if self.slots == 0 {
                return Err(EngineError::Invalid("the backend granted no batch slots".into()));
            }
        }
        let used: Vec<usize> = self.running.iter().map(|s| s.slot).collect();
        let slot = (0..self.slots)
            .find(|s| !used.contains(s))
            .ok_or_else(|| EngineError::Invalid("no free batch slot".into()))?;
        let mut rng = Rng::new(req.seed);
        let t0 = Instant::now();
        engine.backend.reset_slot(slot, &req.prompt)?;
        let chunk = engine.backend.max_chunk().max(1);
        let mut first = None;
        let n = req.prompt.len();
        let mut start = 0;
        while start < n {
            let end = (start + chunk).min(n);
            let sample = (end == n).then(|| (req.params, rng.uniform()));
            first = engine
                .backend
                .forward_slot(slot, &req.prompt[start..end], start, sample)?;
            start = end;
        }
        let first = first.ok_or_else(|| EngineError::Invalid("the prefill sampled no token".into()))?;
        let mut s = Seq {
            id,
            slot,
            steps_left: (req.max_tokens - 1).min(positions - n),
            req,
            rng,
            out: vec![first],
            prefill_seconds: t0.elapsed().as_secs_f64(),
            decode_start: Instant::now(),
            cancelled: false,
        };
        let go = on(id, SeqEvent::Token(first));
        match finished(&s, &engine.eos, first, go) {
            Some(reason) => {
                on(id, SeqEvent::Done(generation(&mut s, reason)));
            }
            None => self.running.push(s),
        }
        Ok(())
    }

    fn decode(&mut self, engine: &mut Engine, on: &mut dyn FnMut(SeqId, SeqEvent) -> bool) -> Result<()> {
        if self.inflight == 0 {
            let rows = self.rows(0);
            engine.backend.decode_rows_submit(&rows, false)?;
            self.inflight = 1;
            self.peak = self.peak.max(rows.len());
        }
        // Queue the next step before reading this one, when it will surely run on the same rows: nobody is
        // waiting to join and every row has a step left after this one.
        if self.inflight == 1 && self.waiting.is_empty() && self.running.iter().all(|s| s.steps_left >= 2) {
            let rows = self.rows(1);
            engine.backend.decode_rows_submit(&rows, true)?;
            self.inflight = 2;
        }
        self.collect(engine, on)
    }

    /// The rows of the step `ahead` steps after the oldest queued one (each draws its uniform now, in the
    /// order `generate` draws them).
    fn rows(&mut self, ahead: usize) -> Vec<SlotRow> {
        self.running
            .iter_mut()
            .map(|s| SlotRow {
                slot: s.slot,
                pos: s.pos() + ahead,
                token: s.out[s.out.len() - 1],
                params: s.req.params,
                u: s.rng.uniform(),
            })
            .collect()
    }

    /// Reads the oldest queued step and hands each row's token to its sequence; sequences that end leave
    /// the batch, and a step queued behind this one is read first, for the rows that go on.
    fn collect(&mut self, engine: &mut Engine, on: &mut dyn FnMut(SeqId, SeqEvent) -> bool) -> Result<()> {
        let mut ended = vec![false; self.running.len()];
        let mut first = true;
        while first || (self.inflight > 0 && ended.iter().any(|e| *e)) {
            first = false;
            let toks = engine.backend.decode_rows_wait()?;
            self.inflight -= 1;
            if toks.len() != self.running.len() {
                return Err(EngineError::Invalid(format!(
                    "a decode step returned {} tokens for {} rows",
                    toks.len(),
                    self.running.len()
                )));
            }
            for ((s, &t), e) in self.running.iter_mut().zip(&toks).zip(ended.iter_mut()) {
                if !*e {
                    *e = take(s, t, &engine.eos, on);
                }
            }
        }
        let mut it = ended.into_iter();
        self.running.retain(|_| !it.next().unwrap_or(false));
        Ok(())
    }

    /// Ends the sequences flagged cancelled (no step is in flight).
    fn retire(&mut self, on: &mut dyn FnMut(SeqId, SeqEvent) -> bool) {
        let mut out = vec![];
        for mut s in std::mem::take(&mut self.running) {
            if s.cancelled {
                on(s.id, SeqEvent::Done(generation(&mut s, "stop")));
            } else {
                out.push(s);
            }
        }
        self.running = out;
    }
}

/// Positions a request needs: its prompt and every token it may make, within the context.
fn needed_positions(req: &SeqRequest, ctx: usize) -> usize {
    (req.prompt.len() + req.max_tokens).min(ctx)
}

/// A decode step's token `t` for `s`: reports it, and its end if it ends there (true).
fn take(s: &mut Seq, t: u32, eos: &[u32], on: &mut dyn FnMut(SeqId, SeqEvent) -> bool) -> bool {
    s.out.push(t);
    s.steps_left = s.steps_left.saturating_sub(1);
    let go = on(s.id, SeqEvent::Token(t));
    match finished(s, eos, t, go) {
        Some(reason) => {
            on(s.id, SeqEvent::Done(generation(s, reason)));
            true
        }
        None => false,
    }
}

/// Why a sequence ends after taking token `t` (None: it goes on), by `generate`'s rules in its order.
fn finished(s: &Seq, eos: &[u32], t: u32, go: bool) -> Option<&'static str> {
    if !go || s.cancelled {
        Some("stop")
    } else if s.req.stop_at_eos && eos.contains(&t) {
        Some("eos")
    } else if s.out.len() >= s.req.max_tokens {
        Some("max_tokens")
    } else if s.steps_left == 0 {
        Some("context")
    } else {
        None
    }
}

fn generation(s: &mut Seq, reason: &'static str) -> Generation {
    Generation {
        tokens: std::mem::take(&mut s.out),
        prompt_tokens: s.req.prompt.len(),
        prefill_seconds: s.prefill_seconds,
        decode_seconds: s.decode_start.elapsed().as_secs_f64(),
        stop_reason: reason,
    }
}

fn empty(req: &SeqRequest, reason: &'static str) -> Generation {
    Generation {
        tokens: vec![],
        prompt_tokens: req.prompt.len(),
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        stop_reason: reason,
    }
}
