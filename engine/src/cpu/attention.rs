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

/// Backward of causal GQA attention over a whole sequence (training: `start = 0`, K/V laid out as the cache,
/// [NKV, T, HD]). The softmax is recomputed from q and k rather than stored, so training keeps no [NH, T, T]
/// tensor per layer. With `p = softmax(scale * q.k)` and `dp_j = dout . v_j`:
/// `ds_j = p_j (dp_j - sum_i p_i dp_i)`, `dq = scale * sum_j ds_j k_j`, `dk_j += scale * ds_j q`,
/// `dv_j += p_j dout`. dq is assigned; dk and dv are zeroed here and then accumulate over the NH/NKV query
/// heads that share each KV head.
/// dq: [T, NH, HD]; dk, dv: [NKV, T, HD]; dout, q: [T, NH, HD]; k, v: [NKV, T, HD].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let scale = (hd as f32).powf(-0.5);
    let group = nh / nkv;
    dk.fill(0.0);
    dv.fill(0.0);
    let mut p = vec![0f32; t];
    let mut dp = vec![0f32; t];
    for ti in 0..t {
        let n = ti + 1;
        for h in 0..nh {
            let kvh = h / group;
            let qo = (ti * nh + h) * hd;
            let qv = &q[qo..qo + hd];
            let dov = &dout[qo..qo + hd];
            let mut max = f32::NEG_INFINITY;
            for j in 0..n {
                let kv = &k[(kvh * t + j) * hd..(kvh * t + j + 1) * hd];
                p[j] = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(p[j]);
            }
            let mut sum = 0f32;
            for pj in p.iter_mut().take(n) {
                *pj = (*pj - max).exp();
                sum += *pj;
            }
            let mut pdp = 0f32;
            for j in 0..n {
                p[j] /= sum;
                let vv = &v[(kvh * t + j) * hd..(kvh * t + j + 1) * hd];
                dp[j] = dov.iter().zip(vv).map(|(a, b)| a * b).sum();
                pdp += p[j] * dp[j];
            }
            let dqv = &mut dq[qo..qo + hd];
            dqv.fill(0.0);
            for j in 0..n {
                let ds = p[j] * (dp[j] - pdp) * scale;
                let ko = (kvh * t + j) * hd;
                for d in 0..hd {
                    dqv[d] += ds * k[ko + d];
                    dk[ko + d] += ds * qv[d];
                    dv[ko + d] += p[j] * dov[d];
                }
            }
        }
    }
}

/// `attention` for a batch step: query row t (out, q: [T, NH, HD]) attends to positions 0..=pos of its own
/// slot of the caches [slots, NKV, P, HD], `rows[t]` = (slot, pos). Each row is exactly `attention` of one
/// query at `start = pos` over its slot, so a sequence gets the same bits in a batch as alone.
#[allow(clippy::too_many_arguments)]
pub fn attention_rows(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    rows: &[(usize, usize)],
    nh: usize,
    nkv: usize,
    hd: usize,
    p: usize,
) {
    let (row, per) = (nh * hd, nkv * p * hd);
    for (t, &(slot, pos)) in rows.iter().enumerate() {
        let cache = slot * per..(slot + 1) * per;
        attention(
            &mut out[t * row..(t + 1) * row],
            &q[t * row..(t + 1) * row],
            &k_cache[cache.clone()],
            &v_cache[cache],
            pos,
            1,
            nh,
            nkv,
            hd,
            p,
        );
    }
}
