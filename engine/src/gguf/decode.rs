//! Tensor decoders: the ternary types into bitnode's 2-bit layout (`crate::ternary`) plus scale, and the
//! float and k-quant types into f32.
//!
//! Sources of each layout (details in the shared GGUF notes): TQ1_0/TQ2_0 from ggml `ggml-common.h` and
//! `ggml-quants.c` (`dequantize_row_tq{1,2}_0`); Q8_0/Q4_K/Q6_K from the same file
//! (`dequantize_row_q8_0`, `dequantize_row_q4_K`, `dequantize_row_q6_K`); I2_S from bitnet.cpp's converter
//! and `quantize_i2_s`.
use super::error::{GgufError, Result};
use super::reader::TensorInfo;
use super::types::GgmlType;
use half::{bf16, f16};

/// A ternary projection decoded into bitnode's layout: `rows` x `cols` values `T` in {-1, 0, 1}, with
/// effective weight `T * scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct TernaryTensor {
    /// Output features (GGUF ne[1], or the product of ne[1..]).
    pub rows: usize,
    /// Input features (GGUF ne[0], the contiguous axis).
    pub cols: usize,
    /// `rows * cols / 16` words, row-major, in `crate::ternary`'s packing.
    pub words: Vec<u32>,
    pub scale: TernaryScale,
}

/// The scale of a [`TernaryTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum TernaryScale {
    /// One scale for the whole tensor: I2_S's float32, a float tensor's magnitude, or the fp16 `d` that every
    /// TQ block with a nonzero value shares (the common case: converters quantize ternary-times-s weights,
    /// so each block's `d = max|x|` is that s).
    Single(f32),
    /// TQ blocks whose `d` differ: one scale per `block` (256) consecutive elements of a row, row-major,
    /// `rows * cols / block` of them. bitnode's kernels take one scale per tensor, so a model with such a
    /// tensor cannot run on them yet; the scales are returned rather than averaged away so that the loader
    /// can refuse the tensor with that reason, or a later kernel can use them.
    PerBlock { block: usize, scales: Vec<f32> },
}

impl TernaryTensor {
    /// The ternary value at (row, col).
    pub fn get(&self, row: usize, col: usize) -> i8 {
        crate::ternary::get(&self.words[row * self.cols / 16..(row + 1) * self.cols / 16], col)
    }
    /// The scale that applies at (row, col).
    pub fn scale_at(&self, row: usize, col: usize) -> f32 {
        match &self.scale {
            TernaryScale::Single(s) => *s,
            TernaryScale::PerBlock { block, scales } => scales[(row * self.cols + col) / block],
        }
    }
    /// The engine's form of the projection. Refused for per-block scales, which bitnode's kernels cannot
    /// apply yet (they take one scale per tensor); `name` is the tensor's, for the message.
    pub fn into_linear(self, name: &str) -> Result<crate::model::TernaryLinear> {
        match self.scale {
            TernaryScale::Single(scale) => Ok(crate::model::TernaryLinear {
                out: self.rows,
                inp: self.cols,
                words: self.words,
                scale,
            }),
            TernaryScale::PerBlock { scales, .. } => {
                let mut distinct: Vec<u32> = scales.iter().filter(|s| **s != 0.0).map(|s| s.to_bits()).collect();
                distinct.sort_unstable();
                distinct.dedup();
                Err(GgufError::BadData {
                    tensor: name.to_string(),
                    msg: format!(
                        "its blocks have {} different scales; bitnode's kernels take one scale per tensor",
                        distinct.len()
                    ),
                })
            }
        }
    }
    /// The effective weights, row-major (tests and offline twins).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.push(f32::from(self.get(r, c)) * self.scale_at(r, c));
            }
        }
        out
    }
}

fn bad(t: &TensorInfo, msg: impl Into<String>) -> GgufError {
    GgufError::BadData {
        tensor: t.name.clone(),
        msg: msg.into(),
    }
}

fn check_len(t: &TensorInfo, data: &[u8]) -> Result<()> {
    if data.len() != t.nbytes {
        return Err(bad(
            t,
            format!("{} data bytes given, the tensor has {}", data.len(), t.nbytes),
        ));
    }
    Ok(())
}

