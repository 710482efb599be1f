//! Continuous batching (`bitnode_engine::batch`) against `session::generate`: every sequence of a batch,
//! joining and leaving at different steps, makes what it makes alone.
use bitnode_engine::batch::{Batcher, SeqEvent, SeqId, SeqRequest};
use bitnode_engine::cpu::SampleParams;
use bitnode_engine::session::{Engine, EngineOptions};
use bitnode_tests::tempdir;
use std::collections::HashMap;

fn tiny(adapter: &str, max_binding: Option<u64>) -> Engine {
    let dir = tempdir("batch-model");
    let p = bitnode_engine::synth::preset("tiny").unwrap();
    bitnode_engine::synth::synth(p, &dir, 11, bitnode_engine::synth::SynthFormat::Online).unwrap();
    let opts = EngineOptions {
        adapter: Some(adapter.into()),
        max_binding,
        ..Default::default()
    };
    Engine::load(&dir, &opts).unwrap()
}

fn greedy() -> SampleParams {
    SampleParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
    }
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + seed * 101 + 7) % 500 + 3).collect()
}

/// Requests of several lengths and settings: greedy and sampled, one with a repetition penalty, one that
/// runs into the context (the tiny model holds 256 positions).
fn requests(sampled: bool) -> Vec<SeqRequest> {
    let mut v = vec![];
    for (i, (n, max)) in [(5usize, 30usize), (120, 12), (1, 25), (40, 40), (230, 60), (17, 1)]
        .iter()
        .enumerate()
    {
        let params = if sampled && i % 2 == 1 {
            SampleParams {
                temperature: 0.9,
                top_k: 40,
                top_p: 0.9,
                repetition_penalty: 1.2,
            }
        } else {
            SampleParams {
                repetition_penalty: if i == 3 { 1.3 } else { 1.0 },
                ..greedy()
            }
        };
        v.push(SeqRequest {
            prompt: prompt(i as u32, *n),
            max_tokens: *max,
            params,
            seed: 1000 + i as u64,
            stop_at_eos: true,
        });
    }
    v
}

