//! Every WGSL kernel against its CPU twin on random inputs, through the same launchers the model uses.
use bitnode_engine::cpu::{self, SampleParams};
use bitnode_engine::gpu::kernels::{self as k, Step};
use bitnode_engine::model::Model;
use bitnode_engine::rng::Rng;
use bitnode_tests::{gpu, gpu_paths, max_rel_diff, randn, random_linear, tempdir};
use std::sync::Arc;

fn f32s(b: &[u8]) -> Vec<f32> {
    bytemuck::cast_slice(b).to_vec()
}

fn step_buf(g: &bitnode_engine::gpu::Gpu, s: Step) -> wgpu::Buffer {
    g.uniform("step", bytemuck::bytes_of(&s))
}

fn pack_q(q: &[i8]) -> Vec<u32> {
    q.chunks(4)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u32, |w, (i, v)| w | ((*v as u8 as u32) << (8 * i)))
        })
        .collect()
}

/// What matmul_ternary's `mode` makes of the projections y1 (and y2, the up rows in modes 2 and 3) on top
/// of `y`.
fn mode_want(mode: u32, y: &[f32], y1: &[f32], y2: &[f32]) -> Vec<f32> {
    let mut h = vec![0f32; y1.len()];
    match mode {
        0 => y1.to_vec(),
        1 => y.iter().zip(y1).map(|(a, b)| a + b).collect(),
        2 => {
            cpu::relu2_mul(&mut h, y1, y2);
            h
        }
        _ => {
            cpu::silu_mul(&mut h, y1, y2);
            h
        }
    }
}

fn tiny_model() -> Arc<Model> {
    let dir = tempdir("kernel-model");
    let p = bitnode_engine::synth::preset("tiny").unwrap();
    bitnode_engine::synth::synth(p, &dir, 3, bitnode_engine::synth::SynthFormat::Online).unwrap();
    Arc::new(Model::load(&dir).unwrap())
}

/// On both reduction paths (subgroups where the adapter has them, and the fallback).
#[test]
fn rmsnorm_quant_matches_cpu() {
    for g in gpu_paths(None) {
        rmsnorm_quant_matches_cpu_on(&g);
    }
}

fn rmsnorm_quant_matches_cpu_on(g: &bitnode_engine::gpu::Gpu) {
    let sg = g.subgroups();
    let mut rng = Rng::new(1);
    for &(t, c) in &[(1usize, 128usize), (5, 352), (3, 2560)] {
        let x = randn(&mut rng, t * c, 2.0);
        let w: Vec<f32> = (0..c).map(|_| 0.5 + rng.uniform()).collect();
        let step = step_buf(
            g,
            Step {
                t: t as u32,
                ..Default::default()
            },
        );
        let (xb, wb) = (
            g.storage_init("x", bytemuck::cast_slice(&x)).unwrap(),
            g.storage_init("w", bytemuck::cast_slice(&w)).unwrap(),
        );
        let (qb, sb, sumb, yb) = (
            g.storage("q", (t * c) as u64).unwrap(),
            g.storage("s", 4 * t as u64).unwrap(),
            g.storage("qs", 4 * t as u64).unwrap(),
            g.storage("y", (4 * t * c) as u64).unwrap(),
        );
        let op = k::rmsnorm_quant(g, c, 1e-5, &wb, &xb, &qb, &sb, &sumb, &step);
        let op2 = k::rmsnorm(g, c, 1e-5, &wb, &xb, &yb, &step);
        k::run(g, &[&op, &op2], t as u32, 0);
        let gq: Vec<i8> = g
            .download(&qb, (t * c) as u64)
            .unwrap()
            .iter()
            .map(|b| *b as i8)
            .collect();
        let gs = f32s(&g.download(&sb, 4 * t as u64).unwrap());
        let gsum: Vec<i32> = bytemuck::cast_slice(&g.download(&sumb, 4 * t as u64).unwrap()).to_vec();
        let gy = f32s(&g.download(&yb, (4 * t * c) as u64).unwrap());
        let (mut cq, mut cs, mut cy) = (vec![0i8; t * c], vec![0f32; t], vec![0f32; t * c]);
        cpu::rmsnorm_quant(&mut cq, &mut cs, &x, &w, 1e-5, t, c);
        cpu::rmsnorm(&mut cy, &x, &w, 1e-5, t, c);
        let (d, i) = max_rel_diff(&gy, &cy);
        assert!(d < 1e-5, "rmsnorm T={t} C={c} subgroups {sg}: diff {d} at {i}");
        let (d, i) = max_rel_diff(&gs, &cs);
        assert!(d < 1e-5, "scale T={t} C={c} subgroups {sg}: diff {d} at {i}");
        // A different summation order may move a value that sits on a rounding boundary by one step.
        let off: Vec<usize> = (0..t * c).filter(|&i| gq[i] != cq[i]).collect();
        assert!(
            off.len() * 200 <= t * c,
            "T={t} C={c} subgroups {sg}: {} of {} quantized values differ",
            off.len(),
            t * c
        );
        for &i in &off {
            assert!(
                (gq[i] as i32 - cq[i] as i32).abs() <= 1,
                "q[{i}]: gpu {} cpu {}",
                gq[i],
                cq[i]
            );
        }
        for ti in 0..t {
            assert_eq!(
                gsum[ti],
                gq[ti * c..(ti + 1) * c].iter().map(|v| *v as i32).sum::<i32>(),
                "qsum of token {ti}"
            );
        }
    }
}

#[test]
fn matmul_ternary_matches_cpu_in_every_mode_and_tiling() {
    let mut rng = Rng::new(2);
    // 8 KiB bindings split these weights into several tiles.
    for limit in [None, Some(8192u64)] {
        let g = gpu(limit);
        for &(t, o, i) in &[
            (1usize, 96usize, 128usize),
            (6, 160, 352),
            (3, 64, 2560),
            (70, 100, 352),
            // A full 16-token tile (a batched decode step of 16) and one ending inside its last group.
            (16, 96, 128),
            (13, 40, 352),
            // More than one 128 x 128 tile of the tiled kernel each way, with ragged edges.
            (150, 200, 352),
        ] {
            if limit.is_some() && 4 * t * o.max(i) > 8192 {
                continue; // the activations themselves would exceed the forced limit
            }
            let w = random_linear(&mut rng, o, i);
            let w2 = random_linear(&mut rng, o, i);
            let q: Vec<i8> = (0..t * i).map(|_| (rng.next_u64() % 256) as u8 as i8).collect();
            let s: Vec<f32> = (0..t).map(|_| 10.0 + 100.0 * rng.uniform()).collect();
            let qsum: Vec<i32> = (0..t)
                .map(|ti| q[ti * i..(ti + 1) * i].iter().map(|v| *v as i32).sum())
                .collect();
            let step = step_buf(
                &g,
                Step {
                    t: t as u32,
                    ..Default::default()
                },
            );
            let qb = g.storage_init("q", bytemuck::cast_slice(&pack_q(&q))).unwrap();
            let sb = g.storage_init("s", bytemuck::cast_slice(&s)).unwrap();
            let sumb = g.storage_init("qsum", bytemuck::cast_slice(&qsum)).unwrap();
            let mut y1 = vec![0f32; t * o];
            let mut y2 = vec![0f32; t * o];
            cpu::matmul_ternary(&mut y1, &q, &s, &w, t);
            cpu::matmul_ternary(&mut y2, &q, &s, &w2, t);
            // mode 0: store
            let tiles = k::ternary_tiles(&g, &[&w], false).unwrap();
            if limit.is_some() && i * o / 4 > 8192 {
                assert!(tiles.len() > 1, "expected tiling for {o}x{i}");
            }
            let yb = g.storage("y", (4 * t * o) as u64).unwrap();
            let ops: Vec<_> = tiles
                .iter()
                .map(|tl| k::matmul_ternary(&g, tl, 0, 0, o, &qb, &sb, &sumb, &yb, &step))
                .collect();
            k::run(&g, &ops.iter().collect::<Vec<_>>(), t as u32, 0);
            let gy = f32s(&g.download(&yb, (4 * t * o) as u64).unwrap());
            let (d, at) = max_rel_diff(&gy, &y1);
            assert!(d < 1e-6, "store {t}x{o}x{i}: diff {d} at {at}");
            // The tiled kernel (training) gives the same bits in both of its modes.
            let base = randn(&mut rng, t * o, 1.0);
            for (mode, tm) in [(0u32, 128), (1, 64), (0, 64)] {
                let yt = g.storage_init("yt", bytemuck::cast_slice(&base)).unwrap();
                let ops: Vec<_> = tiles
                    .iter()
                    .map(|tl| k::matmul_ternary_tiled(&g, tl, mode, 0, o, &qb, &sb, &sumb, &yt, &step, tm))
                    .collect();
                k::run(&g, &ops.iter().collect::<Vec<_>>(), t as u32, 0);
                let got = f32s(&g.download(&yt, (4 * t * o) as u64).unwrap());
                let want: Vec<f32> = if mode == 0 {
                    gy.clone()
                } else {
                    base.iter().zip(&gy).map(|(a, b)| a + b).collect()
                };
                // The integer sums are identical; the float epilogue may round differently per kernel on
                // drivers that contract `y += a * b / c` into FMAs (seen on NVIDIA: last-bit differences).
                let (d, at) = max_rel_diff(&got, &want);
                assert!(
                    d < 1e-6,
                    "matmul_ternary_tiled mode {mode}, {t}x{o}x{i}: diff {d} at {at}"
                );
            }
            // mode 1: accumulate onto a residual
            let base = randn(&mut rng, t * o, 1.0);
            let rb = g.storage_init("r", bytemuck::cast_slice(&base)).unwrap();
            let ops: Vec<_> = tiles
                .iter()
                .map(|tl| k::matmul_ternary(&g, tl, 1, 0, o, &qb, &sb, &sumb, &rb, &step))
                .collect();
            k::run(&g, &ops.iter().collect::<Vec<_>>(), t as u32, 0);
            let gr = f32s(&g.download(&rb, (4 * t * o) as u64).unwrap());
            let (d, at) = max_rel_diff(&gr, &mode_want(1, &base, &y1, &y2));
            assert!(d < 1e-6, "accumulate: diff {d} at {at}");
            // modes 2 and 3: fused gate/up with relu^2 and with silu
            for gm in [2u32, 3] {
                let gu = k::ternary_tiles(&g, &[&w, &w2], true).unwrap();
                let hb = g.storage("h", (4 * t * o) as u64).unwrap();
                let ops: Vec<_> = gu
                    .iter()
                    .map(|tl| k::matmul_ternary(&g, tl, gm, 0, o, &qb, &sb, &sumb, &hb, &step))
                    .collect();
                k::run(&g, &ops.iter().collect::<Vec<_>>(), t as u32, 0);
                let gh = f32s(&g.download(&hb, (4 * t * o) as u64).unwrap());
                let (d, at) = max_rel_diff(&gh, &mode_want(gm, &[], &y1, &y2));
                assert!(d < 1e-5, "gate_up mode {gm}: diff {d} at {at}");
                // The tiled kernel's fused gate/up (prompt chunks) gives matmul_ternary's result.
                for tm in [64, 128] {
                    let ht = g.storage("ht", (4 * t * o) as u64).unwrap();
                    let ops: Vec<_> = gu
                        .iter()
                        .map(|tl| k::matmul_ternary_tiled(&g, tl, gm, 0, o, &qb, &sb, &sumb, &ht, &step, tm))
                        .collect();
                    k::run(&g, &ops.iter().collect::<Vec<_>>(), t as u32, 0);
                    let gt = f32s(&g.download(&ht, (4 * t * o) as u64).unwrap());
                    let (d, at) = max_rel_diff(&gt, &gh);
                    assert!(
                        d < 1e-6,
                        "tiled gate_up mode {gm} (tm {tm}) {t}x{o}x{i}: diff {d} at {at}"
                    );
                }
            }
        }
    }
}