/// Code 1 (value 0) in every pair of a word.
const ZERO_WORD: u32 = 0x5555_5555;
const LOW2: u32 = 0x0303_0303;

/// The word of 16 codes `codes[i]` in {0,1,2} (`crate::ternary`: element `4s + k` at bits `8k + 2s`).
fn pack_codes(codes: &[u8]) -> u32 {
    let mut w = 0u32;
    for (i, &c) in codes.iter().enumerate().take(16) {
        w |= u32::from(c & 3) << (8 * (i % 4) + 2 * (i / 4));
    }
    w
}

/// Maps code c to 2 - c in every pair (the value's sign flips; code 1 stays): used for a negative scale.
fn negate_word(w: u32) -> u32 {
    w ^ ((!w & ZERO_WORD) << 1)
}

/// Converts a 128-element group stored as 32 bytes whose byte `j` holds element `32q + j` of the group at
/// bit `shift[q]` (the layout TQ2_0 and I2_S share, up to the shifts) into 8 words. Returns whether any
/// code is 3, which neither type writes.
///
/// Word `2q + h` holds elements `32q + 16h + i`, i = 4s + k; byte k of the little-endian u32 at
/// `16h + 4s` is element `32q + 16h + 4s + k`, so `(u >> shift) & 0x03030303` puts its four codes in the
/// bytes where the word wants them, and the word is the four such terms shifted by `2s`.
fn group128_to_words(b: &[u8], shift: [u32; 4], out: &mut [u32]) -> bool {
    let mut bad = 0u32;
    for (q, &sh) in shift.iter().enumerate() {
        for h in 0..2 {
            let mut w = 0u32;
            for s in 0..4 {
                let at = 16 * h + 4 * s;
                let u = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                let x = (u >> sh) & LOW2;
                bad |= x & (x >> 1);
                w |= x << (2 * s);
            }
            out[2 * q + h] = w;
        }
    }
    bad & 0x0101_0101 != 0
}

/// Rows and columns of a projection, refusing shapes bitnode's layout cannot hold.
fn ternary_shape(t: &TensorInfo) -> Result<(usize, usize)> {
    let (rows, cols) = (t.n_rows(), t.row_len());
    if t.ne.len() > 2 {
        return Err(bad(t, format!("a projection must have 2 dimensions, ne = {:?}", t.ne)));
    }
    if cols % 16 != 0 {
        return Err(bad(
            t,
            format!("row length {cols} is not a multiple of 16 (bitnode's packing word)"),
        ));
    }
    Ok((rows, cols))
}

/// Collapses per-block scales to one when every block that holds a nonzero value has the same scale.
fn collapse(scales: Vec<f32>, active: &[bool], block: usize) -> TernaryScale {
    let mut it = scales.iter().zip(active).filter(|(_, &a)| a).map(|(s, _)| *s);
    match it.next() {
        None => TernaryScale::Single(0.0),
        Some(s0) if it.all(|s| s == s0) => TernaryScale::Single(s0),
        Some(_) => TernaryScale::PerBlock { block, scales },
    }
}

/// Applies a TQ block's fp16 `d` to its 16 words: a zero `d` zeroes the block (ggml's dequantizer gives 0
/// whatever the codes say), a negative one flips the codes so that the scale kept is |d|. Returns the
/// block's scale and whether it holds a nonzero value.
fn apply_block_scale(t: &TensorInfo, block: usize, d: [u8; 2], words: &mut [u32]) -> Result<(f32, bool)> {
    let d = f16::from_le_bytes(d).to_f32();
    if !d.is_finite() {
        return Err(bad(t, format!("block {block} has scale {d}")));
    }
    if d == 0.0 {
        words.fill(ZERO_WORD);
        return Ok((0.0, false));
    }
    if d < 0.0 {
        for w in words.iter_mut() {
            *w = negate_word(*w);
        }
    }
    Ok((d.abs(), words.iter().any(|&w| w != ZERO_WORD)))
}

