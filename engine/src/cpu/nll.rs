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

/// Backward of `nll` (cross-entropy): `dlogits[t] = (softmax(logits[t]) - onehot(target[t])) * dnll[t]`.
/// A position the loss ignores (a prompt token, label -100 in transformers) has `dnll[t] = 0`; the mean over
/// predicted positions is folded into `dnll` by the caller.
/// dlogits: [T, V] (assigned); logits: [T, V]; targets, dnll: [T].
pub fn nll_backward(dlogits: &mut [f32], logits: &[f32], targets: &[u32], dnll: &[f32], v: usize) {
    for (t, &tg) in targets.iter().enumerate() {
        let row = &logits[t * v..(t + 1) * v];
        let d = &mut dlogits[t * v..(t + 1) * v];
        if dnll[t] == 0.0 {
            d.fill(0.0);
            continue;
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
        let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
        for (dv, x) in d.iter_mut().zip(row) {
            *dv = (x - max).exp() / sum * dnll[t];
        }
        d[tg as usize] -= dnll[t];
    }
}
