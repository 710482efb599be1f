/// Per-token absmax int8 quantization of a projection input (transformers' ActQuant):
/// `s = 127 / max(|x|).clamp(1e-5)`, `q = clamp(round_half_even(x * s), -128, 127)`.
///
/// q: [T, C] int8, s: [T] (the multiplier, so x ~ q / s); x: [T, C].
pub fn act_quant(q: &mut [i8], s: &mut [f32], x: &[f32], t: usize, c: usize) {
    for i in 0..t {
        let row = &x[i * c..(i + 1) * c];
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
        let scale = 127.0f32 / max;
        s[i] = scale;
        for (o, v) in q[i * c..(i + 1) * c].iter_mut().zip(row) {
            *o = (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8;
        }
    }
}
