//! The reader and decoders against a small GGUF writer and hand-written encoders of each type (written
//! from ggml's quantizers, independently of the decoders), hostile files each with its own error, and
//! property tests that no input makes the reader or a decoder panic.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::rng::Rng;
use half::{bf16, f16};
use proptest::prelude::*;

// ---------------------------------------------------------------- writer

const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

struct TInfo {
    name: String,
    ne: Vec<i64>,
    ty: u32,
    data: Vec<u8>,
    /// Written instead of the contiguous offset (hostile files).
    offset: Option<u64>,
}

/// A minimal GGUF writer: what llama.cpp's and gguf-py's writers produce (tensors contiguous, each padded
/// to the alignment), with hooks to write hostile variants.
struct Writer {
    version: u32,
    alignment: u64,
    kvs: Vec<u8>,
    n_kv: u64,
    infos: Vec<TInfo>,
}

impl Writer {
    fn new() -> Self {
        Writer {
            version: 3,
            alignment: 32,
            kvs: vec![],
            n_kv: 0,
            infos: vec![],
        }
    }
    fn kv(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
        self.kvs.extend(gstr(key));
        self.kvs.extend(ty.to_le_bytes());
        self.kvs.extend_from_slice(value);
        self.n_kv += 1;
        self
    }
    fn kv_str(&mut self, key: &str, s: &str) -> &mut Self {
        self.kv(key, T_STRING, &gstr(s))
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv(key, T_U32, &v.to_le_bytes())
    }
    fn align(&mut self, a: u32) -> &mut Self {
        self.alignment = a.into();
        self.kv_u32("general.alignment", a)
    }
    fn tensor(&mut self, name: &str, ne: &[i64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.infos.push(TInfo {
            name: name.into(),
            ne: ne.to_vec(),
            ty,
            data,
            offset: None,
        });
        self
    }
    fn tensor_at(&mut self, name: &str, ne: &[i64], ty: u32, data: Vec<u8>, offset: u64) -> &mut Self {
        self.tensor(name, ne, ty, data);
        self.infos.last_mut().unwrap().offset = Some(offset);
        self
    }
    fn finish(&self) -> Vec<u8> {
        let pad = |x: u64| x.div_ceil(self.alignment) * self.alignment;
        let mut f = b"GGUF".to_vec();
        f.extend(self.version.to_le_bytes());
        f.extend((self.infos.len() as u64).to_le_bytes());
        f.extend(self.n_kv.to_le_bytes());
        f.extend_from_slice(&self.kvs);
        let mut off = 0u64;
        for t in &self.infos {
            f.extend(gstr(&t.name));
            f.extend((t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                f.extend(d.to_le_bytes());
            }
            f.extend(t.ty.to_le_bytes());
            f.extend(t.offset.unwrap_or(off).to_le_bytes());
            off = pad(off + t.data.len() as u64);
        }
        f.resize(pad(f.len() as u64) as usize, 0);
        for t in &self.infos {
            f.extend_from_slice(&t.data);
            f.resize(pad(f.len() as u64) as usize, 0);
        }
        f
    }
}

// ---------------------------------------------------------------- encoders (from ggml's quantizers)

/// `quantize_row_tq2_0_ref` for values already ternary: element e at `qs[32*(e/128) + e%32]`, bits
/// `2*((e%128)/32)`, then the fp16 d.
fn enc_tq2_0(t: &[i8], d: &[f32]) -> Vec<u8> {
    let mut out = vec![];
    for (b, blk) in t.chunks(256).enumerate() {
        let mut qs = [0u8; 64];
        for (e, &v) in blk.iter().enumerate() {
            qs[32 * (e / 128) + e % 32] |= ((v + 1) as u8) << (2 * ((e % 128) / 32));
        }
        out.extend(qs);
        out.extend(f16::from_f32(d[b]).to_le_bytes());
    }
    out
}

/// `quantize_row_tq1_0_ref`: Horner-combine 5 trits (first most significant; 4 then x3 for qh) and store
/// `ceil(q * 256 / 243)`.
fn enc_tq1_0(t: &[i8], d: &[f32]) -> Vec<u8> {
    let mut out = vec![];
    for (b, x) in t.chunks(256).enumerate() {
        let c = |e: usize| (x[e] + 1) as u16;
        let fin = |q: u16| (q * 256).div_ceil(243) as u8;
        let mut qs = [0u8; 48];
        for (m, b) in qs[..32].iter_mut().enumerate() {
            *b = fin((0..5).fold(0, |q, n| q * 3 + c(m + 32 * n)));
        }
        for (m, b) in qs[32..].iter_mut().enumerate() {
            *b = fin((0..5).fold(0, |q, n| q * 3 + c(160 + m + 16 * n)));
        }
        let mut qh = [0u8; 4];
        for (j, h) in qh.iter_mut().enumerate() {
            *h = fin((0..4).fold(0, |q, n| q * 3 + c(240 + j + 4 * n)) * 3);
        }
        out.extend(qs);
        out.extend(qh);
        out.extend(f16::from_f32(d[b]).to_le_bytes());
    }
    out
}

/// bitnet.cpp's `quantize_i2_s` layout: byte `32b+j` = c[128b+j]<<6 | c[+32]<<4 | c[+64]<<2 | c[+96], then
/// the f32 scale and 28 zero bytes.
fn enc_i2s(t: &[i8], scale: f32) -> Vec<u8> {
    let mut out = vec![0u8; t.len() / 4];
    for (b, blk) in t.chunks(128).enumerate() {
        for j in 0..32 {
            let c = |g: usize| ((blk[32 * g + j] + 1) as u8) << (6 - 2 * g);
            out[32 * b + j] = c(0) | c(1) | c(2) | c(3);
        }
    }
    out.extend(scale.to_le_bytes());
    out.extend([0u8; 28]);
    out
}

fn enc_q8_0(q: &[i8], d: &[f32]) -> Vec<u8> {
    let mut out = vec![];
    for (b, blk) in q.chunks(32).enumerate() {
        out.extend(f16::from_f32(d[b]).to_le_bytes());
        out.extend(blk.iter().map(|&v| v as u8));
    }
    out
}

/// One Q4_K block from its integers (ggml `quantize_row_q4_K_ref`'s packing of 6-bit scales and mins).
fn enc_q4_k(d: f32, dmin: f32, sc: &[u8; 8], m: &[u8; 8], q: &[u8]) -> Vec<u8> {
    let mut scales = [0u8; 12];
    for j in 0..4 {
        scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        scales[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        scales[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
    let mut qs = [0u8; 128];
    for c in 0..4 {
        for l in 0..32 {
            qs[32 * c + l] = q[64 * c + l] | (q[64 * c + 32 + l] << 4);
        }
    }
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend(f16::from_f32(dmin).to_le_bytes());
    out.extend(scales);
    out.extend(qs);
    out
}

/// One Q6_K block from codes q in 0..64 (value q - 32) and 16 int8 scales (ggml `quantize_row_q6_K_ref`).
fn enc_q6_k(d: f32, sc: &[i8; 16], q: &[u8]) -> Vec<u8> {
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for h in 0..2 {
        for l in 0..32 {
            let v = |k: usize| q[128 * h + l + 32 * k];
            ql[64 * h + l] = (v(0) & 0xF) | ((v(2) & 0xF) << 4);
            ql[64 * h + l + 32] = (v(1) & 0xF) | ((v(3) & 0xF) << 4);
            qh[32 * h + l] = (v(0) >> 4) | ((v(1) >> 4) << 2) | ((v(2) >> 4) << 4) | ((v(3) >> 4) << 6);
        }
    }
    let mut out = ql.to_vec();
    out.extend(qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend(f16::from_f32(d).to_le_bytes());
    out
}

fn ternary(rng: &mut Rng, n: usize) -> Vec<i8> {
    (0..n).map(|_| (rng.next_u64() % 3) as i8 - 1).collect()
}

fn parse(f: &[u8]) -> Gguf {
    Gguf::parse(f).unwrap()
}

fn one_tensor(ty: u32, ne: &[i64], data: Vec<u8>) -> Vec<u8> {
    Writer::new()
        .kv_str("general.architecture", "bitnet")
        .tensor("w", ne, ty, data)
        .finish()
}

fn decode_ternary(f: &[u8]) -> Result<TernaryTensor> {
    let g = Gguf::parse(f)?;
    let t = g.tensor("w").unwrap();
    to_ternary(t, g.tensor_data(t, f)?)
}

fn check_ternary(tt: &TernaryTensor, t: &[i8], rows: usize, cols: usize) {
    assert_eq!((tt.rows, tt.cols), (rows, cols));
    for r in 0..rows {
        for c in 0..cols {
            assert_eq!(tt.get(r, c), t[r * cols + c], "({r}, {c})");
        }
    }
}

// ---------------------------------------------------------------- ternary decoders

#[test]
fn tq2_0_round_trip_single_scale() {
    let mut rng = Rng::new(1);
    let (rows, cols) = (3, 512);
    let t = ternary(&mut rng, rows * cols);
    let s = 0.0371f32;
    let f = one_tensor(35, &[cols as i64, rows as i64], enc_tq2_0(&t, &[s; 6]));
    let tt = decode_ternary(&f).unwrap();
    check_ternary(&tt, &t, rows, cols);
    assert_eq!(tt.scale, TernaryScale::Single(f16::from_f32(s).to_f32()));
    // The engine's own packing of the same row gives the same words.
    let mut words = vec![];
    for r in 0..rows {
        crate::ternary::pack_row(&t[r * cols..(r + 1) * cols], &mut words);
    }
    assert_eq!(tt.words, words);
    let lin = tt.into_linear("w").unwrap();
    assert_eq!((lin.out, lin.inp, lin.scale), (rows, cols, f16::from_f32(s).to_f32()));
    assert_eq!(lin.row(1), &words[cols / 16..2 * cols / 16]);
}

#[test]
fn tq1_0_round_trip_single_scale() {
    let mut rng = Rng::new(2);
    let (rows, cols) = (4, 256);
    let t = ternary(&mut rng, rows * cols);
    let f = one_tensor(34, &[cols as i64, rows as i64], enc_tq1_0(&t, &[0.5; 4]));
    let tt = decode_ternary(&f).unwrap();
    check_ternary(&tt, &t, rows, cols);
    assert_eq!(tt.scale, TernaryScale::Single(0.5));
}

#[test]
fn tq1_0_every_code_pattern() {
    // All 3^5 trit combinations of a qs byte and 3^4 of a qh byte decode back (the ceil-division encoding
    // is the subtle part).
    let mut t = vec![0i8; 256 * 243];
    for k in 0..243 {
        for e in 0..256 {
            let (region_n, m) = match e {
                0..160 => (e / 32, e % 32),
                160..240 => ((e - 160) / 16, (e - 160) % 16),
                _ => ((e - 240) / 4, (e - 240) % 4),
            };
            // Vary the combination with the block and the byte position.
            let combo = (k + m) % 243;
            let digit = (combo / 3usize.pow(4 - region_n as u32)) % 3;
            t[256 * k + e] = digit as i8 - 1;
        }
    }
    let f = one_tensor(34, &[256, 243], enc_tq1_0(&t, &[1.0; 243]));
    check_ternary(&decode_ternary(&f).unwrap(), &t, 243, 256);
}

#[test]
fn tq_blocks_with_different_scales_are_per_block() {
    let mut rng = Rng::new(3);
    let t = ternary(&mut rng, 2 * 512);
    let d = [0.25, 0.25, 0.5, 0.25];
    for (ty, data) in [(35, enc_tq2_0(&t, &d)), (34, enc_tq1_0(&t, &d))] {
        let tt = decode_ternary(&one_tensor(ty, &[512, 2], data)).unwrap();
        assert_eq!(
            tt.scale,
            TernaryScale::PerBlock {
                block: 256,
                scales: d.to_vec()
            }
        );
        check_ternary(&tt, &t, 2, 512);
        assert_eq!(tt.scale_at(1, 0), 0.5);
        assert_eq!(tt.to_f32()[512 + 3], f32::from(t[512 + 3]) * 0.5);
        let e = tt.into_linear("blk.0.ffn_down.weight").unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"blk.0.ffn_down.weight\": its blocks have 2 different scales; bitnode's kernels take one \
             scale per tensor"
        );
    }
}

#[test]
fn tq_zero_and_negative_block_scales() {
    let mut rng = Rng::new(4);
    let t = ternary(&mut rng, 4 * 256);
    // Block 1: d = 0, so ggml decodes zeros whatever the codes; block 2: d = -s, the same weights as codes
    // negated times s. The other blocks agree, so the tensor keeps one scale.
    let d = [0.125, 0.0, -0.125, 0.125];
    let mut want = t.clone();
    want[256..512].fill(0);
    for v in &mut want[512..768] {
        *v = -*v;
    }
    for (ty, data) in [(35, enc_tq2_0(&t, &d)), (34, enc_tq1_0(&t, &d))] {
        let tt = decode_ternary(&one_tensor(ty, &[256, 4], data)).unwrap();
        assert_eq!(tt.scale, TernaryScale::Single(0.125));
        check_ternary(&tt, &want, 4, 256);
    }
    // All blocks zero: scale 0.
    let z = vec![0i8; 256];
    let tt = decode_ternary(&one_tensor(35, &[256, 1], enc_tq2_0(&z, &[0.7]))).unwrap();
    assert_eq!(tt.scale, TernaryScale::Single(0.0));
}

#[test]
fn tq2_0_refuses_code_3_and_bad_scales() {
    let mut data = enc_tq2_0(&[0; 512], &[1.0, 1.0]);
    data[66 + 5] = 0b1100_0000; // block 1, qs[5], bits 6-7: element 256 + 96 + 5
    let e = decode_ternary(&one_tensor(35, &[256, 2], data)).unwrap_err();
    assert!(
        e.to_string().contains("code 3") && e.to_string().contains("row 1"),
        "{e}"
    );
    let data = enc_tq2_0(&[0; 256], &[f32::INFINITY]);
    let e = decode_ternary(&one_tensor(35, &[256, 1], data)).unwrap_err();
    assert!(e.to_string().contains("block 0 has scale inf"), "{e}");
}

#[test]
fn i2s_round_trip_in_bitnet_cpp_files() {
    let mut rng = Rng::new(5);
    // 48 columns: 128-element packing blocks straddle rows.
    let (rows, cols) = (8, 48);
    let t = ternary(&mut rng, rows * cols);
    let data = enc_i2s(&t, 0.8125);
    assert_eq!(data.len(), rows * cols / 4 + 32);
    let f = Writer::new()
        .kv_str("general.architecture", "bitnet-b1.58")
        .tensor("w", &[cols as i64, rows as i64], 36, data.clone())
        .finish();
    let g = parse(&f);
    assert!(g.bitnet_cpp);
    let tt = decode_ternary(&f).unwrap();
    check_ternary(&tt, &t, rows, cols);
    assert_eq!(tt.scale, TernaryScale::Single(0.8125));
    // general.file_type 40 marks a bitnet.cpp file too.
    let f = Writer::new()
        .kv_str("general.architecture", "bitnet")
        .kv_u32("general.file_type", 40)
        .tensor("w", &[cols as i64, rows as i64], 36, data.clone())
        .finish();
    check_ternary(&decode_ternary(&f).unwrap(), &t, rows, cols);
    // A negative scale flips the codes.
    let f = Writer::new()
        .kv_str("general.architecture", "bitnet-25")
        .tensor("w", &[cols as i64, rows as i64], 36, enc_i2s(&t, -2.0))
        .finish();
    let tt = decode_ternary(&f).unwrap();
    assert_eq!(tt.scale, TernaryScale::Single(2.0));
    assert_eq!(tt.get(3, 7), -t[3 * cols + 7]);
}

#[test]
fn type_36_outside_bitnet_cpp_is_refused() {
    let data = enc_i2s(&[0; 128], 1.0);
    let e = Gguf::parse(&one_tensor(36, &[128, 1], data)).unwrap_err();
    assert!(
        matches!(&e, GgufError::UnsupportedType { tensor, .. } if tensor == "w"),
        "{e}"
    );
    assert!(e.to_string().contains("I2_S only in bitnet.cpp files"), "{e}");
}

#[test]
fn i2s_size_and_block_checks() {
    let w = |ne: &[i64], data: Vec<u8>| {
        Writer::new()
            .kv_str("general.architecture", "bitnet-b1.58")
            .tensor("w", ne, 36, data)
            .finish()
    };
    // 64 elements are not a whole packing block.
    let e = Gguf::parse(&w(&[64, 1], vec![0; 48])).unwrap_err();
    assert!(e.to_string().contains("128-element"), "{e}");
    // Size is n/4 + 32: the generic formula (n bytes) would make the next tensor's offset wrong.
    let g = parse(&w(&[256, 2], vec![0x55; 160]));
    assert_eq!(g.tensor("w").unwrap().nbytes, 512 / 4 + 32);
}

#[test]
fn float_projections_must_be_ternary_times_one_scale() {
    let mut rng = Rng::new(6);
    let t = ternary(&mut rng, 2 * 32);
    let s = 0.3f32;
    let f32s: Vec<u8> = t.iter().flat_map(|&v| (f32::from(v) * s).to_le_bytes()).collect();
    let f16s: Vec<u8> = t
        .iter()
        .flat_map(|&v| f16::from_f32(f32::from(v) * s).to_le_bytes())
        .collect();
    let bf16s: Vec<u8> = t
        .iter()
        .flat_map(|&v| bf16::from_f32(f32::from(v) * s).to_le_bytes())
        .collect();
    for (ty, data, want) in [
        (0, f32s.clone(), s),
        (1, f16s, f16::from_f32(s).to_f32()),
        (30, bf16s, bf16::from_f32(s).to_f32()),
    ] {
        let tt = decode_ternary(&one_tensor(ty, &[32, 2], data)).unwrap();
        check_ternary(&tt, &t, 2, 32);
        assert_eq!(tt.scale, TernaryScale::Single(want), "type {ty}");
    }
    let mut bad = f32s;
    let at = 4 * (32 + 5);
    bad[at..at + 4].copy_from_slice(&0.31f32.to_le_bytes());
    let e = decode_ternary(&one_tensor(0, &[32, 2], bad)).unwrap_err();
    assert!(
        e.to_string().contains("not ternary times one scale") && e.to_string().contains("row 1, column 5"),
        "{e}"
    );
}

#[test]
fn ternary_shape_checks() {
    // A row length the engine's 16-element words cannot hold.
    let e = decode_ternary(&one_tensor(0, &[8, 2], vec![0; 64])).unwrap_err();
    assert!(e.to_string().contains("multiple of 16"), "{e}");
    // k-quants are not projections.
    let e = decode_ternary(&one_tensor(8, &[32, 1], enc_q8_0(&[0; 32], &[1.0]))).unwrap_err();
    assert!(matches!(e, GgufError::WrongDecoder { .. }), "{e}");
}

// ---------------------------------------------------------------- f32 decoders

fn decode_f32(f: &[u8]) -> Vec<f32> {
    let g = parse(f);
    let t = g.tensor("w").unwrap();
    to_f32(t, g.tensor_data(t, f).unwrap()).unwrap()
}

#[test]
fn floats_to_f32() {
    let v: Vec<f32> = (0..24).map(|i| i as f32 * 0.37 - 4.0).collect();
    let f32s = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(decode_f32(&one_tensor(0, &[8, 3], f32s)), v);
    let f16s = v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
    let want: Vec<f32> = v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_eq!(decode_f32(&one_tensor(1, &[8, 3], f16s)), want);
    let bf16s = v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
    let want: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    assert_eq!(decode_f32(&one_tensor(30, &[8, 3], bf16s)), want);
}

#[test]
fn q8_0_round_trip() {
    let mut rng = Rng::new(7);
    let q: Vec<i8> = (0..128).map(|_| rng.next_u64() as i8).collect();
    let d = [0.01, -0.5, 2.0, 0.125];
    let got = decode_f32(&one_tensor(8, &[64, 2], enc_q8_0(&q, &d)));
    for (i, (&y, &x)) in got.iter().zip(&q).enumerate() {
        assert_eq!(y, f16::from_f32(d[i / 32]).to_f32() * f32::from(x), "{i}");
    }
}

#[test]
fn q4_k_round_trip() {
    let mut rng = Rng::new(8);
    let mut data = vec![];
    let mut want = vec![];
    for _ in 0..3 {
        let (d, dmin) = (rng.uniform() * 0.1, rng.uniform() * 0.05);
        let sc: [u8; 8] = std::array::from_fn(|_| (rng.next_u64() % 64) as u8);
        let m: [u8; 8] = std::array::from_fn(|_| (rng.next_u64() % 64) as u8);
        let q: Vec<u8> = (0..256).map(|_| (rng.next_u64() % 16) as u8).collect();
        data.extend(enc_q4_k(d, dmin, &sc, &m, &q));
        let (d, dmin) = (f16::from_f32(d).to_f32(), f16::from_f32(dmin).to_f32());
        for (e, &qe) in q.iter().enumerate() {
            let j = e / 32;
            want.push(d * f32::from(sc[j]) * f32::from(qe) - dmin * f32::from(m[j]));
        }
    }
    assert_eq!(decode_f32(&one_tensor(12, &[256, 3], data)), want);
}

#[test]
fn q6_k_round_trip() {
    let mut rng = Rng::new(9);
    let mut data = vec![];
    let mut want = vec![];
    for _ in 0..2 {
        let d = rng.uniform() * 0.01;
        let sc: [i8; 16] = std::array::from_fn(|_| rng.next_u64() as i8);
        let q: Vec<u8> = (0..256).map(|_| (rng.next_u64() % 64) as u8).collect();
        data.extend(enc_q6_k(d, &sc, &q));
        let d = f16::from_f32(d).to_f32();
        for (e, &qe) in q.iter().enumerate() {
            want.push(d * f32::from(sc[e / 16]) * (i32::from(qe) - 32) as f32);
        }
    }
    assert_eq!(decode_f32(&one_tensor(14, &[256, 2], data)), want);
}

#[test]
fn rows_decode_on_their_own() {
    let mut rng = Rng::new(10);
    let q: Vec<i8> = (0..32 * 12).map(|_| rng.next_u64() as i8).collect();
    let d: Vec<f32> = (0..12).map(|i| 0.01 * (i + 1) as f32).collect();
    let f = one_tensor(8, &[64, 6], enc_q8_0(&q, &d));
    let g = parse(&f);
    let t = g.tensor("w").unwrap();
    let data = g.tensor_data(t, &f).unwrap();
    let all = to_f32(t, data).unwrap();
    let mut part = vec![0f32; 2 * 64];
    rows_to_f32(t, data, 3, 5, &mut part).unwrap();
    assert_eq!(part, all[3 * 64..5 * 64]);
    assert!(rows_to_f32(t, data, 5, 7, &mut part).is_err());
    assert!(rows_to_f32(t, data, 0, 1, &mut part).is_err());
    // TQ data cannot be read as floats.
    let f = one_tensor(35, &[256, 1], enc_tq2_0(&[0; 256], &[1.0]));
    let g = parse(&f);
    let t = g.tensor("w").unwrap();
    assert!(matches!(
        to_f32(t, g.tensor_data(t, &f).unwrap()),
        Err(GgufError::WrongDecoder { .. })
    ));
}

// ---------------------------------------------------------------- container

#[test]
fn metadata_of_every_type() {
    let mut w = Writer::new();
    w.kv("u8", T_U8, &[200])
        .kv("i8", T_I8, &[0xff])
        .kv("u16", T_U16, &60000u16.to_le_bytes())
        .kv("i16", T_I16, &(-3i16).to_le_bytes())
        .kv_u32("u32", 7)
        .kv("i32", T_I32, &(-7i32).to_le_bytes())
        .kv("f32", T_F32, &1.5f32.to_le_bytes())
        .kv("bool", T_BOOL, &[1])
        .kv_str("str", "héron")
        .kv("u64", T_U64, &u64::MAX.to_le_bytes())
        .kv("i64", T_I64, &(-9i64).to_le_bytes())
        .kv("f64", T_F64, &0.25f64.to_le_bytes());
    let mut arr = T_STRING.to_le_bytes().to_vec();
    arr.extend(2u64.to_le_bytes());
    arr.extend(gstr("a b"));
    arr.extend(gstr(""));
    w.kv("strs", T_ARRAY, &arr);
    let mut arr = T_I32.to_le_bytes().to_vec();
    arr.extend(3u64.to_le_bytes());
    for v in [1i32, -2, 3] {
        arr.extend(v.to_le_bytes());
    }
    w.kv("ints", T_ARRAY, &arr);
    // An array of two arrays of u8 (the spec allows nesting).
    let mut arr = T_ARRAY.to_le_bytes().to_vec();
    arr.extend(2u64.to_le_bytes());
    for n in [1u64, 2] {
        arr.extend(T_U8.to_le_bytes());
        arr.extend(n.to_le_bytes());
        arr.extend(vec![9u8; n as usize]);
    }
    w.kv("nested", T_ARRAY, &arr);
    let g = parse(&w.finish());
    assert_eq!(g.get("u8"), Some(&Value::U8(200)));
    assert_eq!(g.get("i8"), Some(&Value::I8(-1)));
    assert_eq!(g.get("u16"), Some(&Value::U16(60000)));
    assert_eq!(g.get("i16"), Some(&Value::I16(-3)));
    assert_eq!(g.get_uint("u32"), Ok(Some(7)));
    assert_eq!(g.get("i32"), Some(&Value::I32(-7)));
    assert_eq!(g.get_float("f32"), Ok(Some(1.5)));
    assert_eq!(g.get_bool("bool"), Ok(Some(true)));
    assert_eq!(g.get_str("str"), Ok(Some("héron")));
    assert_eq!(g.get_uint("u64"), Ok(Some(u64::MAX)));
    assert_eq!(g.get("i64"), Some(&Value::I64(-9)));
    assert_eq!(g.get_float("f64"), Ok(Some(0.25)));
    assert_eq!(
        g.get_array("strs"),
        Ok(Some(&Array::String(vec!["a b".into(), String::new()])))
    );
    assert_eq!(g.get_array("ints"), Ok(Some(&Array::I32(vec![1, -2, 3]))));
    assert_eq!(
        g.get_array("nested"),
        Ok(Some(&Array::Array(vec![Array::U8(vec![9]), Array::U8(vec![9, 9])])))
    );
    assert_eq!(g.get_str("missing"), Ok(None));
    // Wrong types name the key.
    let e = g.get_str("u32").unwrap_err();
    assert_eq!(e.to_string(), "metadata key \"u32\" has type u32, expected string");
    assert!(g.get_uint("i32").is_err());
    assert_eq!(g.metadata().count(), 15);
    assert_eq!(g.metadata().next().map(|(k, _)| k), Some("u8"));
}

#[test]
fn alignment_and_offsets() {
    let mut w = Writer::new();
    w.align(64)
        .tensor("a", &[3], 0, vec![1; 12])
        .tensor("b", &[2, 2], 1, vec![2; 8]);
    let f = w.finish();
    let g = parse(&f);
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_start % 64, 0);
    let (a, b) = (g.tensor("a").unwrap(), g.tensor("b").unwrap());
    assert_eq!(a.offset, g.data_start);
    assert_eq!(b.offset, g.data_start + 64);
    assert_eq!(g.tensor_data(b, &f).unwrap(), &[2; 8]);
    assert_eq!(b.shape(), vec![2, 2]);
    assert!(matches!(g.tensor_data(b, &f[1..]), Err(GgufError::WrongFile { .. })));
    // Version 2 files read the same way.
    let mut w = Writer::new();
    w.version = 2;
    assert_eq!(parse(&w.finish()).version, 2);
}

/// Each hostile file gets its own error, naming the key or tensor.
#[test]
fn hostile_files() {
    let err = |f: &[u8]| Gguf::parse(f).unwrap_err();
    let good = one_tensor(0, &[4], vec![0; 16]);

    // Truncated header, and every prefix of a valid file.
    assert!(matches!(err(b"GGU"), GgufError::Truncated { ref what, .. } if what == "magic"));
    assert!(matches!(err(b"GGUF\x03\0\0\0\x01\0"), GgufError::Truncated { ref what, .. } if what == "tensor count"));
    for n in 0..good.len() - 16 {
        assert!(Gguf::parse(&good[..n]).is_err(), "prefix {n}");
    }
    let e = err(&good[..good.len() - 17]);
    assert!(
        matches!(&e, GgufError::OutOfBounds { tensor, .. } if tensor == "w"),
        "{e}"
    );

    assert!(matches!(err(b"GGML\x03\0\0\0"), GgufError::BadMagic(_)));
    let mut f = good.clone();
    f[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(err(&f), GgufError::UnsupportedVersion(1));
    f[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_eq!(err(&f), GgufError::BigEndian);

    // Huge counts (and negative ones) are refused before any allocation.
    let mut f = good.clone();
    f[16..24].copy_from_slice(&(i64::MAX).to_le_bytes());
    let e = err(&f);
    assert!(
        matches!(&e, GgufError::CountTooLarge { what, .. } if what == "metadata count"),
        "{e}"
    );
    let mut f = good.clone();
    f[8..16].copy_from_slice(&(1i64 << 60).to_le_bytes());
    assert!(matches!(err(&f), GgufError::CountTooLarge { ref what, .. } if what == "tensor count"));
    f[8..16].copy_from_slice(&(-1i64).to_le_bytes());
    assert!(matches!(err(&f), GgufError::CountTooLarge { ref what, .. } if what == "tensor count"));
    let mut arr = T_F32.to_le_bytes().to_vec();
    arr.extend((u64::MAX / 2).to_le_bytes());
    let e = err(&Writer::new().kv("tokenizer.ggml.scores", T_ARRAY, &arr).finish());
    assert!(
        e.to_string().contains("array length of key \"tokenizer.ggml.scores\""),
        "{e}"
    );

    // A string length past the end.
    let mut f = Writer::new().kv_str("general.name", "abc").finish();
    f[24..32].copy_from_slice(&1_000_000u64.to_le_bytes());
    let e = err(&f);
    assert!(
        matches!(&e, GgufError::Truncated { what, need: 1_000_000, .. } if what == "key of metadata #0"),
        "{e}"
    );
    let mut f = Writer::new().kv_str("general.name", "abc").finish();
    let at = 24 + 8 + 12 + 4;
    f[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = err(&f);
    assert!(e.to_string().contains("value of key \"general.name\""), "{e}");

    // Offsets past the end, misaligned, overlapping.
    let e = err(&Writer::new().tensor_at("w", &[4], 0, vec![0; 16], 1 << 40).finish());
    assert!(
        matches!(&e, GgufError::OutOfBounds { tensor, .. } if tensor == "w"),
        "{e}"
    );
    let e = err(&Writer::new()
        .tensor_at("w", &[4], 0, vec![0; 16], u64::MAX - 31)
        .finish());
    assert!(
        matches!(&e, GgufError::OutOfBounds { tensor, .. } if tensor == "w"),
        "{e}"
    );
    let e = err(&Writer::new().tensor_at("w", &[4], 0, vec![0; 16], 8).finish());
    assert_eq!(
        e,
        GgufError::Misaligned {
            tensor: "w".into(),
            offset: 8,
            alignment: 32
        }
    );
    let e = err(&Writer::new()
        .tensor("a", &[16], 0, vec![0; 64])
        .tensor_at("b", &[4], 0, vec![0; 16], 32)
        .finish());
    assert_eq!(
        e,
        GgufError::NotContiguous {
            tensor: "b".into(),
            offset: 32,
            expected: 64
        }
    );

    // Unknown types, dims.
    let e = err(&one_tensor(77, &[4], vec![0; 16]));
    assert_eq!(
        e,
        GgufError::UnknownType {
            tensor: "w".into(),
            ty: 77
        }
    );
    assert_eq!(e.to_string(), "tensor \"w\": unknown tensor type 77");
    let e = err(&one_tensor(38, &[4], vec![0; 16]));
    assert!(
        matches!(&e, GgufError::UnsupportedType { tensor, .. } if tensor == "w"),
        "{e}"
    );
    let e = err(&one_tensor(0, &[1 << 40, 1 << 40], vec![]));
    assert!(
        matches!(&e, GgufError::DimsOverflow { tensor, .. } if tensor == "w"),
        "{e}"
    );
    let e = err(&one_tensor(0, &[1 << 20, 1 << 20], vec![]));
    assert!(e.to_string().contains("more than the whole file"), "{e}");
    let e = err(&one_tensor(0, &[1, 1, 1, 1, 1], vec![0; 4]));
    assert!(matches!(e, GgufError::TooManyDims { n_dims: 5, .. }));
    let e = err(&one_tensor(0, &[4, -1], vec![]));
    assert!(matches!(e, GgufError::NegativeDim { dim: 1, value: -1, .. }));
    let e = err(&one_tensor(35, &[128, 1], vec![0; 33]));
    assert!(
        e.to_string().contains("not a multiple of TQ2_0's block size 256"),
        "{e}"
    );

    // Names and keys.
    let e = err(&Writer::new().kv_u32("a", 1).kv_u32("a", 2).finish());
    assert_eq!(e, GgufError::DuplicateKey("a".into()));
    let e = err(&Writer::new()
        .tensor("w", &[1], 0, vec![0; 4])
        .tensor("w", &[1], 0, vec![0; 4])
        .finish());
    assert_eq!(e, GgufError::DuplicateTensor("w".into()));
    let e = err(&Writer::new().tensor(&"n".repeat(64), &[1], 0, vec![0; 4]).finish());
    assert!(matches!(e, GgufError::BadTensorName { index: 0, .. }));
    let e = err(&Writer::new().kv("k", 13, &[0; 8]).finish());
    assert_eq!(
        e,
        GgufError::UnknownValueType {
            key: "k".into(),
            ty: 13
        }
    );
    let e = err(&Writer::new().kv("k", T_BOOL, &[2]).finish());
    assert!(e.to_string().contains("neither 0 nor 1"), "{e}");
    let mut bad_utf8 = 1u64.to_le_bytes().to_vec();
    bad_utf8.push(0xff);
    let e = err(&Writer::new().kv("k", T_STRING, &bad_utf8).finish());
    assert_eq!(e.to_string(), "value of key \"k\" is not valid UTF-8");
    let mut deep = vec![];
    for _ in 0..MAX_ARRAY_DEPTH + 1 {
        deep.extend(T_ARRAY.to_le_bytes());
        deep.extend(1u64.to_le_bytes());
    }
    deep.extend(T_U8.to_le_bytes());
    deep.extend(0u64.to_le_bytes());
    let e = err(&Writer::new().kv("k", T_ARRAY, &deep[12..]).finish());
    assert!(matches!(e, GgufError::NestedTooDeep { .. }), "{e}");

    // Alignment must be a u32 power of two.
    let e = err(&Writer::new().kv_u32("general.alignment", 48).finish());
    assert!(e.to_string().contains("not a power of two"), "{e}");
    let e = err(&Writer::new().kv_u32("general.alignment", 0).finish());
    assert!(e.to_string().contains("not a power of two"), "{e}");
    let e = err(&Writer::new().kv("general.alignment", T_U64, &[0; 8]).finish());
    assert!(matches!(e, GgufError::KeyType { expected: "u32", .. }));
}

// ---------------------------------------------------------------- property tests

/// A valid file with one tensor of each decodable type (and metadata arrays), for mutation.
fn sample_file(bitnet_cpp: bool) -> Vec<u8> {
    let mut rng = Rng::new(11);
    let t = ternary(&mut rng, 512);
    let mut arr = T_STRING.to_le_bytes().to_vec();
    arr.extend(2u64.to_le_bytes());
    arr.extend(gstr("a"));
    arr.extend(gstr("b c"));
    let mut w = Writer::new();
    w.kv_str(
        "general.architecture",
        if bitnet_cpp { "bitnet-b1.58" } else { "bitnet" },
    )
    .kv("tokenizer.ggml.tokens", T_ARRAY, &arr)
    .align(16)
    .tensor("tq2", &[256, 2], 35, enc_tq2_0(&t, &[0.5, 0.5]))
    .tensor("tq1", &[256, 2], 34, enc_tq1_0(&t, &[0.5, 0.25]))
    .tensor("f16", &[16, 2], 1, vec![0x3c; 64])
    .tensor("q8", &[32, 1], 8, enc_q8_0(&[3; 32], &[0.5]))
    .tensor("q4k", &[256], 12, enc_q4_k(0.1, 0.01, &[5; 8], &[6; 8], &[7; 256]))
    .tensor("q6k", &[256], 14, enc_q6_k(0.1, &[3; 16], &[40; 256]));
    if bitnet_cpp {
        w.tensor("i2s", &[32, 4], 36, enc_i2s(&t[..128], 0.5));
    }
    w.finish()
}

/// Parses, then runs every decoder on every tensor: none may panic, whatever the bytes.
fn exercise(f: &[u8]) {
    let Ok(g) = Gguf::parse(f) else { return };
    for t in g.tensors() {
        let Ok(data) = g.tensor_data(t, f) else { continue };
        let _ = to_ternary(t, data);
        let _ = to_f32(t, data);
        if t.n_rows() > 0 {
            let mut row = vec![0f32; t.row_len()];
            let _ = rows_to_f32(t, data, t.n_rows() - 1, t.n_rows(), &mut row);
        }
    }
    for (k, _) in g.metadata() {
        let _ = (g.get_str(k), g.get_uint(k), g.get_float(k), g.get_array(k));
    }
}

#[test]
fn sample_files_decode() {
    for bitnet_cpp in [false, true] {
        let f = sample_file(bitnet_cpp);
        let g = parse(&f);
        assert_eq!(g.tensors().len(), 6 + usize::from(bitnet_cpp));
        exercise(&f);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..1024), magic in any::<bool>()) {
        if magic && bytes.len() >= 8 {
            // Get past the magic and version most of the time, so the rest of the reader is reached.
            bytes[..8].copy_from_slice(b"GGUF\x03\0\0\0");
        }
        exercise(&bytes);
    }

    #[test]
    fn mutated_files_never_panic(
        bitnet_cpp in any::<bool>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut f = sample_file(bitnet_cpp);
        for (at, v) in edits {
            let i = at.index(f.len());
            f[i] = v;
        }
        if truncate {
            let n = cut.index(f.len());
            f.truncate(n);
        }
        exercise(&f);
    }

    #[test]
    fn ternary_round_trips(seed in any::<u64>(), rows in 1usize..4, blocks in 1usize..3, s in 1e-3f32..10.0) {
        let mut rng = Rng::new(seed);
        let cols = 256 * blocks;
        let t = ternary(&mut rng, rows * cols);
        let d = vec![s; rows * blocks];
        for ty in [34, 35] {
            let data = if ty == 34 { enc_tq1_0(&t, &d) } else { enc_tq2_0(&t, &d) };
            let tt = decode_ternary(&one_tensor(ty, &[cols as i64, rows as i64], data)).unwrap();
            check_ternary(&tt, &t, rows, cols);
        }
        let f = Writer::new()
            .kv_u32("general.file_type", FTYPE_I2_S)
            .tensor("w", &[cols as i64, rows as i64], 36, enc_i2s(&t, s))
            .finish();
        let tt = decode_ternary(&f).unwrap();
        check_ternary(&tt, &t, rows, cols);
        prop_assert_eq!(tt.scale, TernaryScale::Single(s));
    }
}

// ---------------------------------------------------------------- fixtures of the `gguf` Python package

/// Little-endian f32 values from the fixtures' hex strings.
fn f32_hex(s: &str) -> Vec<f32> {
    let b: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `tests/fixtures/gguf/`, written by `tests/reference/make_gguf_fixtures.py`: TQ1_0/TQ2_0 files from the
/// `gguf` package's own writer and numpy quantizers, and an I2_S file packed by the layout in the notes.
/// Every tensor decodes to the ternary values and scale the script started from, or to the f32 values the
/// package's dequantizers give (exactly: both follow ggml's operation order).
#[test]
fn python_gguf_fixtures() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf");
    for name in ["tq2_0", "tq1_0", "i2_s"] {
        let f = std::fs::read(dir.join(format!("{name}.gguf"))).unwrap();
        let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
        let want: serde_json::Value = serde_json::from_str(&text).unwrap();
        let g = parse(&f);
        assert_eq!(
            g.architecture().unwrap(),
            want["architecture"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            g.get_uint("general.file_type").unwrap(),
            want["file_type"].as_u64(),
            "{name}"
        );
        assert_eq!(g.bitnet_cpp, name == "i2_s");
        if let Some(tokens) = want["tokens"].as_array() {
            let tokens: Vec<String> = tokens.iter().map(|t| t.as_str().unwrap().to_string()).collect();
            assert_eq!(
                g.get_array("tokenizer.ggml.tokens").unwrap(),
                Some(&Array::String(tokens))
            );
        }
        let tensors = want["tensors"].as_object().unwrap();
        assert_eq!(g.tensors().len(), tensors.len(), "{name}");
        for (tname, e) in tensors {
            let t = g.tensor(tname).unwrap();
            let ne: Vec<usize> = e["ne"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(
                (t.ty.name(), &t.ne),
                (e["type"].as_str().unwrap(), &ne),
                "{name} {tname}"
            );
            let data = g.tensor_data(t, &f).unwrap();
            if let Some(codes) = e["codes"].as_str() {
                let tt = to_ternary(t, data).unwrap();
                let vals: Vec<i8> = codes.bytes().map(|c| (c - b'0') as i8 - 1).collect();
                check_ternary(&tt, &vals, t.n_rows(), t.row_len());
                let scale = match (e["scale"].as_f64(), e["block_scales_hex"].as_str()) {
                    (Some(s), _) => TernaryScale::Single(s as f32),
                    (None, Some(h)) => TernaryScale::PerBlock {
                        block: 256,
                        scales: f32_hex(h),
                    },
                    _ => panic!("{name} {tname}: no scale"),
                };
                assert_eq!(tt.scale, scale, "{name} {tname}");
            } else {
                assert_eq!(
                    to_f32(t, data).unwrap(),
                    f32_hex(e["f32_hex"].as_str().unwrap()),
                    "{name} {tname}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------- model config, activation, tokenizer

fn str_array(items: &[&str]) -> Vec<u8> {
    let mut v = T_STRING.to_le_bytes().to_vec();
    v.extend((items.len() as u64).to_le_bytes());
    for s in items {
        v.extend(gstr(s));
    }
    v
}

fn f32_array(items: &[f32]) -> Vec<u8> {
    let mut v = T_F32.to_le_bytes().to_vec();
    v.extend((items.len() as u64).to_le_bytes());
    for x in items {
        v.extend(x.to_le_bytes());
    }
    v
}

fn i32_array(items: &[i32]) -> Vec<u8> {
    let mut v = T_I32.to_le_bytes().to_vec();
    v.extend((items.len() as u64).to_le_bytes());
    for x in items {
        v.extend(x.to_le_bytes());
    }
    v
}

/// The rule of issue 16: the explicit key, else ReLU² for bitnet.cpp's architectures, else by vocabulary.
#[test]
fn activation_rule() {
    use crate::config::{gguf_activation, Activation};
    let act = |arch: &str, vocab: Option<&str>, key: Option<&str>| {
        let mut w = Writer::new();
        w.kv_str("general.architecture", arch);
        if let Some(v) = vocab {
            w.kv_str("tokenizer.ggml.model", v);
        }
        if let Some(k) = key {
            w.kv_str(&format!("{arch}.hidden_activation"), k);
        }
        gguf_activation(&parse(&w.finish()), arch)
    };
    assert_eq!(act("bitnet", Some("gpt2"), None).unwrap(), Activation::Relu2);
    assert_eq!(act("bitnet", Some("llama"), None).unwrap(), Activation::Silu);
    assert_eq!(act("bitnet", None, None).unwrap(), Activation::Silu);
    assert_eq!(act("bitnet-b1.58", Some("llama"), None).unwrap(), Activation::Relu2);
    assert_eq!(act("bitnet-25", None, None).unwrap(), Activation::Relu2);
    assert_eq!(act("bitnet", Some("llama"), Some("relu2")).unwrap(), Activation::Relu2);
    assert_eq!(
        act("bitnet-b1.58", Some("gpt2"), Some("silu")).unwrap(),
        Activation::Silu
    );
    let e = act("bitnet", Some("gpt2"), Some("gelu")).unwrap_err().to_string();
    assert!(e.contains("bitnet.hidden_activation") && e.contains("gelu"), "{e}");
}

/// Hyperparameters: each missing or unsupported key is named in the error.
#[test]
fn config_from_gguf_names_the_key_at_fault() {
    use crate::config::ModelConfig;
    let base = |skip: &str, extra: &[(&str, &str)]| {
        let mut w = Writer::new();
        w.kv_str("general.architecture", "bitnet");
        for (k, v) in [
            ("bitnet.embedding_length", 256u32),
            ("bitnet.block_count", 2),
            ("bitnet.feed_forward_length", 512),
            ("bitnet.attention.head_count", 4),
            ("bitnet.attention.head_count_kv", 2),
            ("bitnet.context_length", 128),
            ("bitnet.vocab_size", 300),
        ] {
            if k != skip {
                w.kv_u32(k, v);
            }
        }
        if skip != "bitnet.attention.layer_norm_rms_epsilon" {
            w.kv("bitnet.attention.layer_norm_rms_epsilon", T_F32, &1e-5f32.to_le_bytes());
        }
        for (k, v) in extra {
            w.kv_str(k, v);
        }
        w.kv_str("tokenizer.ggml.model", "gpt2");
        ModelConfig::from_gguf(&parse(&w.finish()), std::path::Path::new("m.gguf"))
    };
    let c = base("", &[]).unwrap();
    assert_eq!((c.hidden_size, c.num_layers, c.intermediate_size), (256, 2, 512));
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size), (4, 2, 64, 300));
    assert_eq!((c.max_position_embeddings, c.rope_theta), (128, 10000.0));
    assert_eq!(c.tie_word_embeddings, Some(true));
    for key in [
        "bitnet.embedding_length",
        "bitnet.block_count",
        "bitnet.feed_forward_length",
        "bitnet.attention.head_count",
        "bitnet.context_length",
        "bitnet.attention.layer_norm_rms_epsilon",
    ] {
        let e = base(key, &[]).err().unwrap().to_string();
        assert!(e.contains(key) && e.contains("missing"), "{key}: {e}");
    }
    let e = base("", &[("bitnet.rope.scaling.type", "yarn")])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rope.scaling.type"), "{e}");
    let e = base("", &[("general.type", "adapter")]).err().unwrap().to_string();
    assert!(e.contains("not a model"), "{e}");
    let mut w = Writer::new();
    w.kv_str("general.architecture", "llama");
    let e = ModelConfig::from_gguf(&parse(&w.finish()), std::path::Path::new("m.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("\"llama\"") && e.contains("bitnet-b1.58"), "{e}");
}

/// A SentencePiece-style (`llama`) vocabulary: `▁` for spaces, merges by the merged token's score (the
/// pair whose result scores highest merges first, as llama.cpp's SPM tokenizer does), byte fallback for
/// characters outside the vocabulary, BOS prepended.
#[test]
fn llama_vocabulary_tokenizes_like_sentencepiece() {
    let mut tokens = vec![
        "<unk>",
        "<s>",
        "</s>",
        "\u{2581}",
        "a",
        "b",
        "\u{2581}a",
        "ab",
        "\u{2581}ab",
    ];
    let bytes: Vec<String> = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
    tokens.extend(bytes.iter().map(String::as_str));
    let mut scores = vec![0.0, 0.0, 0.0, -5.0, -6.0, -7.0, -1.0, -2.0, -0.5];
    scores.extend(std::iter::repeat_n(0.0, 256));
    let mut types = vec![2, 3, 3, 1, 1, 1, 1, 1, 1];
    types.extend(std::iter::repeat_n(6, 256));
    let mut w = Writer::new();
    w.kv_str("general.architecture", "bitnet")
        .kv_str("tokenizer.ggml.model", "llama")
        .kv("tokenizer.ggml.tokens", T_ARRAY, &str_array(&tokens))
        .kv("tokenizer.ggml.scores", T_ARRAY, &f32_array(&scores))
        .kv("tokenizer.ggml.token_type", T_ARRAY, &i32_array(&types))
        .kv_u32("tokenizer.ggml.bos_token_id", 1)
        .kv_u32("tokenizer.ggml.eos_token_id", 2)
        .kv_u32("tokenizer.ggml.unknown_token_id", 0);
    let g = parse(&w.finish());
    let (tok, specials) = tokenizer::build(&g).map_err(|e| format!("{e:?}")).unwrap();
    let ids = |s: &str| tok.encode(s, true).unwrap().get_ids().to_vec();
    assert_eq!(ids("ab ab"), [1, 8, 8]);
    assert_eq!(ids("a"), [1, 6]);
    assert_eq!(ids("ba"), [1, 3, 5, 4]);
    // "c" is not in the vocabulary: its byte token (0x63 at 9 + 0x63).
    assert_eq!(ids("ac"), [1, 6, 9 + 0x63]);
    assert_eq!(tok.decode(&[1, 8, 8, 9 + 0x63], true).unwrap(), "ab abc");
    assert_eq!(specials.bos_token.as_deref(), Some("<s>"));
    assert_eq!(specials.eos_token.as_deref(), Some("</s>"));
}

/// Tokenizer keys of the wrong shape are refused with the key's name, never a panic.
#[test]
fn tokenizer_keys_are_checked() {
    let build = |f: &dyn Fn(&mut Writer)| {
        let mut w = Writer::new();
        w.kv_str("general.architecture", "bitnet");
        f(&mut w);
        tokenizer::build(&parse(&w.finish())).err().map(|e| format!("{e:?}"))
    };
    let e = build(&|_| {}).unwrap();
    assert!(e.contains("tokenizer.ggml.model"), "{e}");
    let e = build(&|w| {
        w.kv_str("tokenizer.ggml.model", "gpt2")
            .kv("tokenizer.ggml.tokens", T_ARRAY, &str_array(&["a", "b"]))
            .kv_u32("tokenizer.ggml.bos_token_id", 7);
    })
    .unwrap();
    assert!(e.contains("bos_token_id") && e.contains("outside"), "{e}");
    let e = build(&|w| {
        w.kv_str("tokenizer.ggml.model", "gpt2")
            .kv("tokenizer.ggml.tokens", T_ARRAY, &str_array(&["a", "b"]))
            .kv_str("tokenizer.ggml.pre", "qwen2");
    })
    .unwrap();
    assert!(e.contains("tokenizer.ggml.pre"), "{e}");
    let e = build(&|w| {
        w.kv_str("tokenizer.ggml.model", "gpt2")
            .kv("tokenizer.ggml.tokens", T_ARRAY, &str_array(&["a", "b"]))
            .kv("tokenizer.ggml.merges", T_ARRAY, &str_array(&["ab"]));
    })
    .unwrap();
    assert!(e.contains("merges") && e.contains("no space"), "{e}");
    let e = build(&|w| {
        w.kv_str("tokenizer.ggml.model", "llama")
            .kv("tokenizer.ggml.tokens", T_ARRAY, &str_array(&["a", "b"]))
            .kv("tokenizer.ggml.scores", T_ARRAY, &f32_array(&[0.0]));
    })
    .unwrap();
    assert!(e.contains("scores"), "{e}");
}