#[test]
fn rope_and_attention_match_cpu() {
    let mut rng = Rng::new(3);
    // attention's block max and sum have a subgroup variant: both paths run.
    for (g, &(nh, nkv, hd, start, t)) in gpu_paths(None).into_iter().flat_map(|g| {
        [
            (4usize, 2usize, 32usize, 0usize, 7usize),
            (4, 1, 16, 5, 1),
            (6, 3, 64, 300, 4),
            (2, 2, 128, 0, 260),
        ]
        .iter()
        .map(move |c| (g.clone(), c))
    }) {
        let cap = start + t;
        let stride = (nh + 2 * nkv) * hd;
        let (cos, sin) = cpu::rope_table(10000.0, hd, cap);
        // Earlier positions of the cache hold random keys/values; the chunk writes positions start..start+t.
        let mut kc = randn(&mut rng, nkv * cap * hd, 1.0);
        let mut vc = randn(&mut rng, nkv * cap * hd, 1.0);
        let qkv = randn(&mut rng, t * stride, 1.0);
        let step = step_buf(
            &g,
            Step {
                t: t as u32,
                start: start as u32,
                ..Default::default()
            },
        );
        let qkvb = g.storage_init("qkv", bytemuck::cast_slice(&qkv)).unwrap();
        let kb = g.storage_init("k", bytemuck::cast_slice(&kc)).unwrap();
        let vb = g.storage_init("v", bytemuck::cast_slice(&vc)).unwrap();
        let cb = g.storage_init("cos", bytemuck::cast_slice(&cos)).unwrap();
        let sb = g.storage_init("sin", bytemuck::cast_slice(&sin)).unwrap();
        let ob = g.storage("out", (4 * t * nh * hd) as u64).unwrap();
        let r = k::rope(&g, nh, nkv, hd, cap, &cb, &sb, &qkvb, &kb, &vb, &step);
        let a = k::attention(&g, nh, nkv, hd, cap, &qkvb, &kb, &vb, &ob, &step);
        k::run(&g, &[&r, &a], t as u32, 0);
        // CPU twin
        let positions: Vec<usize> = (start..start + t).collect();
        let mut q = vec![0f32; t * nh * hd];
        let mut kk = vec![0f32; t * nkv * hd];
        for ti in 0..t {
            q[ti * nh * hd..(ti + 1) * nh * hd].copy_from_slice(&qkv[ti * stride..ti * stride + nh * hd]);
            kk[ti * nkv * hd..(ti + 1) * nkv * hd]
                .copy_from_slice(&qkv[ti * stride + nh * hd..ti * stride + (nh + nkv) * hd]);
        }
        cpu::rope(&mut q, &positions, &cos, &sin, nh, hd);
        cpu::rope(&mut kk, &positions, &cos, &sin, nkv, hd);
        for ti in 0..t {
            for h in 0..nkv {
                let dst = (h * cap + start + ti) * hd;
                kc[dst..dst + hd].copy_from_slice(&kk[(ti * nkv + h) * hd..(ti * nkv + h + 1) * hd]);
                let vsrc = ti * stride + (nh + nkv) * hd + h * hd;
                vc[dst..dst + hd].copy_from_slice(&qkv[vsrc..vsrc + hd]);
            }
        }
        let mut out = vec![0f32; t * nh * hd];
        cpu::attention(&mut out, &q, &kc, &vc, start, t, nh, nkv, hd, cap);
        let gq = f32s(&g.download(&qkvb, (4 * t * stride) as u64).unwrap());
        for ti in 0..t {
            let (d, at) = max_rel_diff(
                &gq[ti * stride..ti * stride + nh * hd],
                &q[ti * nh * hd..(ti + 1) * nh * hd],
            );
            assert!(d < 1e-5, "rope q: diff {d} at {at}");
        }
        let (d, at) = max_rel_diff(&f32s(&g.download(&kb, (4 * nkv * cap * hd) as u64).unwrap()), &kc);
        assert!(d < 1e-5, "rope k cache: diff {d} at {at}");
        let (d, at) = max_rel_diff(&f32s(&g.download(&vb, (4 * nkv * cap * hd) as u64).unwrap()), &vc);
        assert!(d == 0.0, "v cache: diff {d} at {at}");
        let (d, at) = max_rel_diff(&f32s(&g.download(&ob, (4 * t * nh * hd) as u64).unwrap()), &out);
        assert!(
            d < 1e-5,
            "attention nh={nh} nkv={nkv} hd={hd} start={start} t={t}: diff {d} at {at}"
        );
    }
}

#[test]
fn embedding_and_lm_head_match_cpu_in_f16_and_f32() {
    let model = tiny_model();
    let mut rng = Rng::new(4);
    let (v, c) = (model.embed.rows, model.embed.cols);
    // lm_t 1 (decode), 5 (one group of eight tokens) and 14 (a second group, ending inside its last four).
    for (f16, t, lm_t) in [
        (true, 2, 1u32),
        (false, 6, 5),
        (true, 6, 5),
        (false, 15, 14),
        (true, 15, 14),
    ] {
        // 64 KiB bindings: the f32 table is 256 KiB, so both kernels run over several tiles.
        let g = gpu(Some(64 * 1024));
        let tiles = k::matrix_tiles(&g, &model.embed, f16).unwrap();
        assert!(tiles.len() > 1);
        let tokens: Vec<u32> = (0..t).map(|_| (rng.next_u64() % v as u64) as u32).collect();
        let x = randn(&mut rng, t * c, 1.0);
        let lm_t0 = 1u32;
        let step = step_buf(
            &g,
            Step {
                t: t as u32,
                lm_t0,
                lm_t,
                ..Default::default()
            },
        );
        let tb = g.storage_init("tokens", bytemuck::cast_slice(&tokens)).unwrap();
        let eb = g.storage("emb", (4 * t * c) as u64).unwrap();
        let sampled = g.storage("sampled", 4).unwrap();
        let xb = g.storage_init("x", bytemuck::cast_slice(&x)).unwrap();
        let lb = g.storage("logits", (4 * lm_t as usize * v) as u64).unwrap();
        let mut ops = vec![];
        for tl in &tiles {
            ops.push(k::embedding(&g, f16, c, tl, &tb, &sampled, &eb, &step));
            ops.push(k::lm_head(&g, f16, c, v, tl, &xb, &lb, &step));
        }
        k::run(&g, &ops.iter().collect::<Vec<_>>(), t as u32, lm_t);
        let round = |w: &mut Vec<f32>| {
            if f16 {
                w.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32());
            }
        };
        let mut want = vec![0f32; t * c];
        cpu::embedding(&mut want, &tokens, &model.embed);
        round(&mut want);
        let got = f32s(&g.download(&eb, (4 * t * c) as u64).unwrap());
        assert_eq!(got, want, "embedding f16={f16}");
        let mut w = model.embed.rows_f32(0, v);
        round(&mut w);
        let mut logits = vec![0f32; lm_t as usize * v];
        cpu::lm_head(&mut logits, &x[lm_t0 as usize * c..], &w, lm_t as usize, c, v);
        let got = f32s(&g.download(&lb, (4 * lm_t as usize * v) as u64).unwrap());
        let (d, at) = max_rel_diff(&got, &logits);
        assert!(d < 2e-5, "lm_head f16={f16} lm_t={lm_t}: diff {d} at {at}");
    }
}

