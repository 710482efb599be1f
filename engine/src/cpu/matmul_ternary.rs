use crate::model::TernaryLinear;
use crate::ternary;

/// Ternary projection of quantized activations: `y[t, o] = (sum_i T[o, i] * q[t, i]) * scale / s[t]`.
/// The integer sum is exact; only the final scaling is floating point.
/// y: [T, O]; q: [T, I] int8; s: [T]; w: [O, I] packed.
pub fn matmul_ternary(y: &mut [f32], q: &[i8], s: &[f32], w: &TernaryLinear, t: usize) {
    let (o, inp) = (w.out, w.inp);
    for ti in 0..t {
        let x = &q[ti * inp..(ti + 1) * inp];
        for r in 0..o {
            let row = w.row(r);
            let mut acc = 0i32;
            for (e, xv) in x.iter().enumerate() {
                acc += ternary::get(row, e) as i32 * *xv as i32;
            }
            y[ti * o + r] = acc as f32 * w.scale / s[ti];
        }
    }
}

/// Backward of a frozen ternary projection with respect to its input. Both quantizers are straight-through
/// estimators, so the projection differentiates as the dense `y = W_eff . x` with `W_eff = T * scale`:
/// `dx = W_eff^T . dy`. The packed weights are read as they are and receive no gradient.
/// dx: [T, I] (assigned); dy: [T, O]; w: [O, I] packed.
pub fn matmul_ternary_backward(dx: &mut [f32], dy: &[f32], w: &TernaryLinear, t: usize) {
    let (o, inp) = (w.out, w.inp);
    for ti in 0..t {
        let d = &mut dx[ti * inp..(ti + 1) * inp];
        d.fill(0.0);
        for r in 0..o {
            let g = dy[ti * o + r] * w.scale;
            if g == 0.0 {
                continue;
            }
            let row = w.row(r);
            for (e, dv) in d.iter_mut().enumerate() {
                *dv += ternary::get(row, e) as f32 * g;
            }
        }
    }
}