#[derive(Default, Debug)]
struct Out {
    streamed: Vec<u32>,
    done: Option<(Vec<u32>, &'static str)>,
    failed: Option<String>,
}

/// Joins the first `at_once` requests, then one more every other step, and runs the batch dry.
/// `cancel`: (request index, tokens after which it is cancelled).
fn run_batch(
    engine: &mut Engine,
    reqs: &[SeqRequest],
    max_seqs: usize,
    at_once: usize,
    cancel: Option<(usize, usize)>,
) -> (Vec<Out>, usize) {
    let mut b = Batcher::new(max_seqs);
    let mut ids: Vec<SeqId> = vec![];
    let mut outs: HashMap<SeqId, Out> = HashMap::new();
    let mut next = 0;
    while next < at_once.min(reqs.len()) {
        ids.push(b.join(reqs[next].clone()));
        next += 1;
    }
    let mut steps = 0;
    while !b.is_idle() || next < reqs.len() {
        if next < reqs.len() && steps % 2 == 1 {
            ids.push(b.join(reqs[next].clone()));
            next += 1;
        }
        let mut to_cancel = None;
        b.step(engine, &mut |id, ev| {
            let o = outs.entry(id).or_default();
            match ev {
                SeqEvent::Token(t) => {
                    o.streamed.push(t);
                    if let Some((ci, after)) = cancel {
                        if ids.get(ci) == Some(&id) && o.streamed.len() == after {
                            to_cancel = Some(id);
                        }
                    }
                }
                SeqEvent::Done(g) => o.done = Some((g.tokens, g.stop_reason)),
                SeqEvent::Failed(e) => o.failed = Some(e.to_string()),
            }
            true
        })
        .unwrap();
        if let Some(id) = to_cancel {
            b.cancel(id);
        }
        steps += 1;
        assert!(steps < 10_000, "the batch never drained");
    }
    let peak = b.peak();
    (ids.iter().map(|id| outs.remove(id).unwrap_or_default()).collect(), peak)
}

fn alone(engine: &mut Engine, r: &SeqRequest) -> (Vec<u32>, &'static str) {
    let g = engine
        .generate_ids(&r.prompt, r.max_tokens, &r.params, r.seed, r.stop_at_eos, &mut |_| true)
        .unwrap();
    (g.tokens, g.stop_reason)
}

#[test]
fn batched_sequences_equal_generate_on_the_cpu_reference() {
    let mut e = tiny("cpu", None);
    let reqs = requests(true);
    let (outs, peak) = run_batch(&mut e, &reqs, 3, 3, None);
    assert_eq!(peak, 3, "three sequences shared decode steps");
    let mut reasons = vec![];
    for (i, (r, o)) in reqs.iter().zip(&outs).enumerate() {
        let want = alone(&mut e, r);
        let (toks, why) = o
            .done
            .clone()
            .unwrap_or_else(|| panic!("request {i} never ended: {o:?}"));
        assert_eq!((&toks, why), (&want.0, want.1), "request {i}");
        assert_eq!(o.streamed, toks, "request {i}: streamed tokens are the result's");
        reasons.push(why);
    }
    assert!(
        reasons.contains(&"context"),
        "one request runs into the context: {reasons:?}"
    );
    assert!(reasons.contains(&"max_tokens"), "{reasons:?}");
}

#[test]
fn a_cancelled_sequence_leaves_and_the_rest_go_on() {
    let mut e = tiny("cpu", None);
    let reqs = requests(false);
    let (outs, _) = run_batch(&mut e, &reqs, 4, 4, Some((0, 4)));
    let (toks, why) = outs[0].done.clone().unwrap();
    assert_eq!(why, "stop");
    let full = alone(&mut e, &reqs[0]).0;
    assert!(
        toks.len() >= 4 && toks.len() < full.len(),
        "{} of {}",
        toks.len(),
        full.len()
    );
    assert_eq!(toks[..], full[..toks.len()]);
    for (i, (r, o)) in reqs.iter().zip(&outs).enumerate().skip(1) {
        assert_eq!(o.done.clone().map(|d| d.0), Some(alone(&mut e, r).0), "request {i}");
    }
}

#[test]
fn bad_requests_fail_alone() {
    let mut e = tiny("cpu", None);
    let mut reqs = requests(false);
    reqs.truncate(2);
    reqs.push(SeqRequest {
        prompt: prompt(9, 300),
        ..reqs[0].clone()
    });
    reqs.push(SeqRequest {
        prompt: vec![],
        ..reqs[0].clone()
    });
    reqs.push(SeqRequest {
        max_tokens: 0,
        ..reqs[0].clone()
    });
    let (outs, _) = run_batch(&mut e, &reqs, 4, 5, None);
    assert!(outs[2].failed.as_deref().unwrap_or("").contains("256"), "{:?}", outs[2]);
    assert!(outs[3].failed.is_some(), "{:?}", outs[3]);
    assert_eq!(outs[4].done, Some((vec![], "max_tokens")));
    for i in 0..2 {
        assert_eq!(outs[i].done.clone().map(|d| d.0), Some(alone(&mut e, &reqs[i]).0));
    }
}

/// On the WGSL kernels (lavapipe): a batch of greedy sequences makes what each makes alone on the same
/// device. 128 KiB bindings: prompts run in several chunks and two slots fit, so requests wait their turn.
#[test]
fn batched_greedy_equals_generate_on_the_gpu() {
    let mut e = tiny("gpu", Some(128 * 1024));
    let reqs = requests(false);
    let (outs, peak) = run_batch(&mut e, &reqs, 4, 4, None);
    assert_eq!(peak, 2, "two slots fit the bindings");
    for (i, (r, o)) in reqs.iter().zip(&outs).enumerate() {
        assert_eq!(o.done.clone(), Some(alone(&mut e, r)), "request {i}");
    }
    let mut e = tiny("gpu", None);
    let (outs, peak) = run_batch(&mut e, &reqs, 4, 4, None);
    assert_eq!(peak, 4);
    for (i, (r, o)) in reqs.iter().zip(&outs).enumerate() {
        assert_eq!(o.done.clone(), Some(alone(&mut e, r)), "request {i} (default bindings)");
    }
}