/// TQ2_0 (ggml `block_tq2_0`: `qs[64]`, fp16 `d` last; element e at `qs[32*(e/128) + e%32]`, bits
/// `2*((e%128)/32)`, code = value + 1) into bitnode's layout.
pub fn tq2_0_to_ternary(t: &TensorInfo, data: &[u8]) -> Result<TernaryTensor> {
    expect_type(t, GgmlType::TQ2_0, "TQ2_0 ternary")?;
    check_len(t, data)?;
    let (rows, cols) = ternary_shape(t)?;
    let nblocks = t.n_elements / 256;
    let mut words = vec![0u32; t.n_elements / 16];
    let mut scales = Vec::with_capacity(nblocks);
    let mut active = Vec::with_capacity(nblocks);
    for (i, (blk, w)) in data.chunks_exact(66).zip(words.chunks_exact_mut(16)).enumerate() {
        for g in 0..2 {
            if group128_to_words(&blk[32 * g..32 * g + 32], [0, 2, 4, 6], &mut w[8 * g..8 * g + 8]) {
                return Err(bad_code(t, i, cols));
            }
        }
        let (s, a) = apply_block_scale(t, i, [blk[64], blk[65]], w)?;
        scales.push(s);
        active.push(a);
    }
    Ok(TernaryTensor {
        rows,
        cols,
        words,
        scale: collapse(scales, &active, 256),
    })
}

fn bad_code(t: &TensorInfo, block: usize, cols: usize) -> GgufError {
    let e = block * 256;
    bad(
        t,
        format!(
            "code 3 (not a ternary value) in the block at row {}, column {}",
            e / cols,
            e % cols
        ),
    )
}

/// The trit of code byte `b` at position n (most significant first): ggml's `((uint8_t)(b * 3^n) * 3) >> 8`.
fn trit(b: u8, n: u32) -> u8 {
    ((u16::from(b.wrapping_mul(3u8.pow(n))) * 3) >> 8) as u8
}

/// TQ1_0 (ggml `block_tq1_0`: `qs[48]`, `qh[4]`, fp16 `d` last; five base-3 codes per byte) into bitnode's
/// layout. Elements 0..160 are trit `e/32` of `qs[e%32]`; 160..240 trit `r/16` of `qs[32 + r%16]`
/// (r = e-160); 240..256 trit `r/4` of `qh[r%4]` (r = e-240). Every byte decodes to codes 0..2, so unlike
/// TQ2_0 there is no invalid code to refuse.
pub fn tq1_0_to_ternary(t: &TensorInfo, data: &[u8]) -> Result<TernaryTensor> {
    expect_type(t, GgmlType::TQ1_0, "TQ1_0 ternary")?;
    check_len(t, data)?;
    let (rows, cols) = ternary_shape(t)?;
    let nblocks = t.n_elements / 256;
    let mut words = vec![0u32; t.n_elements / 16];
    let mut scales = Vec::with_capacity(nblocks);
    let mut active = Vec::with_capacity(nblocks);
    let mut codes = [0u8; 256];
    for (i, (blk, w)) in data.chunks_exact(54).zip(words.chunks_exact_mut(16)).enumerate() {
        let (qs, qh) = (&blk[..48], &blk[48..52]);
        for (e, c) in codes.iter_mut().enumerate() {
            *c = match e {
                0..160 => trit(qs[e % 32], (e / 32) as u32),
                160..240 => trit(qs[32 + (e - 160) % 16], ((e - 160) / 16) as u32),
                _ => trit(qh[(e - 240) % 4], ((e - 240) / 4) as u32),
            };
        }
        for (o, ch) in w.iter_mut().zip(codes.chunks_exact(16)) {
            *o = pack_codes(ch);
        }
        let (s, a) = apply_block_scale(t, i, [blk[52], blk[53]], w)?;
        scales.push(s);
        active.push(a);
    }
    Ok(TernaryTensor {
        rows,
        cols,
        words,
        scale: collapse(scales, &active, 256),
    })
}

