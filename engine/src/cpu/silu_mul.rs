/// The logistic function from `exp(-|x|)`, so that no exp overflows; the same formula as `sigmoid` in
/// common.wgsl.
pub fn sigmoid(x: f32) -> f32 {
    let e = (-x.abs()).exp();
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// The gated SiLU MLP activation of the 1bitLLM family: `out = silu(g) * u`, `silu(g) = g sigmoid(g)`.
/// out, g, u: [T, F].
pub fn silu_mul(out: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &gv), uv) in out.iter_mut().zip(g).zip(u) {
        *o = gv * sigmoid(gv) * uv;
    }
}

/// Backward of `silu_mul`: `dg = sigmoid(g) (1 + g (1 - sigmoid(g))) u dout`, `du = silu(g) dout`.
/// dg, du: [T, F] (assigned); dout, g, u: [T, F].
pub fn silu_mul_backward(dg: &mut [f32], du: &mut [f32], dout: &[f32], g: &[f32], u: &[f32]) {
    for i in 0..dout.len() {
        let x = g[i];
        let s = sigmoid(x);
        dg[i] = s * (1.0 + x * (1.0 - s)) * u[i] * dout[i];
        du[i] = x * s * dout[i];
    }
}