#[test]
fn nll_matches_cpu() {
    let g = gpu(None);
    let mut rng = Rng::new(5);
    let (t, v) = (7usize, 1000usize);
    let logits = randn(&mut rng, t * v, 3.0);
    let targets: Vec<u32> = (0..t).map(|_| (rng.next_u64() % v as u64) as u32).collect();
    let step = step_buf(
        &g,
        Step {
            t: t as u32,
            lm_t0: 0,
            lm_t: t as u32,
            ..Default::default()
        },
    );
    let lb = g.storage_init("logits", bytemuck::cast_slice(&logits)).unwrap();
    let tb = g.storage_init("targets", bytemuck::cast_slice(&targets)).unwrap();
    let ob = g.storage("nll", 4 * t as u64).unwrap();
    let op = k::nll(&g, v, &lb, &tb, &ob, &step);
    k::run(&g, &[&op], t as u32, t as u32);
    let mut want = vec![0f32; t];
    cpu::nll(&mut want, &logits, &targets, v);
    let (d, at) = max_rel_diff(&f32s(&g.download(&ob, 4 * t as u64).unwrap()), &want);
    assert!(d < 1e-5, "nll: diff {d} at {at}");
}

#[test]
fn sample_matches_cpu_for_every_setting() {
    let g = gpu(None);
    let mut rng = Rng::new(6);
    // Over two CHUNKs of the greedy partial pass, and not a multiple of 4.
    let v = 9001usize;
    let settings = [
        SampleParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        },
        SampleParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.3,
        },
        SampleParams {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        },
        SampleParams {
            temperature: 1.0,
            top_k: 40,
            top_p: 1.0,
            repetition_penalty: 1.0,
        },
        SampleParams {
            temperature: 0.9,
            top_k: 0,
            top_p: 0.9,
            repetition_penalty: 1.0,
        },
        SampleParams {
            temperature: 1.2,
            top_k: 50,
            top_p: 0.8,
            repetition_penalty: 1.1,
        },
        SampleParams {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            repetition_penalty: 1.0,
        },
    ];
    let lb = g.storage("logits", 4 * v as u64).unwrap();
    let sb = g.storage("seen", (v.div_ceil(32) * 4) as u64).unwrap();
    let ob = g.storage("out", 4).unwrap();
    let pb = g.storage("partial", k::sample_partial_bytes(v)).unwrap();
    let step = g.uniform("step", bytemuck::bytes_of(&Step::default()));
    let ops = k::sample(&g, v, &lb, &sb, &pb, &ob, &step);
    let mut distinct = std::collections::HashSet::new();
    for (si, p) in settings.iter().enumerate() {
        for trial in 0..12 {
            let logits = randn(&mut rng, v, 3.0);
            let seen: Vec<bool> = (0..v).map(|_| rng.uniform() < 0.05).collect();
            let mut mask = vec![0u32; v.div_ceil(32)];
            for (i, s) in seen.iter().enumerate() {
                if *s {
                    mask[i / 32] |= 1 << (i % 32);
                }
            }
            let u = rng.uniform();
            g.queue.write_buffer(&lb, 0, bytemuck::cast_slice(&logits));
            g.queue.write_buffer(&sb, 0, bytemuck::cast_slice(&mask));
            let st = Step {
                temperature: p.temperature,
                top_k: p.top_k,
                top_p: p.top_p,
                penalty: p.repetition_penalty,
                u,
                ..Default::default()
            };
            g.queue.write_buffer(&step, 0, bytemuck::bytes_of(&st));
            k::run(&g, &[&ops[0], &ops[1]], 1, 1);
            let got = u32::from_le_bytes(g.download(&ob, 4).unwrap().try_into().unwrap());
            let want = cpu::sample(&logits, &seen, p, u);
            assert_eq!(got, want, "setting {si} {p:?} trial {trial}");
            distinct.insert((si, got));
        }
    }
    // Sampled settings must actually sample: many distinct tokens across trials.
    assert!(
        distinct.len() > 40,
        "only {} distinct (setting, token) pairs",
        distinct.len()
    );
}

/// On both reduction paths (subgroups where the adapter has them, and the fallback).
#[test]
fn rmsnorm_matmul_ternary_matches_cpu_composition() {
    let mut rng = Rng::new(7);
    for (limit, g) in [None, Some(32768u64)]
        .into_iter()
        .flat_map(|l| gpu_paths(l).into_iter().map(move |g| (l, g)))
    {
        let sg = g.subgroups();
        // One token (decode), and three (one per sequence of a batch step).
        for &(o, i, t) in &[(96usize, 128usize, 1usize), (160, 352, 3), (64, 2560, 2), (32, 6912, 1)] {
            let w = random_linear(&mut rng, o, i);
            let w2 = random_linear(&mut rng, o, i);
            let x = randn(&mut rng, t * i, 1.5);
            let nw: Vec<f32> = (0..i).map(|_| 0.5 + rng.uniform()).collect();
            let step = step_buf(
                &g,
                Step {
                    t: t as u32,
                    ..Default::default()
                },
            );
            let xb = g.storage_init("x", bytemuck::cast_slice(&x)).unwrap();
            let nb = g.storage_init("nw", bytemuck::cast_slice(&nw)).unwrap();
            let (mut q, mut s) = (vec![0i8; t * i], vec![0f32; t]);
            cpu::rmsnorm_quant(&mut q, &mut s, &x, &nw, 1e-5, t, i);
            let (mut y1, mut y2) = (vec![0f32; t * o], vec![0f32; t * o]);
            cpu::matmul_ternary(&mut y1, &q, &s, &w, t);
            cpu::matmul_ternary(&mut y2, &q, &s, &w2, t);
            for mode in 0..4u32 {
                let tiles = if mode >= 2 {
                    k::ternary_tiles(&g, &[&w, &w2], true).unwrap()
                } else {
                    k::ternary_tiles(&g, &[&w], false).unwrap()
                };
                let base = randn(&mut rng, t * o, 1.0);
                let yb = g.storage_init("y", bytemuck::cast_slice(&base)).unwrap();
                let ops: Vec<_> = tiles
                    .iter()
                    .map(|tl| k::rmsnorm_matmul_ternary(&g, tl, mode, k::fused_rows(), 1e-5, &xb, &nb, &yb, o, &step))
                    .collect();
                k::run(&g, &ops.iter().collect::<Vec<_>>(), t as u32, 0);
                let got = f32s(&g.download(&yb, (4 * t * o) as u64).unwrap());
                let want = mode_want(mode, &base, &y1, &y2);
                // The activation quantizer can move a boundary value by one step under a different
                // summation order, so allow a small relative difference.
                let (d, at) = max_rel_diff(&got, &want);
                assert!(
                    d < 2e-2,
                    "mode {mode} {o}x{i} t={t} limit {limit:?} subgroups {sg}: diff {d} at {at}"
                );
            }
        }
    }
}

