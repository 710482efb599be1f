//! `matmul_ternary` on the CPU with SIMD: `y[t, o] = (sum_i T[o, i] q[t, i]) * scale / s[t]`, the same
//! integer sum as the reference `cpu::matmul_ternary` (so the same bits), from the same packed weights.
//!
//! bitnode's layout keeps element `16w + 4s + k` of a row at bits `8k + 2s` of word `w`, so
//! `(word >> 2s) & 0x03030303` gives the codes (T + 1) of elements `16w + 4s .. 16w + 4s + 3` as four bytes.
//! On AVX2, eight words (128 elements) are one 256-bit load; for each shift `s` the masked bytes are the
//! codes of elements `{16w + 4s + k}`, and the activations are laid out once per token in that order
//! ("shift-major", [`permute`]), so each shift is one `maddubs` (unsigned codes 0..2 times signed int8,
//! pairs summed in 16 bits: at most 2 x 2 x 128, no saturation) and one `madd` into 32-bit lanes. The +1 of
//! the codes is removed with the token's activation sum, as the GPU kernel does.
use crate::model::TernaryLinear;

/// Which code path ran (tests run each on the same inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Avx2,
    Portable,
}

/// The activations of one token in shift-major order per group of eight words: for group g and shift s,
/// the 32 bytes `x[128g + 16w + 4s + k]` for w in 0..8, k in 0..4. Only whole groups; the tail words are
/// read in place.
fn permute(x: &[i8], out: &mut Vec<i8>) {
    let groups = x.len() / 128;
    out.clear();
    out.resize(groups * 128, 0);
    for g in 0..groups {
        for s in 0..4 {
            for w in 0..8 {
                let src = 128 * g + 16 * w + 4 * s;
                let dst = 128 * g + 32 * s + 4 * w;
                out[dst..dst + 4].copy_from_slice(&x[src..src + 4]);
            }
        }
    }
}

/// The sum of codes times activations of the row's words `from..` (the scalar tail, and the portable path).
fn dot_codes(row: &[u32], x: &[i8], from: usize) -> i32 {
    let mut acc = 0i32;
    for (w, &word) in row.iter().enumerate().skip(from) {
        for s in 0..4 {
            for k in 0..4 {
                let code = ((word >> (8 * k + 2 * s)) & 3) as i32;
                acc += code * x[16 * w + 4 * s + k] as i32;
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_codes_avx2(row: &[u32], perm: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let groups = (perm.len() / 128).min(row.len() / 8);
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_si256();
    for g in 0..groups {
        // SAFETY: the row holds 8 words per whole group and `perm` 128 bytes per group (the caller slices
        // both to whole groups); unaligned loads.
        let (wv, x0, x1, x2, x3) = unsafe {
            let xs = perm.as_ptr().add(128 * g) as *const __m256i;
            (
                _mm256_loadu_si256(row.as_ptr().add(8 * g) as *const __m256i),
                _mm256_loadu_si256(xs),
                _mm256_loadu_si256(xs.add(1)),
                _mm256_loadu_si256(xs.add(2)),
                _mm256_loadu_si256(xs.add(3)),
            )
        };
        let c0 = _mm256_and_si256(wv, mask);
        let c1 = _mm256_and_si256(_mm256_srli_epi32(wv, 2), mask);
        let c2 = _mm256_and_si256(_mm256_srli_epi32(wv, 4), mask);
        let c3 = _mm256_and_si256(_mm256_srli_epi32(wv, 6), mask);
        let p0 = _mm256_maddubs_epi16(c0, x0);
        let p1 = _mm256_maddubs_epi16(c1, x1);
        let p2 = _mm256_maddubs_epi16(c2, x2);
        let p3 = _mm256_maddubs_epi16(c3, x3);
        // Two 16-bit sums of at most 1,024 each stay far from the i16 limit.
        let p01 = _mm256_add_epi16(p0, p1);
        let p23 = _mm256_add_epi16(p2, p3);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p01, ones));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p23, ones));
    }
    let lo = _mm256_castsi256_si128(acc);
    let hi = _mm256_extracti128_si256(acc, 1);
    let s = _mm_add_epi32(lo, hi);
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// The path `matmul_ternary` takes on this CPU.
pub fn path() -> Path {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            return Path::Avx2;
        }
    }
    Path::Portable
}

