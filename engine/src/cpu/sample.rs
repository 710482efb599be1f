/// Sampling settings, in the order transformers applies its logits processors:
/// repetition penalty, temperature, top-k, top-p, then a draw.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: u32,
    /// 1.0 means off.
    pub top_p: f32,
    /// 1.0 means off. A seen token's logit l becomes l/penalty if l > 0, else l*penalty.
    pub repetition_penalty: f32,
}

impl Default for SampleParams {
    fn default() -> Self {
        SampleParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SampleParams {
    pub fn greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Picks one token from `logits` [V]. `seen[i]` marks tokens the penalty applies to; `u` in [0, 1) is the
/// seeded uniform draw.
///
/// Kept set: the top-k keeps every token whose value is at least the k-th largest (ties kept); the top-p then
/// keeps the tokens whose value is at least the highest threshold at which the kept probability mass still
/// reaches `p` (HF's "smallest set with mass >= p", ties kept). The draw walks the kept tokens in id order
/// until the running mass exceeds `u * total`. The WGSL kernel finds the same thresholds by bisection.
pub fn sample(logits: &[f32], seen: &[bool], params: &SampleParams, u: f32) -> u32 {
    let pen = params.repetition_penalty;
    let val = |i: usize| -> f32 {
        let l = logits[i];
        if pen != 1.0 && seen[i] {
            if l > 0.0 {
                l / pen
            } else {
                l * pen
            }
        } else {
            l
        }
    };
    let v = logits.len();
    if params.greedy() {
        let mut best = 0;
        for i in 1..v {
            if val(i) > val(best) {
                best = i;
            }
        }
        return best as u32;
    }
    let vals: Vec<f32> = (0..v).map(|i| val(i) / params.temperature).collect();
    let max = vals.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    let mut kept = vec![true; v];
    if params.top_k > 0 && (params.top_k as usize) < v {
        let mut sorted = vals.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let thr = sorted[params.top_k as usize - 1];
        for i in 0..v {
            kept[i] = vals[i] >= thr;
        }
    }
    let w: Vec<f32> = vals.iter().map(|x| (x - max).exp()).collect();
    if params.top_p < 1.0 {
        let total: f32 = (0..v).filter(|&i| kept[i]).map(|i| w[i]).sum();
        let mut order: Vec<usize> = (0..v).filter(|&i| kept[i]).collect();
        order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));
        let target = params.top_p * total;
        let mut acc = 0f32;
        let mut thr = f32::NEG_INFINITY;
        let mut j = 0;
        while j < order.len() {
            // Take a whole group of tied values at once: ties are kept or dropped together.
            let tv = vals[order[j]];
            while j < order.len() && vals[order[j]] == tv {
                acc += w[order[j]];
                j += 1;
            }
            thr = tv;
            if acc >= target {
                break;
            }
        }
        for i in 0..v {
            kept[i] = kept[i] && vals[i] >= thr;
        }
    }
    let total: f32 = (0..v).filter(|&i| kept[i]).map(|i| w[i]).sum();
    let target = u * total;
    let mut acc = 0f32;
    let mut last = 0;
    for i in 0..v {
        if kept[i] {
            acc += w[i];
            last = i;
            if acc > target {
                return i as u32;
            }
        }
    }
    last as u32
}

/// One sampled row of a batch step: its settings, its uniform draw, and its sequence's repetition set.
#[derive(Debug, Clone, Copy)]
pub struct SampleRow {
    pub params: SampleParams,
    pub u: f32,
    pub slot: usize,
}

/// `sample` for each row of logits [R, V] with its own settings (the twin of `sample_rows` in sample.wgsl):
/// out[r] is row r's pick, which is then added to its slot's seen set (`seen[slot]`), as the kernel does.
pub fn sample_rows(out: &mut [u32], logits: &[f32], seen: &mut [Vec<bool>], rows: &[SampleRow], v: usize) {
    for (r, row) in rows.iter().enumerate() {
        let set = &mut seen[row.slot];
        let t = sample(&logits[r * v..(r + 1) * v], set, &row.params, row.u);
        if let Some(s) = set.get_mut(t as usize) {
            *s = true;
        }
        out[r] = t;
    }
}