/// A lone decode step runs the fused kernel and a batch step runs rmsnorm_quant then matmul_ternary, so
/// a sequence makes the same tokens alone and in a batch only if the two give the same bits: checked on
/// both reduction paths, with rows per workgroup that put a row's lanes within one subgroup (32 rows: 8
/// lanes) and across several (1, 2, 16 rows: 256, 128, 16 lanes).
#[test]
fn rmsnorm_matmul_ternary_equals_rmsnorm_quant_then_matmul_ternary() {
    let mut rng = Rng::new(11);
    for g in gpu_paths(None) {
        let sg = g.subgroups();
        let (lo, hi) = g.subgroup_sizes();
        eprintln!("{}: subgroups {sg} (sizes {lo}..={hi})", g.name());
        for &(o, i, t) in &[(96usize, 128usize, 1usize), (72, 2560, 3), (40, 6912, 2)] {
            let w = random_linear(&mut rng, o, i);
            let w2 = random_linear(&mut rng, o, i);
            let x = randn(&mut rng, t * i, 1.5);
            let nw: Vec<f32> = (0..i).map(|_| 0.5 + rng.uniform()).collect();
            let step = step_buf(
                &g,
                Step {
                    t: t as u32,
                    ..Default::default()
                },
            );
            let xb = g.storage_init("x", bytemuck::cast_slice(&x)).unwrap();
            let nb = g.storage_init("nw", bytemuck::cast_slice(&nw)).unwrap();
            let (qb, sb, sumb) = (
                g.storage("q", (t * i) as u64).unwrap(),
                g.storage("s", 4 * t as u64).unwrap(),
                g.storage("qs", 4 * t as u64).unwrap(),
            );
            let quant = k::rmsnorm_quant(&g, i, 1e-5, &nb, &xb, &qb, &sb, &sumb, &step);
            for mode in 0..4u32 {
                let tiles = if mode >= 2 {
                    k::ternary_tiles(&g, &[&w, &w2], true).unwrap()
                } else {
                    k::ternary_tiles(&g, &[&w], false).unwrap()
                };
                let base = randn(&mut rng, t * o, 1.0);
                let yb = g.storage_init("y", bytemuck::cast_slice(&base)).unwrap();
                let mut ops: Vec<&k::Op> = vec![&quant];
                let mm: Vec<_> = tiles
                    .iter()
                    .map(|tl| k::matmul_ternary(&g, tl, mode, 0, o, &qb, &sb, &sumb, &yb, &step))
                    .collect();
                ops.extend(mm.iter());
                k::run(&g, &ops, t as u32, 0);
                let want: Vec<u32> = bytemuck::cast_slice(&g.download(&yb, (4 * t * o) as u64).unwrap()).to_vec();
                for rows in [1u32, 2, 16, 32] {
                    let yf = g.storage_init("yf", bytemuck::cast_slice(&base)).unwrap();
                    let fused: Vec<_> = tiles
                        .iter()
                        .map(|tl| k::rmsnorm_matmul_ternary(&g, tl, mode, rows, 1e-5, &xb, &nb, &yf, o, &step))
                        .collect();
                    k::run(&g, &fused.iter().collect::<Vec<_>>(), t as u32, 0);
                    let got: Vec<u32> = bytemuck::cast_slice(&g.download(&yf, (4 * t * o) as u64).unwrap()).to_vec();
                    let off = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                    assert_eq!(
                        off,
                        0,
                        "mode {mode} {o}x{i} t={t} rows {rows} subgroups {sg}: {off} of {} outputs differ",
                        t * o
                    );
                }
            }
        }
    }
}

#[test]
fn attention_split_rope_matches_rope_then_attention() {
    let g = gpu(None);
    let mut rng = Rng::new(9);
    for &(nh, nkv, hd, start) in &[
        (4usize, 2usize, 32usize, 0usize),
        (4, 1, 16, 31),
        (20, 5, 128, 300),
        (2, 2, 256, 64),
    ] {
        let cap = start + 1 + 5;
        let stride = (nh + 2 * nkv) * hd;
        let (cos, sin) = cpu::rope_table(500000.0, hd, cap);
        let kc0 = randn(&mut rng, nkv * cap * hd, 1.0);
        let vc0 = randn(&mut rng, nkv * cap * hd, 1.0);
        let qkv = randn(&mut rng, stride, 1.0);
        let step = step_buf(
            &g,
            Step {
                t: 1,
                start: start as u32,
                ..Default::default()
            },
        );
        let qkvb = g.storage_init("qkv", bytemuck::cast_slice(&qkv)).unwrap();
        let kb = g.storage_init("k", bytemuck::cast_slice(&kc0)).unwrap();
        let vb = g.storage_init("v", bytemuck::cast_slice(&vc0)).unwrap();
        let cb = g.storage_init("cos", bytemuck::cast_slice(&cos)).unwrap();
        let sb = g.storage_init("sin", bytemuck::cast_slice(&sin)).unwrap();
        let part = g.storage("part", k::attention_part_bytes(nh, hd, cap)).unwrap();
        let ob = g.storage("out", (4 * nh * hd) as u64).unwrap();
        let ops = k::attention_split_rope(&g, nh, nkv, hd, cap, &cb, &sb, &qkvb, &kb, &vb, &part, &ob, &step);
        k::run(&g, &[&ops[0], &ops[1]], 1, 0);
        // CPU: rope on q and k, cache update, attention.
        let mut q = qkv[..nh * hd].to_vec();
        let mut kk = qkv[nh * hd..(nh + nkv) * hd].to_vec();
        cpu::rope(&mut q, &[start], &cos, &sin, nh, hd);
        cpu::rope(&mut kk, &[start], &cos, &sin, nkv, hd);
        let (mut kc, mut vc) = (kc0.clone(), vc0.clone());
        for h in 0..nkv {
            let dst = (h * cap + start) * hd;
            kc[dst..dst + hd].copy_from_slice(&kk[h * hd..(h + 1) * hd]);
            vc[dst..dst + hd].copy_from_slice(&qkv[(nh + nkv + h) * hd..(nh + nkv + h + 1) * hd]);
        }
        let mut out = vec![0f32; nh * hd];
        cpu::attention(&mut out, &q, &kc, &vc, start, 1, nh, nkv, hd, cap);
        let (d, at) = max_rel_diff(&f32s(&g.download(&ob, (4 * nh * hd) as u64).unwrap()), &out);
        assert!(d < 1e-5, "nh={nh} nkv={nkv} hd={hd} start={start}: diff {d} at {at}");
        let (d, at) = max_rel_diff(&f32s(&g.download(&kb, (4 * nkv * cap * hd) as u64).unwrap()), &kc);
        assert!(d < 1e-5, "k cache: diff {d} at {at}");
        assert_eq!(
            f32s(&g.download(&vb, (4 * nkv * cap * hd) as u64).unwrap()),
            vc,
            "v cache"
        );
    }
}

/// The capability probe times the same `matmul_ternary` launcher inference uses, and checks the device's
/// result against the CPU twin before trusting the number.
#[test]
fn capability_probe_runs_matmul_ternary_and_verifies_it() {
    let want = std::env::var("BITNODE_ADAPTER").unwrap_or_else(|_| "gpu".into());
    let p = bitnode_engine::probe::probe(&want, std::time::Duration::from_millis(50)).unwrap();
    assert!(p.verified, "{p:?}");
    assert!(p.ternary_gops > 0.0 && p.ternary_gops.is_finite(), "{p:?}");
    assert_ne!(p.backend, "cpu", "a wgpu adapter was asked for: {p:?}");
    let c = bitnode_engine::probe::probe("cpu", std::time::Duration::from_millis(20)).unwrap();
    assert!(c.verified && c.ternary_gops > 0.0 && c.backend == "cpu", "{c:?}");
    assert!(bitnode_engine::probe::probe("no-such-adapter-name", std::time::Duration::ZERO).is_err());
}

// ---- training kernels (Engine II), each against its CPU twin ----

fn upload(g: &bitnode_engine::gpu::Gpu, v: &[f32]) -> wgpu::Buffer {
    g.storage_init("t", bytemuck::cast_slice(v)).unwrap()
}

fn fetch(g: &bitnode_engine::gpu::Gpu, b: &wgpu::Buffer, n: usize) -> Vec<f32> {
    f32s(&g.download(b, (4 * n) as u64).unwrap())
}

