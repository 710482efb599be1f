//! Every backward of the CPU reference against central finite differences of its forward, on random inputs.
//! The loss is `L = sum(dy * f(x))` for a random `dy`, so `dL/dx` is what the backward returns for `dy`.
use bitnode_engine::cpu;
use bitnode_engine::model::TernaryLinear;
use bitnode_engine::rng::Rng;
use bitnode_engine::ternary;
use bitnode_tests::randn;

/// Central differences of `loss` at `x`, one coordinate at a time.
fn numeric(x: &[f32], h: f32, mut loss: impl FnMut(&[f32]) -> f64) -> Vec<f32> {
    let mut xs = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xs[i];
            xs[i] = x0 + h;
            let up = loss(&xs);
            xs[i] = x0 - h;
            let down = loss(&xs);
            xs[i] = x0;
            ((up - down) / (2.0 * h as f64)) as f32
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// ||analytic - numeric|| / ||numeric||, with the failing index for the message.
fn check(name: &str, analytic: &[f32], numeric: &[f32], tol: f64) {
    assert_eq!(analytic.len(), numeric.len());
    let err: f64 = analytic
        .iter()
        .zip(numeric)
        .map(|(a, n)| ((a - n) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = numeric
        .iter()
        .map(|n| (*n as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    let worst = analytic
        .iter()
        .zip(numeric)
        .enumerate()
        .max_by(|a, b| (a.1 .0 - a.1 .1).abs().total_cmp(&(b.1 .0 - b.1 .1).abs()))
        .map(|(i, (a, n))| format!("index {i}: analytic {a} numeric {n}"))
        .unwrap_or_default();
    assert!(err / norm < tol, "{name}: relative error {:.2e} ({worst})", err / norm);
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let mut rng = Rng::new(11);
    let (t, c, eps) = (3, 16, 1e-5);
    let x = randn(&mut rng, t * c, 1.0);
    let w = randn(&mut rng, c, 1.0);
    let dy = randn(&mut rng, t * c, 1.0);
    let mut dx = vec![0f32; t * c];
    cpu::rmsnorm_backward(&mut dx, &dy, &x, &w, eps, t, c);
    let num = numeric(&x, 1e-2, |xs| {
        let mut y = vec![0f32; t * c];
        cpu::rmsnorm(&mut y, xs, &w, eps, t, c);
        dot(&y, &dy)
    });
    check("rmsnorm dx", &dx, &num, 1e-3);
}

#[test]
fn rope_backward_matches_finite_differences() {
    let mut rng = Rng::new(12);
    let (t, nh, hd) = (4, 3, 8);
    let (cos, sin) = cpu::rope_table(10000.0, hd, 16);
    let pos = [0usize, 3, 7, 15];
    let x = randn(&mut rng, t * nh * hd, 1.0);
    let dy = randn(&mut rng, t * nh * hd, 1.0);
    let mut dx = dy.clone();
    cpu::rope_backward(&mut dx, &pos, &cos, &sin, nh, hd);
    let num = numeric(&x, 1e-2, |xs| {
        let mut y = xs.to_vec();
        cpu::rope(&mut y, &pos, &cos, &sin, nh, hd);
        dot(&y, &dy)
    });
    check("rope dx", &dx, &num, 1e-3);
}

#[test]
fn relu2_mul_backward_matches_finite_differences() {
    let mut rng = Rng::new(13);
    let n = 64;
    // Keep gate values away from the kink at 0, where differences straddle two branches.
    let g: Vec<f32> = randn(&mut rng, n, 1.0)
        .iter()
        .map(|v| if v.abs() < 0.1 { v + 0.3 } else { *v })
        .collect();
    let u = randn(&mut rng, n, 1.0);
    let dy = randn(&mut rng, n, 1.0);
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    cpu::relu2_mul_backward(&mut dg, &mut du, &dy, &g, &u);
    let f = |g: &[f32], u: &[f32]| {
        let mut o = vec![0f32; n];
        cpu::relu2_mul(&mut o, g, u);
        dot(&o, &dy)
    };
    check("relu2 dg", &dg, &numeric(&g, 1e-3, |gs| f(gs, &u)), 1e-3);
    check("relu2 du", &du, &numeric(&u, 1e-3, |us| f(&g, us)), 1e-3);
}

#[test]
fn silu_mul_backward_matches_finite_differences() {
    let mut rng = Rng::new(15);
    let n = 64;
    // Wide gate values: the tails, where sigmoid saturates, are where a careless formula overflows.
    let g: Vec<f32> = randn(&mut rng, n, 3.0);
    let u = randn(&mut rng, n, 1.0);
    let dy = randn(&mut rng, n, 1.0);
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    cpu::silu_mul_backward(&mut dg, &mut du, &dy, &g, &u);
    let f = |g: &[f32], u: &[f32]| {
        let mut o = vec![0f32; n];
        cpu::silu_mul(&mut o, g, u);
        dot(&o, &dy)
    };
    check("silu dg", &dg, &numeric(&g, 1e-3, |gs| f(gs, &u)), 1e-3);
    check("silu du", &du, &numeric(&u, 1e-3, |us| f(&g, us)), 1e-3);
    // Far out in the tails the product is finite and the sigmoid exact at its limits.
    let (mut o, big) = (vec![0f32; 2], [-200.0f32, 200.0]);
    cpu::silu_mul(&mut o, &big, &[1.0, 1.0]);
    assert_eq!(o, vec![0.0, 200.0]);
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = Rng::new(14);
    let (t, nh, nkv, hd) = (5, 4, 2, 8);
    let q = randn(&mut rng, t * nh * hd, 0.7);
    let k = randn(&mut rng, nkv * t * hd, 0.7);
    let v = randn(&mut rng, nkv * t * hd, 1.0);
    let dy = randn(&mut rng, t * nh * hd, 1.0);
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    cpu::attention_backward(&mut dq, &mut dk, &mut dv, &dy, &q, &k, &v, t, nh, nkv, hd);
    let f = |q: &[f32], k: &[f32], v: &[f32]| {
        let mut o = vec![0f32; t * nh * hd];
        cpu::attention(&mut o, q, k, v, 0, t, nh, nkv, hd, t);
        dot(&o, &dy)
    };
    check("attention dq", &dq, &numeric(&q, 1e-2, |x| f(x, &k, &v)), 2e-3);
    check("attention dk", &dk, &numeric(&k, 1e-2, |x| f(&q, x, &v)), 2e-3);
    check("attention dv", &dv, &numeric(&v, 1e-2, |x| f(&q, &k, x)), 2e-3);
}

#[test]
fn lm_head_and_nll_backward_match_finite_differences() {
    let mut rng = Rng::new(15);
    let (t, c, v) = (3, 12, 20);
    let x = randn(&mut rng, t * c, 1.0);
    let w = randn(&mut rng, v * c, 0.5);
    let targets = [3u32, 19, 0];
    // Mean over predicted positions, with the middle one ignored (a prompt token).
    let dnll = [0.5f32, 0.0, 0.5];
    let loss = |x: &[f32]| {
        let mut logits = vec![0f32; t * v];
        cpu::lm_head(&mut logits, x, &w, t, c, v);
        let mut n = vec![0f32; t];
        cpu::nll(&mut n, &logits, &targets, v);
        dot(&n, &dnll)
    };
    let mut logits = vec![0f32; t * v];
    cpu::lm_head(&mut logits, &x, &w, t, c, v);
    let mut dlogits = vec![0f32; t * v];
    cpu::nll_backward(&mut dlogits, &logits, &targets, &dnll, v);
    assert!(
        dlogits[v..2 * v].iter().all(|d| *d == 0.0),
        "ignored position gets no gradient"
    );
    let num_logits = numeric(&logits, 1e-2, |l| {
        let mut n = vec![0f32; t];
        cpu::nll(&mut n, l, &targets, v);
        dot(&n, &dnll)
    });
    check("nll dlogits", &dlogits, &num_logits, 1e-3);
    let mut dx = vec![0f32; t * c];
    cpu::lm_head_backward(&mut dx, &dlogits, &w, t, c, v);
    check("lm_head dx", &dx, &numeric(&x, 1e-2, loss), 1e-3);
}

#[test]
fn ternary_backward_is_the_straight_through_transpose() {
    let mut rng = Rng::new(16);
    let (t, o, i) = (3, 24, 32);
    let mut words = vec![];
    let mut dense = vec![0f32; o * i];
    let scale = 0.37f32;
    for r in 0..o {
        let row: Vec<i8> = (0..i).map(|_| (rng.next_u64() % 3) as i8 - 1).collect();
        for (c, v) in row.iter().enumerate() {
            dense[r * i + c] = *v as f32 * scale;
        }
        ternary::pack_row(&row, &mut words);
    }
    let w = TernaryLinear {
        out: o,
        inp: i,
        words,
        scale,
    };
    let x = randn(&mut rng, t * i, 1.0);
    let dy = randn(&mut rng, t * o, 1.0);
    let mut dx = vec![0f32; t * i];
    cpu::matmul_ternary_backward(&mut dx, &dy, &w, t);
    // The STE surrogate: the dense y = W_eff . x, differentiated numerically.
    let num = numeric(&x, 1e-2, |xs| {
        let mut y = vec![0f32; t * o];
        for ti in 0..t {
            for r in 0..o {
                y[ti * o + r] = (0..i).map(|c| dense[r * i + c] * xs[ti * i + c]).sum();
            }
        }
        dot(&y, &dy)
    });
    check("ternary dx", &dx, &num, 1e-4);
    // And the quantized forward agrees with the surrogate up to activation rounding, so the estimator
    // differentiates the function the model computes.
    let mut q = vec![0i8; t * i];
    let mut s = vec![0f32; t];
    cpu::act_quant(&mut q, &mut s, &x, t, i);
    let mut yq = vec![0f32; t * o];
    cpu::matmul_ternary(&mut yq, &q, &s, &w, t);
    let yd: Vec<f32> = (0..t * o)
        .map(|k| (0..i).map(|c| dense[(k % o) * i + c] * x[(k / o) * i + c]).sum())
        .collect();
    check("quantized vs dense forward", &yq, &yd, 2e-2);
}

#[test]
fn lora_backward_matches_finite_differences() {
    let mut rng = Rng::new(17);
    let (t, i, o, r, scale) = (3, 10, 7, 4, 2.0f32);
    let x = randn(&mut rng, t * i, 1.0);
    let a = randn(&mut rng, r * i, 0.5);
    let b = randn(&mut rng, o * r, 0.5);
    let dy = randn(&mut rng, t * o, 1.0);
    let f = |x: &[f32], a: &[f32], b: &[f32]| {
        let mut y = vec![0f32; t * o];
        let mut h = vec![0f32; t * r];
        cpu::lora(&mut y, &mut h, x, a, b, scale, t, i, o, r);
        dot(&y, &dy)
    };
    let mut y = vec![0f32; t * o];
    let mut h = vec![0f32; t * r];
    cpu::lora(&mut y, &mut h, &x, &a, &b, scale, t, i, o, r);
    let (mut dx, mut da, mut db) = (vec![0f32; t * i], vec![0f32; r * i], vec![0f32; o * r]);
    cpu::lora_backward(&mut dx, &mut da, &mut db, &dy, &x, &h, &a, &b, scale, t, i, o, r);
    check("lora dx", &dx, &numeric(&x, 1e-2, |v| f(v, &a, &b)), 1e-3);
    check("lora dA", &da, &numeric(&a, 1e-2, |v| f(&x, v, &b)), 1e-3);
    check("lora dB", &db, &numeric(&b, 1e-2, |v| f(&x, &a, v)), 1e-3);
    // Parameter gradients accumulate across calls (micro-batches), as torch's .grad does.
    let db1 = db.clone();
    cpu::lora_backward(&mut dx, &mut da, &mut db, &dy, &x, &h, &a, &b, scale, t, i, o, r);
    check(
        "lora dB accumulates",
        &db,
        &db1.iter().map(|v| 2.0 * v).collect::<Vec<_>>(),
        1e-6,
    );
}

#[test]
fn adamw_follows_torch_for_two_steps() {
    // Two steps written out from torch's _single_tensor_adam (decoupled decay), in f64.
    let o = cpu::AdamW {
        lr: 0.01,
        weight_decay: 0.1,
        ..Default::default()
    };
    let p0 = [0.5f32, -1.25, 2.0, 0.0];
    let g1 = [0.3f32, -0.02, 1e-4, -2.0];
    let g2 = [-0.1f32, 0.05, 3e-4, -1.0];
    let (mut p, mut m, mut v) = (p0.to_vec(), vec![0f32; 4], vec![0f32; 4]);
    cpu::adamw(&mut p, &mut m, &mut v, &g1, &o, o.lr, 1);
    cpu::adamw(&mut p, &mut m, &mut v, &g2, &o, o.lr, 2);
    for k in 0..4 {
        let (mut pp, mut mm, mut vv) = (p0[k] as f64, 0f64, 0f64);
        for (step, g) in [(1, g1[k] as f64), (2, g2[k] as f64)] {
            pp *= 1.0 - o.lr * o.weight_decay;
            mm += (1.0 - o.beta1) * (g - mm);
            vv = vv * o.beta2 + (1.0 - o.beta2) * g * g;
            let bc1 = 1.0 - o.beta1.powi(step);
            let bc2 = 1.0 - o.beta2.powi(step);
            pp -= o.lr / bc1 * mm / (vv.sqrt() / bc2.sqrt() + o.eps);
        }
        assert!((p[k] as f64 - pp).abs() < 1e-6, "param {k}: {} vs {pp}", p[k]);
    }
    // Global-norm clipping as torch.nn.utils.clip_grad_norm_.
    let mut a = vec![3.0f32, 0.0];
    let mut b = vec![0.0f32, 4.0];
    let n = cpu::clip_grad_norm(&mut [&mut a, &mut b], 1.0);
    assert!((n - 5.0).abs() < 1e-6);
    assert!((a[0] - 0.6).abs() < 1e-6 && (b[1] - 0.8).abs() < 1e-6, "{a:?} {b:?}");
}