/// I2_S, bitnet.cpp's 2-bit type (id 36 in its files only), into bitnode's layout.
///
/// Layout: the tensor flattened row-major (ne[0] fastest) into n elements, n a multiple of 128; code =
/// value + 1. For 128-element block b and j in 0..32, byte `32b + j` holds elements `128b + j`,
/// `+32`, `+64`, `+96` at bits 6, 4, 2, 0 (high bits first). At byte n/4 a little-endian float32 scale for
/// the whole tensor follows, padded with 28 bytes (ignored here) to n/4 + 32.
///
/// This layout is inferred from bitnet.cpp's source (its converter's `quantize_to_i2_s`, `quantize_i2_s`
/// with the default `ACT_PARALLEL`, and its mat-mul reading the scale at `ne00*ne01/4`); it has not been
/// checked byte by byte against microsoft's published GGUF. bitnet.cpp builds since late 2025 can write
/// other interleavings (64-element groups on ARM, 4-row interleave without `ACT_PARALLEL`) that the file
/// does not record, and such a file would decode to wrong weights here.
pub fn i2s_to_ternary(t: &TensorInfo, data: &[u8]) -> Result<TernaryTensor> {
    expect_type(t, GgmlType::I2S, "I2_S ternary")?;
    check_len(t, data)?;
    let (rows, cols) = ternary_shape(t)?;
    let n = t.n_elements;
    let mut words = vec![0u32; n / 16];
    let packed = &data[..n / 4];
    for (b, (g, w)) in packed.chunks_exact(32).zip(words.chunks_exact_mut(8)).enumerate() {
        if group128_to_words(g, [6, 4, 2, 0], w) {
            let e = b * 128;
            return Err(bad(
                t,
                format!(
                    "code 3 (not a ternary value) in the block at row {}, column {}",
                    e / cols,
                    e % cols
                ),
            ));
        }
    }
    let s = f32::from_le_bytes([data[n / 4], data[n / 4 + 1], data[n / 4 + 2], data[n / 4 + 3]]);
    if !s.is_finite() {
        return Err(bad(t, format!("scale is {s}")));
    }
    if s < 0.0 {
        for w in &mut words {
            *w = negate_word(*w);
        }
    }
    Ok(TernaryTensor {
        rows,
        cols,
        words,
        scale: TernaryScale::Single(s.abs()),
    })
}

/// A projection stored as floats (F32, F16, BF16): llama.cpp's converter stores `round(W/s).clamp(-1,1)*s`,
/// so every value is 0 or ±s for one s, exactly, in the stored type. Anything else is refused: bitnode runs
/// ternary projections only, and re-ternarizing arbitrary floats would silently change the model.
pub fn float_to_ternary(t: &TensorInfo, data: &[u8]) -> Result<TernaryTensor> {
    if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return Err(GgufError::WrongDecoder {
            tensor: t.name.clone(),
            ty: t.ty.to_string(),
            wanted: "ternary from floats",
        });
    }
    let (rows, cols) = ternary_shape(t)?;
    let values = to_f32(t, data)?;
    let s = values.iter().map(|v| v.abs()).find(|&v| v != 0.0).unwrap_or(0.0);
    let mut words = Vec::with_capacity(values.len() / 16);
    let mut codes = [0u8; 16];
    for (w, ch) in values.chunks_exact(16).enumerate() {
        for (i, &v) in ch.iter().enumerate() {
            codes[i] = if v == 0.0 {
                1
            } else if v == s {
                2
            } else if v == -s {
                0
            } else {
                let e = 16 * w + i;
                return Err(bad(
                    t,
                    format!(
                        "values are not ternary times one scale: element (row {}, column {}) is {v}, \
                         but the first nonzero value has magnitude {s}",
                        e / cols,
                        e % cols
                    ),
                ));
            };
        }
        words.push(pack_codes(&codes));
    }
    Ok(TernaryTensor {
        rows,
        cols,
        words,
        scale: TernaryScale::Single(s),
    })
}

/// Any ternary projection: TQ1_0, TQ2_0, I2_S, or floats that are ternary times one scale.
pub fn to_ternary(t: &TensorInfo, data: &[u8]) -> Result<TernaryTensor> {
    match t.ty {
        GgmlType::TQ1_0 => tq1_0_to_ternary(t, data),
        GgmlType::TQ2_0 => tq2_0_to_ternary(t, data),
        GgmlType::I2S => i2s_to_ternary(t, data),
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => float_to_ternary(t, data),
        ty => Err(GgufError::WrongDecoder {
            tensor: t.name.clone(),
            ty: ty.to_string(),
            wanted: "a ternary projection (TQ1_0, TQ2_0, I2_S, or F32/F16/BF16 ternary times a scale)",
        }),
    }
}