#[test]
fn rmsnorm_and_gated_activations_match_cpu() {
    let g = gpu(None);
    let mut rng = Rng::new(21);
    for &(t, c) in &[(1usize, 64usize), (5, 352), (3, 2560)] {
        let step = step_buf(
            &g,
            Step {
                t: t as u32,
                ..Default::default()
            },
        );
        let (x, w, dy) = (
            randn(&mut rng, t * c, 1.0),
            randn(&mut rng, c, 1.0),
            randn(&mut rng, t * c, 1.0),
        );
        let mut want = vec![0f32; t * c];
        cpu::rmsnorm_backward(&mut want, &dy, &x, &w, 1e-5, t, c);
        let dxb = g.storage("dx", (4 * t * c) as u64).unwrap();
        let (wb, xb, dyb) = (upload(&g, &w), upload(&g, &x), upload(&g, &dy));
        let op = k::rmsnorm_backward(&g, c, 1e-5, false, &wb, &xb, &dyb, &dxb, &step);
        k::run(&g, &[&op], t as u32, 0);
        let (d, at) = max_rel_diff(&fetch(&g, &dxb, t * c), &want);
        assert!(d < 1e-4, "rmsnorm_backward {t}x{c}: {d} at {at}");
        // With `accumulate`, the gradient adds onto what dx holds (a residual's gradient).
        let op = k::rmsnorm_backward(&g, c, 1e-5, true, &wb, &xb, &dyb, &dxb, &step);
        k::run(&g, &[&op], t as u32, 0);
        let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
        assert!(
            max_rel_diff(&fetch(&g, &dxb, t * c), &twice).0 < 1e-4,
            "rmsnorm_backward accumulate"
        );

        let (gg, u) = (randn(&mut rng, t * c, 1.0), randn(&mut rng, t * c, 1.0));
        let (mut wg, mut wu) = (vec![0f32; t * c], vec![0f32; t * c]);
        cpu::relu2_mul_backward(&mut wg, &mut wu, &dy, &gg, &u);
        let (dgb, dub) = (
            g.storage("dg", (4 * t * c) as u64).unwrap(),
            g.storage("du", (4 * t * c) as u64).unwrap(),
        );
        let op = k::relu2_mul_backward(
            &g,
            c,
            &upload(&g, &dy),
            &upload(&g, &gg),
            &upload(&g, &u),
            &dgb,
            &dub,
            &step,
        );
        k::run(&g, &[&op], t as u32, 0);
        assert!(max_rel_diff(&fetch(&g, &dgb, t * c), &wg).0 < 1e-6);
        let mut wout = vec![0f32; t * c];
        cpu::relu2_mul(&mut wout, &gg, &u);
        let outb = g.storage("out", (4 * t * c) as u64).unwrap();
        let op = k::relu2_mul(&g, c, &upload(&g, &gg), &upload(&g, &u), &outb, &step);
        k::run(&g, &[&op], t as u32, 0);
        assert!(max_rel_diff(&fetch(&g, &outb, t * c), &wout).0 < 1e-6, "relu2_mul");
        assert!(max_rel_diff(&fetch(&g, &dub, t * c), &wu).0 < 1e-6);

        // The SiLU twin: its exp may round differently on the device, hence the looser bound.
        let (mut wg, mut wu) = (vec![0f32; t * c], vec![0f32; t * c]);
        cpu::silu_mul_backward(&mut wg, &mut wu, &dy, &gg, &u);
        let op = k::silu_mul_backward(
            &g,
            c,
            &upload(&g, &dy),
            &upload(&g, &gg),
            &upload(&g, &u),
            &dgb,
            &dub,
            &step,
        );
        k::run(&g, &[&op], t as u32, 0);
        let (d, at) = max_rel_diff(&fetch(&g, &dgb, t * c), &wg);
        assert!(d < 1e-5, "silu_mul_backward dg {t}x{c}: {d} at {at}");
        let (d, at) = max_rel_diff(&fetch(&g, &dub, t * c), &wu);
        assert!(d < 1e-5, "silu_mul_backward du {t}x{c}: {d} at {at}");
        cpu::silu_mul(&mut wout, &gg, &u);
        let op = k::silu_mul(&g, c, &upload(&g, &gg), &upload(&g, &u), &outb, &step);
        k::run(&g, &[&op], t as u32, 0);
        let (d, at) = max_rel_diff(&fetch(&g, &outb, t * c), &wout);
        assert!(d < 1e-5, "silu_mul {t}x{c}: {d} at {at}");
    }
}

#[test]
fn matmul_ternary_backward_matches_cpu_across_tiles() {
    let mut rng = Rng::new(22);
    // 8 KiB bindings split the weights into several row tiles, accumulated into one dx.
    for limit in [None, Some(8192u64)] {
        let g = gpu(limit);
        for &(t, o, i) in &[
            (1usize, 96usize, 128usize),
            (4, 160, 352),
            (2, 64, 2560),
            (70, 100, 352),
            // Past the 128 x 128 GEMM tile in tokens and in columns (352 = 2.75 tiles).
            (150, 100, 352),
        ] {
            if limit.is_some() && 4 * t * i > 8192 {
                continue; // the activations themselves would exceed the forced limit
            }
            let w = random_linear(&mut rng, o, i);
            let dy = randn(&mut rng, t * o, 1.0);
            let mut want = vec![0f32; t * i];
            cpu::matmul_ternary_backward(&mut want, &dy, &w, t);
            let step = step_buf(
                &g,
                Step {
                    t: t as u32,
                    ..Default::default()
                },
            );
            let tiles = k::ternary_tiles(&g, &[&w], false).unwrap();
            let (dyb, dxb) = (upload(&g, &dy), g.storage("dx", (4 * t * i) as u64).unwrap());
            let ops: Vec<_> = tiles
                .iter()
                .enumerate()
                .map(|(n, tl)| k::matmul_ternary_backward(&g, tl, o, n > 0, &dyb, &dxb, &step))
                .collect();
            // Tiles accumulate into dx: one dispatch after another.
            for op in &ops {
                k::run(&g, &[op], t as u32, 0);
            }
            let (d, at) = max_rel_diff(&fetch(&g, &dxb, t * i), &want);
            assert!(d < 1e-5, "{t}x{o}x{i} ({} tiles): {d} at {at}", tiles.len());
        }
    }
}

#[test]
fn lora_forward_and_backward_match_cpu() {
    let g = gpu(None);
    let mut rng = Rng::new(23);
    // The last: more tokens than one 16-token block, a rank past one 16-rank chunk, ragged columns.
    for &(t, i, o, r) in &[
        (1usize, 64usize, 96usize, 4usize),
        (6, 352, 160, 16),
        (3, 2560, 640, 8),
        (70, 100, 72, 20),
    ] {
        let scale = 2.0;
        let (x, a, b) = (
            randn(&mut rng, t * i, 1.0),
            randn(&mut rng, r * i, 0.1),
            randn(&mut rng, o * r, 0.1),
        );
        let y0 = randn(&mut rng, t * o, 1.0);
        let dy = randn(&mut rng, t * o, 1.0);
        let (mut y, mut h) = (y0.clone(), vec![0f32; t * r]);
        cpu::lora(&mut y, &mut h, &x, &a, &b, scale, t, i, o, r);
        let (mut dx, mut da, mut db) = (
            randn(&mut rng, t * i, 1.0),
            randn(&mut rng, r * i, 1.0),
            randn(&mut rng, o * r, 1.0),
        );
        let (dx0, da0, db0) = (dx.clone(), da.clone(), db.clone());
        cpu::lora_backward(&mut dx, &mut da, &mut db, &dy, &x, &h, &a, &b, scale, t, i, o, r);

        let step = step_buf(
            &g,
            Step {
                t: t as u32,
                ..Default::default()
            },
        );
        let s = k::LoraShape {
            inp: i,
            out: o,
            rank: r,
            scale,
            x_stride: i,
            y_stride: o,
            y_off: 0,
        };
        let (xb, ab, bb, yb) = (upload(&g, &x), upload(&g, &a), upload(&g, &b), upload(&g, &y0));
        let hb = g.storage("h", (4 * t * r) as u64).unwrap();
        let ops = k::lora(&g, &s, &xb, &ab, &bb, &hb, &yb, &step);
        k::run(&g, &ops.iter().collect::<Vec<_>>(), t as u32, 0);
        assert!(max_rel_diff(&fetch(&g, &hb, t * r), &h).0 < 1e-4, "lora h");
        assert!(max_rel_diff(&fetch(&g, &yb, t * o), &y).0 < 1e-4, "lora y");

        let (dyb, dhb) = (upload(&g, &dy), g.storage("dh", (4 * t * r) as u64).unwrap());
        let (dxb, dab, dbb) = (upload(&g, &dx0), upload(&g, &da0), upload(&g, &db0));
        let ops = k::lora_backward(&g, &s, &xb, &ab, &bb, &hb, &dyb, &dhb, &dab, &dbb, &dxb, &step);
        // dh first; the others read it.
        for op in &ops {
            k::run(&g, &[op], t as u32, 0);
        }
        assert!(max_rel_diff(&fetch(&g, &dxb, t * i), &dx).0 < 1e-4, "lora dx");
        assert!(max_rel_diff(&fetch(&g, &dab, r * i), &da).0 < 1e-4, "lora dA");
        assert!(max_rel_diff(&fetch(&g, &dbb, o * r), &db).0 < 1e-4, "lora dB");
    }
}

#[test]
fn adamw_matches_cpu_over_several_steps() {
    let g = gpu(None);
    let mut rng = Rng::new(24);
    let n = 1000;
    let o = cpu::AdamW {
        lr: 3e-3,
        weight_decay: 0.05,
        ..Default::default()
    };
    let p0 = randn(&mut rng, n, 1.0);
    let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
    let (pb, mb, vb) = (upload(&g, &p0), upload(&g, &m), upload(&g, &v));
    let step = step_buf(
        &g,
        Step {
            t: 1,
            ..Default::default()
        },
    );
    let no_clip = upload(&g, &[1.0, 0.0]);
    for t in 1..=5u64 {
        let grad = randn(&mut rng, n, 0.5);
        let lr = o.lr * (1.0 - t as f64 / 10.0);
        cpu::adamw(&mut p, &mut m, &mut v, &grad, &o, lr, t);
        let gb = upload(&g, &grad);
        let op = k::adamw(&g, n, &o, lr, t, &pb, &mb, &vb, &gb, &no_clip, &step);
        k::run(&g, &[&op], 1, 0);
    }
    let (d, at) = max_rel_diff(&fetch(&g, &pb, n), &p);
    assert!(d < 1e-5, "params: {d} at {at}");
    assert!(max_rel_diff(&fetch(&g, &vb, n), &v).0 < 1e-5, "second moment");
}

