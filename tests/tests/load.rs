//! The load path's fast conversions against the plain per-element ones they replace: bulk dtype reads
//! (`read_f32`, `read_f16`) against `float_at`, the word-level offline unpacking and the parallel online
//! quantization against `hf_get` / `pack_row` element by element, on random tensors of every supported
//! dtype and form, and a whole model converted at once (`layers`) or streamed (`stream_layers`).
use bitnode_engine::config::WeightForm;
use bitnode_engine::loader::{Dtype, TensorRef};
use bitnode_engine::model::{convert_ternary, Layer, Model, TernaryLinear};
use bitnode_engine::rng::Rng;
use bitnode_engine::synth::{self, SynthFormat};
use bitnode_engine::ternary;
use bitnode_tests::tempdir;

fn tensor<'a>(dtype: Dtype, shape: &'a [usize], bytes: &'a [u8]) -> TensorRef<'a> {
    TensorRef {
        name: "w",
        dtype,
        shape,
        bytes,
    }
}

/// Bytes of `n` elements of `dtype` holding `x`.
fn encode(dtype: Dtype, x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|&v| match dtype {
            Dtype::F32 => v.to_le_bytes().to_vec(),
            Dtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
            Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            Dtype::F64 => (v as f64).to_le_bytes().to_vec(),
            _ => unreachable!(),
        })
        .collect()
}

const FLOATS: [Dtype; 4] = [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64];

#[test]
fn bulk_reads_equal_float_at_on_every_bit_pattern() {
    let mut rng = Rng::new(1);
    for dtype in FLOATS {
        let size = dtype.bitsize() / 8;
        let n = 5000;
        // Random bits give NaNs (signalling and quiet), infinities, subnormals and values beyond f16's
        // range; the first elements are the edge cases spelled out.
        let mut bytes: Vec<u8> = (0..n * size).map(|_| rng.next_u64() as u8).collect();
        let special: Vec<u8> = match dtype {
            Dtype::F16 | Dtype::BF16 => [
                0x7c01u16, 0x7e00, 0xfc00, 0x7c00, 0x0001, 0x8000, 0x7f81, 0xffff, 0x3c00,
            ]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect(),
            _ => encode(
                dtype,
                &[
                    f32::NAN,
                    65520.0,
                    65519.0,
                    1e-8,
                    -0.0,
                    f32::INFINITY,
                    5.960_464_5e-8,
                    2.980_232_2e-8,
                ],
            ),
        };
        bytes[..special.len()].copy_from_slice(&special);
        let shape = [n];
        let t = tensor(dtype, &shape, &bytes);
        for (start, len) in [(0, n), (0, 1), (3, 1029), (1000, 2500), (n - 7, 7)] {
            let mut f = vec![0f32; len];
            t.read_f32(start, &mut f);
            let mut h = vec![0u16; len];
            t.read_f16(start, &mut h);
            for i in 0..len {
                let want = t.float_at(start + i);
                assert_eq!(
                    f[i].to_bits(),
                    want.to_bits(),
                    "{dtype:?} read_f32 element {}",
                    start + i
                );
                let want16 = half::f16::from_f32(want).to_bits();
                assert_eq!(h[i], want16, "{dtype:?} read_f16 element {} ({want})", start + i);
            }
        }
    }
}

