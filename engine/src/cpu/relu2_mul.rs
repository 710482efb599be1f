/// The BitNet gated MLP activation: `out = relu(g)^2 * u`.
/// out, g, u: [T, F].
pub fn relu2_mul(out: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, gv), uv) in out.iter_mut().zip(g).zip(u) {
        let r = gv.max(0.0);
        *o = r * r * uv;
    }
}

/// Backward of `relu2_mul`: `dg = 2 relu(g) u dout`, `du = relu(g)^2 dout`.
/// dg, du: [T, F] (assigned); dout, g, u: [T, F].
pub fn relu2_mul_backward(dg: &mut [f32], du: &mut [f32], dout: &[f32], g: &[f32], u: &[f32]) {
    for i in 0..dout.len() {
        let r = g[i].max(0.0);
        dg[i] = 2.0 * r * u[i] * dout[i];
        du[i] = r * r * dout[i];
    }
}
