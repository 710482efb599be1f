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
