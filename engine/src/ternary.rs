//! bitnode's packed ternary layout, shared by the CPU reference and the WGSL kernels.
//!
//! A row of `I` ternary weights is stored as `I/16` u32 words, 2 bits per weight, code = T + 1 in {0,1,2}.
//! Inside word `w`, element `e = 16w + 4s + k` sits at bits `8k + 2s`. That odd-looking order makes
//! `(word >> 2s) & 0x03030303` yield four bytes that line up with the four int8 activations of the packed
//! activation word `4w + s`, so the kernel feeds it straight into `dot4I8Packed`. The `-1` of the code is
//! removed afterwards with the per-token sum of the activations: `sum((c-1)x) = sum(cx) - sum(x)`.

/// Packs one row of ternary values (-1, 0, 1) into words.
pub fn pack_row(t: &[i8], out: &mut Vec<u32>) {
    let at = out.len();
    out.resize(at + t.len() / 16, 0);
    pack_row_into(t, &mut out[at..]);
}

/// Packs one row of ternary values (-1, 0, 1) into `out` (`t.len()/16` words).
pub fn pack_row_into(t: &[i8], out: &mut [u32]) {
    debug_assert!(t.len().is_multiple_of(16));
    for (chunk, o) in t.chunks(16).zip(out.iter_mut()) {
        let mut w = 0u32;
        for s in 0..4 {
            for k in 0..4 {
                let code = (chunk[4 * s + k] + 1) as u32 & 3;
                w |= code << (8 * k + 2 * s);
            }
        }
        *o = w;
    }
}

/// The ternary value of element `e` of a packed row.
#[inline]
pub fn get(row: &[u32], e: usize) -> i8 {
    let w = row[e / 16];
    let r = e % 16;
    let (s, k) = (r / 4, r % 4);
    (((w >> (8 * k + 2 * s)) & 3) as i8) - 1
}

/// Unpacks Hugging Face's `pack_weights` layout: uint8 `[out/4, in]`, byte `[r, c]` holds `T[r + i*out/4, c]`
/// in bits `2i..2i+1`. Returns the ternary value of (row, col).
#[inline]
pub fn hf_get(packed: &[u8], out: usize, inp: usize, row: usize, col: usize) -> i8 {
    let r4 = out / 4;
    let (i, r) = (row / r4, row % r4);
    (((packed[r * inp + col] >> (2 * i)) & 3) as i8) - 1
}

/// Converts packed rows [r0, r1) of Hugging Face's layout (see [`hf_get`]) to bitnode's words, a word at a
/// time instead of an element at a time: packed row `r` holds output rows `r + i*out/4` in its bit pairs
/// `2i`, and both layouts store the code T+1, so each output word is four shifted and masked 32-bit loads
/// of the packed bytes. `groups[i]` receives the words of output rows `i*out/4 + r0 .. i*out/4 + r1`.
/// Returns the first (row, col), in row-major order, that holds the invalid code 3 (the words written
/// for it are garbage then, and the caller refuses the tensor).
pub fn hf_rows_to_words(
    packed: &[u8],
    out: usize,
    inp: usize,
    r0: usize,
    r1: usize,
    groups: [&mut [u32]; 4],
) -> Option<(usize, usize)> {
    const M: u32 = 0x0303_0303;
    let wpr = inp / 16;
    let [g0, g1, g2, g3] = groups;
    let mut first_bad: Option<(usize, usize)> = None;
    for r in r0..r1 {
        let src = &packed[r * inp..(r + 1) * inp];
        let o = (r - r0) * wpr;
        let (d0, d1, d2, d3) = (
            &mut g0[o..o + wpr],
            &mut g1[o..o + wpr],
            &mut g2[o..o + wpr],
            &mut g3[o..o + wpr],
        );
        let mut bad = 0u32;
        for (w, b) in src.chunks_exact(16).enumerate() {
            let u = |k: usize| u32::from_le_bytes([b[k], b[k + 1], b[k + 2], b[k + 3]]);
            let (u0, u1, u2, u3) = (u(0), u(4), u(8), u(12));
            // Bits 2i and 2i+1 of a byte both set: code 3 in pair i.
            bad |= (u0 & (u0 >> 1)) | (u1 & (u1 >> 1)) | (u2 & (u2 >> 1)) | (u3 & (u3 >> 1));
            let word = |sh: u32| {
                ((u0 >> sh) & M) | (((u1 >> sh) & M) << 2) | (((u2 >> sh) & M) << 4) | (((u3 >> sh) & M) << 6)
            };
            d0[w] = word(0);
            d1[w] = word(2);
            d2[w] = word(4);
            d3[w] = word(6);
        }
        if bad & 0x5555_5555 != 0 {
            let r4 = out / 4;
            for i in 0..4 {
                if let Some(c) = src.iter().position(|&x| (x >> (2 * i)) & 3 == 3) {
                    let at = (i * r4 + r, c);
                    first_bad = Some(first_bad.map_or(at, |b| b.min(at)));
                }
            }
        }
    }
    first_bad
}

/// Packs in Hugging Face's layout (used by `model synth` and tests).
pub fn hf_pack(t: &[i8], out: usize, inp: usize) -> Vec<u8> {
    let r4 = out / 4;
    let mut p = vec![0u8; r4 * inp];
    for row in 0..out {
        let (i, r) = (row / r4, row % r4);
        for c in 0..inp {
            p[r * inp + c] |= (((t[row * inp + c] + 1) as u8) & 3) << (2 * i);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn pack_roundtrip() {
        let t: Vec<i8> = (0..64).map(|i| ((i * 7 + 3) % 3) as i8 - 1).collect();
        let mut words = vec![];
        pack_row(&t, &mut words);
        assert_eq!(words.len(), 4);
        for (e, v) in t.iter().enumerate() {
            assert_eq!(get(&words, e), *v);
        }
        let hf = hf_pack(&t, 4, 16);
        for r in 0..4 {
            for c in 0..16 {
                assert_eq!(hf_get(&hf, 4, 16, r, c), t[r * 16 + c]);
            }
        }
    }
}
