use crate::model::MappedMatrix;

/// Embedding gather: out[t] = E[tokens[t]].
/// out: [T, C]; E: [V, C].
pub fn embedding(out: &mut [f32], tokens: &[u32], e: &MappedMatrix) {
    let c = e.cols;
    for (t, &tok) in tokens.iter().enumerate() {
        e.row_f32(tok as usize, &mut out[t * c..(t + 1) * c]);
    }
}
