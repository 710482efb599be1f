//! The LoRA branch PEFT adds to a targeted projection: `y += (alpha / r) * B . (A . x)`, where x is the
//! projection's unquantized input (after dropout, when it is on), A: [R, I], B: [O, R].

/// Forward: `h = A . x` (kept for the backward) and `y += scale * B . h`.
/// y: [T, O] (accumulated); h: [T, R] (assigned); x: [T, I]; a: [R, I]; b: [O, R].
#[allow(clippy::too_many_arguments)]
pub fn lora(
    y: &mut [f32],
    h: &mut [f32],
    x: &[f32],
    a: &[f32],
    b: &[f32],
    scale: f32,
    t: usize,
    i: usize,
    o: usize,
    r: usize,
) {
    for ti in 0..t {
        let xr = &x[ti * i..(ti + 1) * i];
        for ri in 0..r {
            h[ti * r + ri] = xr.iter().zip(&a[ri * i..(ri + 1) * i]).map(|(p, q)| p * q).sum();
        }
        for oi in 0..o {
            let s: f32 = (0..r).map(|ri| b[oi * r + ri] * h[ti * r + ri]).sum();
            y[ti * o + oi] += scale * s;
        }
    }
}

/// Backward. Gradients into parameters accumulate (micro-batches add up before the optimizer step);
/// the gradient into x accumulates too, because x also feeds the frozen projection beside this branch.
/// `dh = scale * B^T . dy`, `dB += scale * dy^T . h`, `dA += dh^T . x`, `dx += dh . A`.
/// dx: [T, I]; da: [R, I]; db: [O, R]; dy: [T, O]; x: [T, I]; h: [T, R]; a: [R, I]; b: [O, R].
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    dx: &mut [f32],
    da: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    h: &[f32],
    a: &[f32],
    b: &[f32],
    scale: f32,
    t: usize,
    i: usize,
    o: usize,
    r: usize,
) {
    let mut dh = vec![0f32; r];
    for ti in 0..t {
        let dyr = &dy[ti * o..(ti + 1) * o];
        for (ri, d) in dh.iter_mut().enumerate() {
            *d = scale * (0..o).map(|oi| b[oi * r + ri] * dyr[oi]).sum::<f32>();
        }
        for oi in 0..o {
            for ri in 0..r {
                db[oi * r + ri] += scale * dyr[oi] * h[ti * r + ri];
            }
        }
        let xr = &x[ti * i..(ti + 1) * i];
        for ri in 0..r {
            for ii in 0..i {
                da[ri * i + ii] += dh[ri] * xr[ii];
                dx[ti * i + ii] += dh[ri] * a[ri * i + ii];
            }
        }
    }
}
