/// The BitNet gated MLP activation: `out = relu(g)^2 * u`.
/// out, g, u: [T, F].
pub fn relu2_mul(out: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, gv), uv) in out.iter_mut().zip(g).zip(u) {
        let r = gv.max(0.0);
        *o = r * r * uv;
    }
}