/// The per-element conversion `load_linear` used to do, as the oracle.
fn reference(w: &TensorRef<'_>, form: WeightForm, out: usize, inp: usize, scale: f32) -> Result<TernaryLinear, String> {
    let mut t = vec![0i8; inp];
    let mut words = Vec::new();
    if form == WeightForm::Online {
        let n = out * inp;
        let mut sum = 0f64;
        for i in 0..n {
            sum += w.float_at(i).abs() as f64;
        }
        let m = ((sum / n as f64) as f32).max(1e-5);
        let s = 1.0f32 / m;
        for r in 0..out {
            for (c, tv) in t.iter_mut().enumerate() {
                *tv = (w.float_at(r * inp + c) * s).round_ties_even().clamp(-1.0, 1.0) as i8;
            }
            ternary::pack_row(&t, &mut words);
        }
        return Ok(TernaryLinear {
            out,
            inp,
            words,
            scale: 1.0 / s,
        });
    }
    for r in 0..out {
        for (c, tv) in t.iter_mut().enumerate() {
            let v = ternary::hf_get(w.bytes, out, inp, r, c);
            if v > 1 {
                return Err(format!("holds code 3 at row {r} col {c};"));
            }
            *tv = v;
        }
        ternary::pack_row(&t, &mut words);
    }
    Ok(TernaryLinear { out, inp, words, scale })
}

fn assert_same(got: &TernaryLinear, want: &TernaryLinear, what: &str) {
    assert_eq!((got.out, got.inp), (want.out, want.inp), "{what}: shape");
    assert_eq!(got.scale.to_bits(), want.scale.to_bits(), "{what}: scale");
    if let Some(i) = got.words.iter().zip(&want.words).position(|(a, b)| a != b) {
        panic!(
            "{what}: word {i} (row {}) is {:#010x}, per-element {:#010x}",
            i / (got.inp / 16),
            got.words[i],
            want.words[i]
        );
    }
    assert_eq!(got.words.len(), want.words.len(), "{what}: word count");
}

/// Shapes large enough that the conversion splits each projection into several tasks.
const SHAPES: [(usize, usize); 3] = [(1200, 2048), (64, 128), (4, 16)];

#[test]
fn packed_offline_conversion_equals_per_element() {
    let mut rng = Rng::new(2);
    for (out, inp) in SHAPES {
        let t: Vec<i8> = (0..out * inp).map(|_| (rng.next_u64() % 3) as i8 - 1).collect();
        let packed = ternary::hf_pack(&t, out, inp);
        for dtype in [Dtype::U8, Dtype::I8] {
            let shape = [out / 4, inp];
            let w = tensor(dtype, &shape, &packed);
            let want = reference(&w, WeightForm::OfflineAutoBitLinear, out, inp, 0.75).unwrap();
            for threads in [1, 3, 8] {
                let got = convert_ternary(&w, WeightForm::OfflineAutoBitLinear, out, inp, 0.75, threads).unwrap();
                assert_same(&got, &want, &format!("[{out}, {inp}] {dtype:?} on {threads} threads"));
            }
        }
        // A code 3 anywhere: the error names the element the per-element scan stops at (row-major
        // first), whichever task finds it and whatever the threads' order.
        for trial in 0..6 {
            let mut bad = packed.clone();
            for _ in 0..1 + trial % 3 {
                let i = (rng.next_u64() as usize) % bad.len();
                bad[i] |= 3 << (2 * (rng.next_u64() % 4));
            }
            let shape = [out / 4, inp];
            let w = tensor(Dtype::U8, &shape, &bad);
            let want = reference(&w, WeightForm::OfflineBitLinear, out, inp, 2.0).unwrap_err();
            for threads in [1, 4] {
                let got = convert_ternary(&w, WeightForm::OfflineBitLinear, out, inp, 2.0, threads)
                    .unwrap_err()
                    .to_string();
                assert!(got.contains(&want), "[{out}, {inp}]: {got:?} does not say {want:?}");
            }
        }
    }
}

#[test]
fn online_conversion_equals_per_element_for_every_float_dtype() {
    let mut rng = Rng::new(3);
    for (out, inp) in SHAPES {
        for dtype in FLOATS {
            let x: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.02).collect();
            let bytes = encode(dtype, &x);
            let shape = [out, inp];
            let w = tensor(dtype, &shape, &bytes);
            let want = reference(&w, WeightForm::Online, out, inp, 1.0).unwrap();
            for threads in [1, 5] {
                let got = convert_ternary(&w, WeightForm::Online, out, inp, 1.0, threads).unwrap();
                assert_same(&got, &want, &format!("[{out}, {inp}] {dtype:?} on {threads} threads"));
            }
        }
    }
}