/// Gradient clipping on the device: per-tensor sums of squares (`grad_sq_sum`, tensors longer and shorter
/// than a workgroup), the global norm and coefficient (`grad_clip`, clipping and not), and AdamW on the
/// clipped gradients, against the CPU twins and torch's clip_grad_norm_ (`cpu::clip_grad_norm`).
#[test]
fn grad_clip_matches_cpu() {
    let g = gpu(None);
    let mut rng = Rng::new(31);
    let step = step_buf(
        &g,
        Step {
            t: 1,
            ..Default::default()
        },
    );
    let lens = [1000usize, 37, 4096, 1];
    let grads: Vec<Vec<f32>> = lens.iter().map(|&n| randn(&mut rng, n, 0.3)).collect();
    let sq = g.storage("sq", 4 * lens.len() as u64).unwrap();
    let clip = g.storage("clip", 16).unwrap();
    let bufs: Vec<_> = grads.iter().map(|x| upload(&g, x)).collect();
    let sums: Vec<_> = bufs
        .iter()
        .zip(&lens)
        .enumerate()
        .map(|(i, (b, &n))| k::grad_sq_sum(&g, n, i, b, &sq, &step))
        .collect();
    let want_sq: Vec<f32> = grads.iter().map(|x| cpu::grad_sq_sum(x)).collect();
    for max_norm in [None, Some(1.0f32), Some(1e3)] {
        let op = k::grad_clip(&g, lens.len(), max_norm, &sq, &clip, &step);
        let mut ops: Vec<&k::Op> = sums.iter().collect();
        ops.push(&op);
        k::run(&g, &ops, 1, 0);
        let got_sq = fetch(&g, &sq, lens.len());
        assert!(
            max_rel_diff(&got_sq, &want_sq).0 < 1e-5,
            "sums of squares {got_sq:?} vs {want_sq:?}"
        );
        let got = fetch(&g, &clip, 2);
        let (coef, norm) = cpu::grad_clip(&want_sq, max_norm);
        let torch_norm = cpu::grad_norm(grads.iter().map(|x| &x[..]));
        assert!((got[1] - norm).abs() < 1e-5 * norm && (norm - torch_norm).abs() < 1e-5 * norm);
        assert!((got[0] - coef).abs() < 1e-5, "coef {} vs {coef} ({max_norm:?})", got[0]);
        assert_eq!(
            coef < 1.0,
            max_norm == Some(1.0),
            "only max_norm 1 clips these ({norm})"
        );
    }
    // AdamW reads the coefficient: the step on clipped gradients equals the CPU step on scaled ones.
    let o = cpu::AdamW::default();
    let n = lens[0];
    let p0 = randn(&mut rng, n, 1.0);
    let (pb, mb, vb) = (upload(&g, &p0), upload(&g, &vec![0f32; n]), upload(&g, &vec![0f32; n]));
    let op = k::grad_clip(&g, lens.len(), Some(1.0), &sq, &clip, &step);
    let ad = k::adamw(&g, n, &o, 1e-2, 1, &pb, &mb, &vb, &bufs[0], &clip, &step);
    k::run(&g, &[&op, &ad], 1, 0);
    let (coef, _) = cpu::grad_clip(&want_sq, Some(1.0));
    let scaled: Vec<f32> = grads[0].iter().map(|x| x * coef).collect();
    let (mut p, mut m, mut v) = (p0, vec![0f32; n], vec![0f32; n]);
    cpu::adamw(&mut p, &mut m, &mut v, &scaled, &o, 1e-2, 1);
    let (d, at) = max_rel_diff(&fetch(&g, &pb, n), &p);
    assert!(d < 1e-5, "clipped AdamW params: {d} at {at}");
}

/// The head as training runs it: a token chunk [lm_t0, lm_t0 + lm_t) of a longer sequence, a vocabulary
/// split over several binding tiles (rows of the 128-row GEMM tile left over), then a chunk of more than one
/// 128-token GEMM tile: lm_head_tiled, nll_backward and lm_head_backward against their CPU twins.
#[test]
fn head_chunk_kernels_match_cpu() {
    let model = tiny_model();
    let mut rng = Rng::new(26);
    let (v, c) = (model.embed.rows, model.embed.cols);
    // 160 KiB bindings: the f32 table (256 KiB) spans two tiles (320 and 192 rows), the chunk's logits fit
    // one binding; 512 KiB: one tile, and 200 rows of logits fit.
    let cases = [(75usize, 5usize, 67usize, 160 * 1024u64), (210, 7, 200, 512 * 1024)];
    for ((t, lm_t0, lm_t, limit), f16) in cases.into_iter().flat_map(|cs| [(cs, false), (cs, true)]) {
        let g = gpu(Some(limit));
        let tiles = k::matrix_tiles(&g, &model.embed, f16).unwrap();
        assert!(f16 || limit > 160 * 1024 || tiles.len() > 1);
        let mut w = model.embed.rows_f32(0, v);
        if f16 {
            w.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32());
        }
        let step = step_buf(
            &g,
            Step {
                t: t as u32,
                lm_t0: lm_t0 as u32,
                lm_t: lm_t as u32,
                ..Default::default()
            },
        );
        let x = randn(&mut rng, t * c, 1.0);
        let xb = upload(&g, &x);
        let lb = g.storage("logits", (4 * lm_t * v) as u64).unwrap();
        for tl in &tiles {
            let op = k::lm_head_tiled(&g, f16, c, v, tl, &xb, &lb, &step);
            k::run(&g, &[&op], t as u32, lm_t as u32);
        }
        let mut want = vec![0f32; lm_t * v];
        cpu::lm_head(&mut want, &x[lm_t0 * c..(lm_t0 + lm_t) * c], &w, lm_t, c, v);
        let logits = fetch(&g, &lb, lm_t * v);
        let (d, at) = max_rel_diff(&logits, &want);
        assert!(d < 2e-5, "lm_head_tiled f16={f16}: {d} at {at}");

        let targets: Vec<u32> = (0..t).map(|_| (rng.next_u64() % v as u64) as u32).collect();
        let dnll: Vec<f32> = (0..t).map(|i| if i % 7 == 3 { 0.0 } else { 0.1 }).collect();
        let mut dl = vec![0f32; lm_t * v];
        let r = lm_t0..lm_t0 + lm_t;
        cpu::nll_backward(&mut dl, &logits, &targets[r.clone()], &dnll[r], v);
        let dlb = g.storage("dlogits", (4 * lm_t * v) as u64).unwrap();
        let tb = g.storage_init("targets", bytemuck::cast_slice(&targets)).unwrap();
        let op = k::nll_backward(&g, v, &lb, &tb, &upload(&g, &dnll), &dlb, &step);
        k::run(&g, &[&op], t as u32, lm_t as u32);
        let (d, at) = max_rel_diff(&fetch(&g, &dlb, lm_t * v), &dl);
        assert!(d < 1e-4, "nll_backward chunk: {d} at {at}");

        let mut wdx = vec![0f32; lm_t * c];
        cpu::lm_head_backward(&mut wdx, &dl, &w, lm_t, c, v);
        let dxb = g.storage("dx", (4 * t * c) as u64).unwrap();
        for (n, tl) in tiles.iter().enumerate() {
            let op = k::lm_head_backward(&g, f16, c, v, tl, n > 0, &dlb, &dxb, &step);
            k::run(&g, &[&op], t as u32, lm_t as u32);
        }
        let got = fetch(&g, &dxb, t * c);
        assert!(
            got[..lm_t0 * c].iter().all(|&z| z == 0.0),
            "rows before the chunk are left alone"
        );
        let (d, at) = max_rel_diff(&got[lm_t0 * c..(lm_t0 + lm_t) * c], &wdx);
        assert!(d < 1e-4, "lm_head_backward chunk f16={f16}: {d} at {at}");
    }
}