/// `cpu::matmul_ternary` on the fastest path this CPU has. y: [T, O]; q: [T, I] int8; s: [T].
pub fn matmul_ternary(y: &mut [f32], q: &[i8], s: &[f32], w: &TernaryLinear, t: usize) {
    matmul_ternary_on(path(), y, q, s, w, t)
}

/// `matmul_ternary` on the portable path, whatever the CPU (for tests and for CPUs without AVX2).
pub fn matmul_ternary_portable(y: &mut [f32], q: &[i8], s: &[f32], w: &TernaryLinear, t: usize) {
    matmul_ternary_on(Path::Portable, y, q, s, w, t)
}

/// `matmul_ternary` on a given path; `Path::Avx2` on a CPU without AVX2 falls back to the portable one.
pub fn matmul_ternary_on(p: Path, y: &mut [f32], q: &[i8], s: &[f32], w: &TernaryLinear, t: usize) {
    rows_on(p, y, w.out, q, s, w, t, 0..w.out);
}

/// Rows `rows` of the projection for `t` tokens into `y` ([T, stride]): row r of token ti at
/// `y[ti * stride + r - rows.start]`.
#[allow(clippy::too_many_arguments)]
fn rows_on(
    p: Path,
    y: &mut [f32],
    stride: usize,
    q: &[i8],
    s: &[f32],
    w: &TernaryLinear,
    t: usize,
    rows: std::ops::Range<usize>,
) {
    let inp = w.inp;
    let words = inp / 16;
    let avx2 = p == Path::Avx2 && path() == Path::Avx2;
    let mut perm = Vec::new();
    for ti in 0..t {
        let x = &q[ti * inp..(ti + 1) * inp];
        let qsum: i32 = x.iter().map(|&v| v as i32).sum();
        let whole = if avx2 {
            permute(x, &mut perm);
            perm.len() / 16
        } else {
            0
        };
        for r in rows.clone() {
            let row = &w.words[r * words..(r + 1) * words];
            let mut acc = dot_codes(row, x, whole);
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 was detected; `row` has `whole` words of whole groups and `perm` their bytes.
                acc += unsafe { dot_codes_avx2(&row[..whole], &perm) };
            }
            y[ti * stride + r - rows.start] = (acc - qsum) as f32 * w.scale / s[ti];
        }
    }
}

/// Multiply-adds below which one thread does the whole projection (a thread costs tens of microseconds).
const PARALLEL_MIN: usize = 1 << 21;

/// `matmul_ternary` on up to `threads` threads, each taking a range of rows (every output is computed
/// as on one thread, so the bits do not depend on the thread count).
pub fn matmul_ternary_threads(y: &mut [f32], q: &[i8], s: &[f32], w: &TernaryLinear, t: usize, threads: usize) {
    let (o, p) = (w.out, path());
    let threads = threads.clamp(1, o.max(1));
    if threads == 1 || t * o * w.inp < PARALLEL_MIN {
        return rows_on(p, y, o, q, s, w, t, 0..o);
    }
    let per = o.div_ceil(threads);
    let ranges: Vec<(usize, usize)> = (0..o).step_by(per).map(|a| (a, (a + per).min(o))).collect();
    let parts = crate::util::parallel_map(ranges, threads, |(a, b)| {
        let mut part = vec![0f32; t * (b - a)];
        rows_on(p, &mut part, b - a, q, s, w, t, a..b);
        (a, part)
    });
    for (a, part) in parts {
        let n = part.len() / t.max(1);
        for ti in 0..t {
            y[ti * o + a..ti * o + a + n].copy_from_slice(&part[ti * n..(ti + 1) * n]);
        }
    }
}