/// Every layer of a synthesized model, converted per element from its files.
fn reference_layers(m: &Model) -> Vec<Layer> {
    let c = &m.config;
    (0..c.num_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let norm = |n: &str| {
                let t = m.files.get(&format!("{p}.{n}.weight")).unwrap();
                (0..t.numel()).map(|i| t.float_at(i)).collect::<Vec<f32>>()
            };
            let shapes = m.projection_shapes();
            let lin = |k: usize, n: &str| {
                let (out, inp) = shapes[k];
                let w = m.files.get(&format!("{p}.{n}.weight")).unwrap();
                let scale = match c.form {
                    WeightForm::Online => 1.0,
                    form => {
                        let ws = m.files.get(&format!("{p}.{n}.weight_scale")).unwrap().float_at(0);
                        if form == WeightForm::OfflineAutoBitLinear {
                            ws
                        } else {
                            1.0 / ws
                        }
                    }
                };
                reference(&w, c.form, out, inp, scale).unwrap()
            };
            Layer {
                input_layernorm: norm("input_layernorm"),
                post_attention_layernorm: norm("post_attention_layernorm"),
                attn_sub_norm: norm("self_attn.attn_sub_norm"),
                ffn_sub_norm: norm("mlp.ffn_sub_norm"),
                q_proj: lin(0, "self_attn.q_proj"),
                k_proj: lin(1, "self_attn.k_proj"),
                v_proj: lin(2, "self_attn.v_proj"),
                o_proj: lin(3, "self_attn.o_proj"),
                gate_proj: lin(4, "mlp.gate_proj"),
                up_proj: lin(5, "mlp.up_proj"),
                down_proj: lin(6, "mlp.down_proj"),
            }
        })
        .collect()
}

#[test]
fn model_layers_streamed_or_kept_equal_per_element_conversion() {
    for (fmt, name) in [(SynthFormat::Packed, "packed"), (SynthFormat::Online, "online")] {
        let dir = tempdir(&format!("load-{name}"));
        synth::synth(synth::preset("tiny").unwrap(), &dir, 4, fmt).unwrap();
        let want = reference_layers(&Model::load(&dir).unwrap());

        let streamed_model = Model::load(&dir).unwrap();
        let mut streamed = vec![];
        streamed_model
            .stream_layers(|i, l| {
                assert_eq!(i, streamed.len(), "{name}: layers out of order");
                streamed.push(l.clone());
                Ok(())
            })
            .unwrap();
        assert!(
            streamed_model.host_layers().is_none(),
            "{name}: streaming kept the layers"
        );

        let kept_model = Model::load(&dir).unwrap();
        let kept = kept_model.layers().unwrap();
        assert_eq!(kept.len(), want.len());
        for (l, w) in want.iter().enumerate() {
            assert!(
                streamed[l] == *w,
                "{name}: streamed layer {l} differs from the per-element conversion"
            );
            assert!(
                kept[l] == *w,
                "{name}: kept layer {l} differs from the per-element conversion"
            );
        }

        // The embedding's bulk conversions, f16 (the GPU form) and f32 (the CPU reference's).
        let e = &kept_model.embed;
        let t = kept_model.files.get(&e.name).unwrap();
        let (r0, r1) = (3, e.rows);
        let h = e.rows_f16(r0, r1);
        let f = e.rows_f32(r0, r1);
        for (k, (hv, fv)) in h.iter().zip(&f).enumerate() {
            let want = t.float_at(r0 * e.cols + k);
            assert_eq!(fv.to_bits(), want.to_bits(), "{name}: embedding f32 element {k}");
            assert_eq!(
                *hv,
                half::f16::from_f32(want).to_bits(),
                "{name}: embedding f16 element {k}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
