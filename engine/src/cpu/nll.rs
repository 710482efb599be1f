/// Negative log-likelihood of each target: `nll[t] = logsumexp(logits[t]) - logits[t, target[t]]`.
/// nll: [T]; logits: [T, V]; targets: [T].
pub fn nll(out: &mut [f32], logits: &[f32], targets: &[u32], v: usize) {
    for (t, &tg) in targets.iter().enumerate() {
        let row = &logits[t * v..(t + 1) * v];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
        let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
        out[t] = sum.ln() + max - row[tg as usize];
    }
}
