//! bitnode's packed ternary layout, shared by the CPU reference and the WGSL kernels.
//!
//! A row of `I` ternary weights is stored as `I/16` u32 words, 2 bits per weight, code = T + 1 in {0,1,2}.
//! Inside word `w`, element `e = 16w + 4s + k` sits at bits `8k + 2s`. That odd-looking order makes
//! `(word >> 2s) & 0x03030303` yield four bytes that line up with the four int8 activations of the packed
//! activation word `4w + s`, so the kernel feeds it straight into `dot4I8Packed`. The `-1` of the code is
//! removed afterwards with the per-token sum of the activations: `sum((c-1)x) = sum(cx) - sum(x)`.

/// Packs one row of ternary values (-1, 0, 1) into words.
pub fn pack_row(t: &[i8], out: &mut Vec<u32>) {
    debug_assert!(t.len().is_multiple_of(16));
    for chunk in t.chunks(16) {
        let mut w = 0u32;
        for s in 0..4 {
            for k in 0..4 {
                let code = (chunk[4 * s + k] + 1) as u32 & 3;
                w |= code << (8 * k + 2 * s);
            }
        }
        out.push(w);
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
