//! torch.optim.AdamW, step for step as torch's single-tensor implementation computes it in float32:
//! decoupled decay first, then the moments (`exp_avg.lerp_(g, 1-beta1)`,
//! `exp_avg_sq = beta2*exp_avg_sq + (1-beta2)*g*g`), bias corrections in double precision as Python floats,
//! `denom = sqrt(exp_avg_sq) / sqrt(bc2) + eps`, `p -= (lr/bc1) * exp_avg / denom`.

#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    /// torch's defaults (note torch's AdamW weight decay default is 0.01).
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One optimizer step (`step` counts from 1) over a parameter tensor and its two moment buffers.
pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], o: &AdamW, lr: f64, step: u64) {
    let decay = (1.0 - lr * o.weight_decay) as f32;
    let bc1 = 1.0 - o.beta1.powi(step as i32);
    let bc2 = 1.0 - o.beta2.powi(step as i32);
    let step_size = (lr / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let (w1, b2, w2, eps) = (
        (1.0 - o.beta1) as f32,
        o.beta2 as f32,
        (1.0 - o.beta2) as f32,
        o.eps as f32,
    );
    for i in 0..p.len() {
        p[i] *= decay;
        // torch's lerp with weight < 0.5: start + weight * (end - start).
        m[i] += w1 * (g[i] - m[i]);
        v[i] = v[i] * b2 + w2 * g[i] * g[i];
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        p[i] += -step_size * (m[i] / denom);
    }
}

/// The global L2 norm over several gradient tensors, as torch computes it: the norm of the per-tensor norms.
pub fn grad_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f32 {
    grads
        .into_iter()
        .map(|g| {
            let n = g.iter().map(|x| x * x).sum::<f32>().sqrt();
            n * n
        })
        .sum::<f32>()
        .sqrt()
}

/// The sum of squares of one gradient tensor, as the device's `grad_sq_sum` takes it (f32).
pub fn grad_sq_sum(g: &[f32]) -> f32 {
    g.iter().map(|x| x * x).sum()
}

/// The device's `grad_clip` over per-tensor sums of squares: (coefficient, global norm), the norm taken
/// as torch does (the norm of the per-tensor norms), the coefficient 1 without `max_norm`.
pub fn grad_clip(sq: &[f32], max_norm: Option<f32>) -> (f32, f32) {
    let norm = sq
        .iter()
        .map(|&s| {
            let n = s.sqrt();
            n * n
        })
        .sum::<f32>()
        .sqrt();
    (max_norm.map_or(1.0, |m| clip_coef(norm, m)), norm)
}

/// The factor torch's clipping scales gradients by: `max_norm / (norm + 1e-6)`, at most 1.
pub fn clip_coef(norm: f32, max_norm: f32) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// `torch.nn.utils.clip_grad_norm_`: the global L2 norm over all gradients; when it exceeds `max_norm`, every
/// gradient is scaled by `max_norm / (norm + 1e-6)`. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let total = grad_norm(grads.iter().map(|g| &**g));
    let coef = clip_coef(total, max_norm);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= coef;
            }
        }
    }
    total
}