#[test]
fn nll_lm_head_and_rope_backward_match_cpu() {
    let model = tiny_model();
    let mut rng = Rng::new(25);
    let (v, c) = (model.embed.rows, model.embed.cols);
    let t = 5;
    for f16 in [false, true] {
        // 64 KiB bindings: the head spans several row tiles, accumulated into one dx.
        let g = gpu(Some(64 * 1024));
        let step = step_buf(
            &g,
            Step {
                t: t as u32,
                lm_t: t as u32,
                ..Default::default()
            },
        );
        let logits = randn(&mut rng, t * v, 2.0);
        let targets: Vec<u32> = (0..t).map(|_| (rng.next_u64() % v as u64) as u32).collect();
        let dnll = [0.2f32, 0.0, 0.2, 0.2, 0.4];
        let mut want = vec![0f32; t * v];
        cpu::nll_backward(&mut want, &logits, &targets, &dnll, v);
        let dlb = g.storage("dlogits", (4 * t * v) as u64).unwrap();
        let tb = g.storage_init("targets", bytemuck::cast_slice(&targets)).unwrap();
        let op = k::nll_backward(&g, v, &upload(&g, &logits), &tb, &upload(&g, &dnll), &dlb, &step);
        k::run(&g, &[&op], t as u32, t as u32);
        let got = fetch(&g, &dlb, t * v);
        let (d, at) = max_rel_diff(&got, &want);
        assert!(d < 1e-4, "nll_backward: {d} at {at}");

        // lm_head_backward reads the head as stored (f16 rounds it), so the twin gets the same values.
        let tiles = k::matrix_tiles(&g, &model.embed, f16).unwrap();
        assert!(tiles.len() > 1);
        let mut w = model.embed.rows_f32(0, v);
        if f16 {
            w.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32());
        }
        let mut wdx = vec![0f32; t * c];
        cpu::lm_head_backward(&mut wdx, &want, &w, t, c, v);
        let dxb = g.storage("dx", (4 * t * c) as u64).unwrap();
        for (n, tl) in tiles.iter().enumerate() {
            let op = k::lm_head_backward(&g, f16, c, v, tl, n > 0, &dlb, &dxb, &step);
            k::run(&g, &[&op], t as u32, t as u32);
        }
        let (d, at) = max_rel_diff(&fetch(&g, &dxb, t * c), &wdx);
        assert!(d < 1e-4, "lm_head_backward f16={f16}: {d} at {at}");
    }
    // RoPE backward at an offset start position.
    let g = gpu(None);
    let (nh, hd, start) = (4usize, 16usize, 3usize);
    let (cos, sin) = cpu::rope_table(10000.0, hd, 16);
    let dy = randn(&mut rng, t * nh * hd, 1.0);
    let mut want = dy.clone();
    let pos: Vec<usize> = (start..start + t).collect();
    cpu::rope_backward(&mut want, &pos, &cos, &sin, nh, hd);
    let step = step_buf(
        &g,
        Step {
            t: t as u32,
            start: start as u32,
            ..Default::default()
        },
    );
    // The heads sit at columns [8, 8 + NH*HD) of a wider buffer, as q or k inside the fused qkv gradient.
    let (stride, off) = (nh * hd + 24, 8);
    let mut wide = randn(&mut rng, t * stride, 1.0);
    for ti in 0..t {
        wide[ti * stride + off..ti * stride + off + nh * hd].copy_from_slice(&dy[ti * nh * hd..(ti + 1) * nh * hd]);
    }
    let dxb = upload(&g, &wide);
    let op = k::rope_backward(
        &g,
        nh,
        hd,
        stride,
        off,
        &upload(&g, &cos),
        &upload(&g, &sin),
        &dxb,
        &step,
    );
    k::run(&g, &[&op], t as u32, 0);
    let got = fetch(&g, &dxb, t * stride);
    let mut heads = vec![];
    for ti in 0..t {
        heads.extend_from_slice(&got[ti * stride + off..ti * stride + off + nh * hd]);
        assert_eq!(
            got[ti * stride..ti * stride + off],
            wide[ti * stride..ti * stride + off],
            "other columns untouched"
        );
    }
    let (d, at) = max_rel_diff(&heads, &want);
    assert!(d < 1e-5, "rope_backward: {d} at {at}");
}

#[test]
fn attention_backward_matches_cpu() {
    let g = gpu(None);
    let mut rng = Rng::new(26);
    // The second case has more keys than one 256-key block.
    for &(t, nh, nkv, hd) in &[(5usize, 4usize, 2usize, 16usize), (300, 4, 1, 32)] {
        let (qd, kvd) = (nh * hd, nkv * hd);
        let w = qd + 2 * kvd; // q sits inside a fused qkv row, as the forward leaves it
        let q = randn(&mut rng, t * qd, 0.5);
        let kk = randn(&mut rng, nkv * t * hd, 0.5);
        let vv = randn(&mut rng, nkv * t * hd, 1.0);
        let dy = randn(&mut rng, t * qd, 1.0);
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; kk.len()], vec![0f32; vv.len()]);
        cpu::attention_backward(&mut dq, &mut dk, &mut dv, &dy, &q, &kk, &vv, t, nh, nkv, hd);
        let mut qkv = randn(&mut rng, t * w, 1.0);
        for ti in 0..t {
            qkv[ti * w..ti * w + qd].copy_from_slice(&q[ti * qd..(ti + 1) * qd]);
        }
        let step = step_buf(
            &g,
            Step {
                t: t as u32,
                ..Default::default()
            },
        );
        let stats = g.storage("stats", (16 * t * nh) as u64).unwrap();
        let dqkv = g.storage("dqkv", (4 * t * w) as u64).unwrap();
        let (qb, kb, vb, db) = (upload(&g, &qkv), upload(&g, &kk), upload(&g, &vv), upload(&g, &dy));
        // The forward output, which the dq kernel reads for D = dout . out.
        let mut out = vec![0f32; t * qd];
        cpu::attention(&mut out, &q, &kk, &vv, 0, t, nh, nkv, hd, t);
        let ob = upload(&g, &out);
        let ops = k::attention_backward(&g, nh, nkv, hd, t, w, w, &qb, &kb, &vb, &ob, &db, &stats, &dqkv, &step);
        for op in &ops {
            k::run(&g, &[op], t as u32, 0);
        }
        let got = fetch(&g, &dqkv, t * w);
        // The CPU twin's dk/dv are in the cache layout [NKV, T, HD]; the GPU writes token rows.
        let (mut gq, mut gk, mut gv) = (vec![], vec![0f32; dk.len()], vec![0f32; dv.len()]);
        for ti in 0..t {
            gq.extend_from_slice(&got[ti * w..ti * w + qd]);
            for h in 0..nkv {
                for d in 0..hd {
                    gk[(h * t + ti) * hd + d] = got[ti * w + qd + h * hd + d];
                    gv[(h * t + ti) * hd + d] = got[ti * w + qd + kvd + h * hd + d];
                }
            }
        }
        for (name, got, want) in [("dq", &gq, &dq), ("dk", &gk, &dk), ("dv", &gv, &dv)] {
            let (d, at) = max_rel_diff(got, want);
            assert!(d < 1e-3, "attention {name} T={t}: {d} at {at}");
        }
    }
}

/// A batch decode step: rows at their own (slot, position), several slots of one cache.
#[test]
fn rope_rows_and_attention_rows_match_cpu() {
    let g = gpu(None);
    let mut rng = Rng::new(31);
    for &(nh, nkv, hd, cap, ref rows) in &[
        (
            4usize,
            2usize,
            32usize,
            40usize,
            vec![(0usize, 0usize), (2, 17), (1, 39)],
        ),
        (6, 3, 64, 300, vec![(3, 299), (0, 5), (1, 256), (2, 1)]),
        (2, 2, 128, 8, vec![(0, 7)]),
    ] {
        let slots = rows.iter().map(|r| r.0).max().unwrap() + 1;
        let t = rows.len();
        let stride = (nh + 2 * nkv) * hd;
        let (cos, sin) = cpu::rope_table(10000.0, hd, cap);
        // Every slot holds random earlier keys and values; the step writes each row's own position.
        let mut kc = randn(&mut rng, slots * nkv * cap * hd, 1.0);
        let mut vc = randn(&mut rng, slots * nkv * cap * hd, 1.0);
        let qkv = randn(&mut rng, t * stride, 1.0);
        let at: Vec<[u32; 2]> = rows.iter().map(|&(s, p)| [s as u32, p as u32]).collect();
        let step = step_buf(
            &g,
            Step {
                t: t as u32,
                ..Default::default()
            },
        );
        let qkvb = g.storage_init("qkv", bytemuck::cast_slice(&qkv)).unwrap();
        let kb = g.storage_init("k", bytemuck::cast_slice(&kc)).unwrap();
        let vb = g.storage_init("v", bytemuck::cast_slice(&vc)).unwrap();
        let cb = g.storage_init("cos", bytemuck::cast_slice(&cos)).unwrap();
        let sb = g.storage_init("sin", bytemuck::cast_slice(&sin)).unwrap();
        let rb = g.storage_init("rows", bytemuck::cast_slice(&at)).unwrap();
        let ob = g.storage("out", (4 * t * nh * hd) as u64).unwrap();
        let r = k::rope_rows(&g, nh, nkv, hd, cap, &cb, &sb, &qkvb, &kb, &vb, &rb, &step);
        let a = k::attention_rows(&g, nh, nkv, hd, cap, &qkvb, &kb, &vb, &ob, &rb, &step);
        k::run(&g, &[&r, &a], t as u32, 0);
        // CPU twins
        let (mut q, mut kk, mut vv) = (vec![], vec![], vec![]);
        for ti in 0..t {
            let row = &qkv[ti * stride..(ti + 1) * stride];
            q.extend_from_slice(&row[..nh * hd]);
            kk.extend_from_slice(&row[nh * hd..(nh + nkv) * hd]);
            vv.extend_from_slice(&row[(nh + nkv) * hd..]);
        }
        cpu::rope_rows(
            &mut q, &mut kk, &vv, &mut kc, &mut vc, rows, &cos, &sin, nh, nkv, hd, cap,
        );
        let mut out = vec![0f32; t * nh * hd];
        cpu::attention_rows(&mut out, &q, &kc, &vc, rows, nh, nkv, hd, cap);
        let gq = f32s(&g.download(&qkvb, (4 * t * stride) as u64).unwrap());
        for ti in 0..t {
            let (d, at) = max_rel_diff(
                &gq[ti * stride..ti * stride + nh * hd],
                &q[ti * nh * hd..(ti + 1) * nh * hd],
            );
            assert!(d < 1e-5, "rope_rows q: diff {d} at {at}");
        }
        let n = (slots * nkv * cap * hd * 4) as u64;
        let (d, at) = max_rel_diff(&f32s(&g.download(&kb, n).unwrap()), &kc);
        assert!(d < 1e-5, "rope_rows k cache: diff {d} at {at}");
        let (d, at) = max_rel_diff(&f32s(&g.download(&vb, n).unwrap()), &vc);
        assert!(d == 0.0, "rope_rows v cache: diff {d} at {at}");
        let (d, at) = max_rel_diff(&f32s(&g.download(&ob, (4 * t * nh * hd) as u64).unwrap()), &out);
        assert!(d < 1e-5, "attention_rows {rows:?}: diff {d} at {at}");
    }
}

