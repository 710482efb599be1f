//! `lm_head` on the CPU with SIMD and threads, with the reference's bits: `logits[t, v] = sum_c x[t, c]
//! W[v, c]`, each sum taken in the reference's order (c ascending from -0.0, a multiply then an add, never
//! fused), eight vocabulary rows per AVX2 register. So the head is kept transposed ([C, V], [`transpose`]):
//! for each c, eight consecutive rows' weights are one load. Vocabulary blocks of 64 rows (192 KiB of
//! weights at C = 768) stay in the L2 cache across the tokens of a chunk; threads take blocks.

/// The head [V, C] as [C, V] (once, when the backend first needs it).
pub fn transpose(w: &[f32], v: usize, c: usize) -> Vec<f32> {
    let mut t = vec![0f32; v * c];
    for r in 0..v {
        for k in 0..c {
            t[k * v + r] = w[r * c + k];
        }
    }
    t
}

/// Rows per block (eight registers of eight).
const BLOCK: usize = 64;

/// Logits of rows `v0..v1` for every token, in the reference's summation order.
#[allow(clippy::too_many_arguments)]
fn block_scalar(out: &mut [f32], x: &[f32], wt: &[f32], t: usize, c: usize, v: usize, v0: usize, v1: usize) {
    for ti in 0..t {
        let xr = &x[ti * c..(ti + 1) * c];
        for r in v0..v1 {
            let mut acc = -0.0f32;
            for (k, &xv) in xr.iter().enumerate() {
                acc += xv * wt[k * v + r];
            }
            out[ti * (v1 - v0) + r - v0] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx2(out: &mut [f32], x: &[f32], wt: &[f32], t: usize, c: usize, v: usize, v0: usize) {
    use std::arch::x86_64::*;
    for ti in 0..t {
        let mut acc = [_mm256_set1_ps(-0.0); 8];
        for k in 0..c {
            let xb = _mm256_set1_ps(x[ti * c + k]);
            let row = &wt[k * v + v0..k * v + v0 + BLOCK];
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: `row` holds BLOCK = 64 floats; unaligned load of 8 of them.
                let w = unsafe { _mm256_loadu_ps(row.as_ptr().add(8 * j)) };
                *a = _mm256_add_ps(*a, _mm256_mul_ps(xb, w));
            }
        }
        for (j, a) in acc.iter().enumerate() {
            // SAFETY: `out` holds BLOCK floats per token.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(ti * BLOCK + 8 * j), *a) };
        }
    }
}

/// Logits of rows `v0..v1` into `out` ([T, v1 - v0]) on the given path.
#[allow(clippy::too_many_arguments)]
fn range(p: super::Path, out: &mut [f32], x: &[f32], wt: &[f32], t: usize, c: usize, v: usize, v0: usize, v1: usize) {
    #[cfg(target_arch = "x86_64")]
    if p == super::Path::Avx2 && super::matmul_ternary::path() == super::Path::Avx2 && v1 - v0 == BLOCK {
        // SAFETY: AVX2 was detected; the block is whole.
        unsafe { block_avx2(out, x, wt, t, c, v, v0) };
        return;
    }
    let _ = p;
    block_scalar(out, x, wt, t, c, v, v0, v1);
}

/// `cpu::lm_head` from the transposed head `wt` ([C, V]) on the given path and up to `threads` threads.
/// logits: [T, V]; x: [T, C].
#[allow(clippy::too_many_arguments)]
pub fn lm_head_on(
    p: super::Path,
    logits: &mut [f32],
    x: &[f32],
    wt: &[f32],
    t: usize,
    c: usize,
    v: usize,
    threads: usize,
) {
    let blocks: Vec<(usize, usize)> = (0..v).step_by(BLOCK).map(|a| (a, (a + BLOCK).min(v))).collect();
    // Each block is one task: the threads take the next block as they finish one.
    let parts = crate::util::parallel_map(blocks, threads, |(a, b)| {
        let mut out = vec![0f32; t * (b - a)];
        range(p, &mut out, x, wt, t, c, v, a, b);
        (a, b, out)
    });
    for (a, b, out) in parts {
        let n = b - a;
        for ti in 0..t {
            logits[ti * v + a..ti * v + b].copy_from_slice(&out[ti * n..(ti + 1) * n]);
        }
    }
}

/// [`lm_head_on`] on this CPU's fastest path.
pub fn lm_head(logits: &mut [f32], x: &[f32], wt: &[f32], t: usize, c: usize, v: usize, threads: usize) {
    lm_head_on(super::matmul_ternary::path(), logits, x, wt, t, c, v, threads)
}
