/// Causal grouped-query attention against a KV cache.
/// out: [T, NH, HD]; q: [T, NH, HD] (already rotated); k_cache, v_cache: [NKV, P, HD] holding every position
/// up to `start + T - 1`; query t sits at position `start + t` and sees positions 0..=start+t.
/// Softmax in f32 with the max subtracted, scaling HD^-0.5, as transformers' eager attention.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    start: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    p: usize,
) {
    let scale = (hd as f32).powf(-0.5);
    let group = nh / nkv;
    let mut scores = vec![0f32; start + t];
    for ti in 0..t {
        let n = start + ti + 1;
        for h in 0..nh {
            let kvh = h / group;
            let qv = &q[(ti * nh + h) * hd..(ti * nh + h + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for j in 0..n {
                let kv = &k_cache[(kvh * p + j) * hd..(kvh * p + j + 1) * hd];
                let d: f32 = qv.iter().zip(kv).map(|(a, b)| a * b).sum();
                scores[j] = d * scale;
                max = max.max(scores[j]);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut().take(n) {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let o = &mut out[(ti * nh + h) * hd..(ti * nh + h + 1) * hd];
            o.fill(0.0);
            for (j, sc) in scores.iter().enumerate().take(n) {
                let vv = &v_cache[(kvh * p + j) * hd..(kvh * p + j + 1) * hd];
                let w = sc / sum;
                for d in 0..hd {
                    o[d] += w * vv[d];
                }
            }
        }
    }
}