fn expect_type(t: &TensorInfo, ty: GgmlType, wanted: &'static str) -> Result<()> {
    if t.ty != ty {
        return Err(GgufError::WrongDecoder {
            tensor: t.name.clone(),
            ty: t.ty.to_string(),
            wanted,
        });
    }
    Ok(())
}

/// Whether [`to_f32`] and [`rows_to_f32`] decode this type.
pub fn decodes_to_f32(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K
    )
}

/// The whole tensor as f32, row-major: F32, F16, BF16 (norms, embeddings) and Q8_0, Q4_K, Q6_K (what
/// `llama-quantize` writes for `token_embd` and `output` in TQ files).
pub fn to_f32(t: &TensorInfo, data: &[u8]) -> Result<Vec<f32>> {
    check_len(t, data)?;
    let mut out = vec![0f32; t.n_elements];
    rows_to_f32(t, data, 0, t.n_rows(), &mut out)?;
    Ok(out)
}

/// Rows [r0, r1) of the tensor (rows of `row_len` elements) into `out`, which must hold exactly those
/// elements; `data` is the whole tensor's data. Rows are whole blocks (the reader checked that ne[0] is a
/// multiple of the block size), so any row range decodes on its own, e.g. one embedding row per token.
pub fn rows_to_f32(t: &TensorInfo, data: &[u8], r0: usize, r1: usize, out: &mut [f32]) -> Result<()> {
    check_len(t, data)?;
    if !decodes_to_f32(t.ty) {
        return Err(GgufError::WrongDecoder {
            tensor: t.name.clone(),
            ty: t.ty.to_string(),
            wanted: "f32 (F32, F16, BF16, Q8_0, Q4_K, Q6_K)",
        });
    }
    let cols = t.row_len();
    if r0 > r1 || r1 > t.n_rows() || out.len() != (r1 - r0) * cols {
        return Err(bad(
            t,
            format!(
                "rows {r0}..{r1} into {} values: out of range or wrong length",
                out.len()
            ),
        ));
    }
    let ty = t.ty;
    let row_bytes = cols / ty.block_size() as usize * ty.type_size() as usize;
    dequantize(ty, &data[r0 * row_bytes..r1 * row_bytes], out);
    Ok(())
}

/// Dequantizes whole blocks of `ty` (one of [`decodes_to_f32`]'s) from `src` into `out`.
fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            // block_q8_0: fp16 d, int8 qs[32]; y = d * q.
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                for (y, &q) in o.iter_mut().zip(&b[2..34]) {
                    *y = d * f32::from(q as i8);
                }
            }
        }
        GgmlType::Q4K => {
            for (o, b) in out.chunks_exact_mut(256).zip(src.chunks_exact(144)) {
                dequantize_q4_k(b, o);
            }
        }
        GgmlType::Q6K => {
            for (o, b) in out.chunks_exact_mut(256).zip(src.chunks_exact(210)) {
                dequantize_q6_k(b, o);
            }
        }
        // rows_to_f32 checked decodes_to_f32 first.
        _ => out.fill(f32::NAN),
    }
}

/// ggml `get_scale_min_k4`: the 6-bit scale and min of sub-block j (0..8) from Q4_K's 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// ggml `block_q4_K` (144 bytes: fp16 d, fp16 dmin, scales[12], qs[128]): 8 sub-blocks of 32 with 6-bit
/// scale and min; `y = d*sc*q - dmin*m`, q the low nibbles of 32 bytes for one sub-block, the high nibbles
/// of the same bytes for the next.
fn dequantize_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        for l in 0..32 {
            y[64 * c + l] = d1 * f32::from(q[l] & 0xF) - m1;
            y[64 * c + 32 + l] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// ggml `block_q6_K` (210 bytes: ql[128], qh[64], int8 scales[16], fp16 d): 6-bit codes (low 4 bits in
/// `ql`, high 2 in `qh`) minus 32, 16 sub-blocks of 16 with an int8 scale; `y = d*sc*q`.
fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| d * f32::from(sc[is + k] as i8);
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}