/// Several logits rows sampled at once, each with its own settings, draw and repetition set.
#[test]
fn sample_rows_matches_cpu() {
    let g = gpu(None);
    let mut rng = Rng::new(32);
    let v = 9001usize;
    let words = v.div_ceil(32);
    let settings = [
        (0.0, 0, 1.0, 1.0),
        (0.0, 0, 1.0, 1.3),
        (0.8, 0, 1.0, 1.0),
        (1.0, 40, 1.0, 1.0),
        (0.9, 0, 0.9, 1.1),
        (1.2, 50, 0.8, 1.0),
    ];
    let rows = settings.len();
    let slots = 8;
    let lb = g.storage("logits", (4 * rows * v) as u64).unwrap();
    let sb = g.storage("seen", (slots * words * 4) as u64).unwrap();
    let ob = g.storage("out", (4 * rows) as u64).unwrap();
    let pb = g.storage("partial", rows as u64 * k::sample_partial_bytes(v)).unwrap();
    let rp = g
        .storage("rowp", (rows * std::mem::size_of::<k::RowParams>()) as u64)
        .unwrap();
    let step = step_buf(
        &g,
        Step {
            lm_t: rows as u32,
            ..Default::default()
        },
    );
    let ops = k::sample_rows(&g, v, &lb, &sb, &pb, &ob, &rp, &step);
    for trial in 0..6 {
        let logits = randn(&mut rng, rows * v, 3.0);
        let mut seen: Vec<Vec<bool>> = (0..slots)
            .map(|_| (0..v).map(|_| rng.uniform() < 0.05).collect())
            .collect();
        let mask: Vec<u32> = seen
            .iter()
            .flat_map(|s| {
                let mut m = vec![0u32; words];
                for (i, b) in s.iter().enumerate() {
                    if *b {
                        m[i / 32] |= 1 << (i % 32);
                    }
                }
                m
            })
            .collect();
        // Rows go to slots in a shuffled order, so a row's slot is not its index.
        let picks: Vec<cpu::SampleRow> = settings
            .iter()
            .enumerate()
            .map(|(r, &(temperature, top_k, top_p, pen))| cpu::SampleRow {
                params: SampleParams {
                    temperature,
                    top_k,
                    top_p,
                    repetition_penalty: pen,
                },
                u: rng.uniform(),
                slot: (r * 5 + trial) % slots,
            })
            .collect();
        let rowp: Vec<k::RowParams> = picks
            .iter()
            .map(|p| k::RowParams {
                temperature: p.params.temperature,
                top_k: p.params.top_k,
                top_p: p.params.top_p,
                penalty: p.params.repetition_penalty,
                u: p.u,
                slot: p.slot as u32,
                ..Default::default()
            })
            .collect();
        g.queue.write_buffer(&lb, 0, bytemuck::cast_slice(&logits));
        g.queue.write_buffer(&sb, 0, bytemuck::cast_slice(&mask));
        g.queue.write_buffer(&rp, 0, bytemuck::cast_slice(&rowp));
        k::run(&g, &[&ops[0], &ops[1]], rows as u32, rows as u32);
        let got: Vec<u32> = bytemuck::cast_slice(&g.download(&ob, (4 * rows) as u64).unwrap()).to_vec();
        let mut want = vec![0u32; rows];
        cpu::sample_rows(&mut want, &logits, &mut seen, &picks, v);
        assert_eq!(got, want, "trial {trial}");
        // Each pick joined its own slot's set, on both.
        let gs: Vec<u32> = bytemuck::cast_slice(&g.download(&sb, (slots * words * 4) as u64).unwrap()).to_vec();
        for (si, s) in seen.iter().enumerate() {
            for (i, b) in s.iter().enumerate() {
                assert_eq!(
                    (gs[si * words + i / 32] >> (i % 32)) & 1 == 1,
                    *b,
                    "trial {trial} slot {si} token {i}"
                );
            }
        }
    }
}

/// Every kernel's Rust parameter struct has the size naga lays out for the WGSL struct it mirrors (a whole
/// number of 16 bytes), and the WGSL struct is 4-byte scalars at consecutive offsets, so field order alone
/// decides the match. Every shader's `Params` is covered. Needs no device.
#[test]
fn params_match_wgsl() {
    use std::mem::size_of;
    let rust: &[(&str, &str, usize)] = &[
        ("embedding", "Step", size_of::<Step>()),
        ("embedding", "Params", size_of::<k::EmbeddingParams>()),
        ("rmsnorm_quant", "Params", size_of::<k::RmsnormQuantParams>()),
        ("matmul_ternary", "Params", size_of::<k::MatmulTernaryParams>()),
        ("rope", "Params", size_of::<k::RopeParams>()),
        ("attention", "Params", size_of::<k::AttentionParams>()),
        ("lm_head", "Params", size_of::<k::LmHeadParams>()),
        ("nll", "Params", size_of::<k::NllParams>()),
        ("sample", "Params", size_of::<k::SamplerParams>()),
        ("sample", "RowParams", size_of::<k::RowParams>()),
        ("relu2_mul", "Params", size_of::<k::Relu2MulParams>()),
        ("silu_mul", "Params", size_of::<k::Relu2MulParams>()),
        (
            "matmul_ternary_backward",
            "Params",
            size_of::<k::MatmulTernaryBackwardParams>(),
        ),
        ("lm_head_backward", "Params", size_of::<k::LmHeadBackwardParams>()),
        ("rope_backward", "Params", size_of::<k::RopeBackwardParams>()),
        ("attention_backward", "Params", size_of::<k::AttentionBackwardParams>()),
        ("lora", "Params", size_of::<k::LoraParams>()),
        ("adamw", "Params", size_of::<k::AdamwParams>()),
    ];
    for (kernel, _) in bitnode_shaders::ALL {
        assert!(
            rust.iter().any(|(k, s, _)| k == kernel && *s == "Params"),
            "{kernel}.wgsl's Params has no Rust struct in this test"
        );
    }
    for &(kernel, name, size) in rust {
        let src = bitnode_shaders::ALL.iter().find(|(k, _)| *k == kernel).unwrap().1;
        let module = wgpu::naga::front::wgsl::parse_str(src).unwrap();
        let mut layout = wgpu::naga::proc::Layouter::default();
        layout.update(module.to_ctx()).unwrap();
        let (h, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{kernel}.wgsl has no struct {name}"));
        let wgpu::naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("{kernel}.wgsl's {name} is not a struct");
        };
        assert_eq!(layout[h].size, *span);
        assert_eq!(
            *span as usize, size,
            "{kernel}.wgsl's {name}: WGSL {span} bytes, Rust {size}"
        );
        assert_eq!(size % 16, 0, "{kernel}.wgsl's {name} is not a whole number of 16 bytes");
        for (i, m) in members.iter().enumerate() {
            let what = format!("{kernel}.wgsl's {name}.{}", m.name.as_deref().unwrap_or("?"));
            assert_eq!(m.offset as usize, 4 * i, "{what} is not at 4 * its index");
            assert_eq!(layout[m.ty].size, 4, "{what} is not a 4-byte scalar");
        }
        assert_eq!(4 * members.len(), size, "{kernel}.wgsl's {name}: field count");
    }
}
