//! GGUF models as `--model`: the same tiny model as a Hugging Face directory (`gguf_model/twin`, offline
//! AutoBitLinear) and as TQ2_0, TQ1_0 and I2_S GGUF files (written by `tests/reference/make_gguf_fixtures.py`
//! with the `gguf` package) must give the same tokens, logits, NLL and greedy generation. Every form stores
//! the same numbers exactly (fp16-exact scales, an embedding that Q4_K, Q8_0 and F16 all hold), so the
//! outputs must agree to the last bit on the CPU reference, and within the usual tolerance on the GPU.
use bitnode_engine::config::Activation;
use bitnode_engine::cpu::SampleParams;
use bitnode_engine::model::Model;
use bitnode_engine::{EmbedDtype, Engine, EngineError, EngineOptions};
use bitnode_tests::{fixtures, tempdir};
use serde_json::Value;
use std::path::PathBuf;

const FORMS: [&str; 3] = ["tq2_0.gguf", "tq1_0.gguf", "i2_s.gguf"];

fn model_dir() -> PathBuf {
    fixtures().join("gguf_model")
}

fn opts(adapter: &str, embed: EmbedDtype) -> EngineOptions {
    EngineOptions {
        adapter: Some(adapter.into()),
        max_binding: None,
        embed_dtype: embed,
        lora: None,
        activation: None,
    }
}

/// A few hundred tokens of text (longer than the 64-token context, so scoring runs in windows).
fn text() -> String {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap()).unwrap();
    let mut s = String::new();
    for c in v["cases"].as_array().unwrap() {
        s.push_str(c["text"].as_str().unwrap());
        s.push('\n');
    }
    s
}

/// Everything a user sees from a model: config, tokens, logits, NLL, greedy tokens.
fn outcome(e: &mut Engine) -> (Vec<u32>, Vec<f32>, usize, f64, Vec<u32>) {
    let ids = e.tokenizer.encode(&text()).unwrap();
    let prompt = e.tokenizer.encode("The quick brown fox").unwrap();
    let logits = e.logits(&prompt).unwrap();
    let (n, total) = e.score_ids(&ids).unwrap();
    let gen = e
        .generate_ids(&prompt, 12, &SampleParams::default(), 0, false, &mut |_| true)
        .unwrap()
        .tokens;
    (ids, logits, n, total, gen)
}

#[test]
fn gguf_forms_match_their_safetensors_twin_on_the_cpu_reference() {
    let twin = model_dir().join("twin");
    let mut want = Engine::load(&twin, &opts("cpu", EmbedDtype::F32)).unwrap();
    let w = outcome(&mut want);
    assert!(w.0.len() > 64, "the text must span several context windows");
    let twin_layers = want.model.layers().unwrap().to_vec();
    for form in FORMS {
        let path = model_dir().join(form);
        let mut e = Engine::load(&path, &opts("cpu", EmbedDtype::F32)).unwrap_or_else(|err| panic!("{form}: {err}"));
        let (c, t) = (&e.model.config, &want.model.config);
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers),
            (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers),
            "{form}"
        );
        assert_eq!(
            (c.num_heads, c.num_kv_heads, c.head_dim),
            (t.num_heads, t.num_kv_heads, t.head_dim)
        );
        assert_eq!(
            (c.max_position_embeddings, c.rope_theta, c.rms_norm_eps as f32),
            (t.max_position_embeddings, t.rope_theta, t.rms_norm_eps as f32)
        );
        assert_eq!(
            (c.bos_token_id, &c.eos_token_ids),
            (t.bos_token_id, &t.eos_token_ids),
            "{form}"
        );
        assert_eq!(c.activation, Activation::Relu2, "{form}");
        assert!(e.model.tied(), "{form}: no output.weight means tied");
        assert_eq!(e.eos, want.eos, "{form}: stop tokens");
        // Decoded projections and norms equal the twin's exactly.
        assert_eq!(e.model.layers().unwrap(), &twin_layers[..], "{form}: layers");
        assert_eq!(e.model.norm, want.model.norm, "{form}: final norm");
        let (mut a, mut b) = (vec![0f32; 256], vec![0f32; 256]);
        for r in [0, 1, 200, 399] {
            e.model.embed.row_f32(r, &mut a);
            want.model.embed.row_f32(r, &mut b);
            assert_eq!(a, b, "{form}: embedding row {r}");
        }
        let g = outcome(&mut e);
        assert_eq!(g.0, w.0, "{form}: token ids");
        assert_eq!(g.1, w.1, "{form}: logits");
        assert_eq!((g.2, g.3), (w.2, w.3), "{form}: score (tokens, total NLL)");
        assert_eq!(g.4, w.4, "{form}: greedy tokens");
    }
}

/// The GPU path uploads the embedding from the GGUF's own types (Q4_K, F16, Q8_0) through the tile
/// fillers, in f32 and f16; the values are fp16-exact, so both agree with the twin.
#[test]
fn gguf_forms_match_their_twin_on_the_gpu() {
    for embed in [EmbedDtype::F32, EmbedDtype::F16] {
        let mut want = Engine::load(&model_dir().join("twin"), &opts("gpu", embed)).unwrap();
        let w = outcome(&mut want);
        for form in FORMS {
            let mut e = Engine::load(&model_dir().join(form), &opts("gpu", embed)).unwrap();
            let g = outcome(&mut e);
            assert_eq!(g.0, w.0, "{form}: token ids");
            let worst = g.1.iter().zip(&w.1).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-4, "{form} {embed:?}: logits differ by {worst}");
            assert_eq!(g.2, w.2);
            assert!(((g.3 - w.3) / g.2 as f64).abs() < 1e-4, "{form} {embed:?}: nll");
            assert_eq!(g.4, w.4, "{form} {embed:?}: greedy tokens");
        }
    }
}

/// Each GGUF form against transformers itself (`tests/reference/make_gguf_expected.py`, run on the form's
/// offline twin: packed ternary times the stored fp16 scale, the embedding as stored): the prompt's logits,
/// the windowed NLL within the parity tests' tolerance, and the greedy tokens; ReLU² forms against `twin`,
/// the gated SiLU form against `twin_silu`. On the CPU reference and on the GPU.
#[test]
fn gguf_forms_match_transformers_on_their_twin() {
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = [
        ("twin", &FORMS[..], Activation::Relu2),
        ("twin_silu", &["tq2_0_silu.gguf"][..], Activation::Silu),
    ];
    for (twin, forms, act) in cases {
        let exp: Value =
            serde_json::from_str(&std::fs::read_to_string(model_dir().join(twin).join("expected.json")).unwrap())
                .unwrap();
        let (prompt, score_ids) = (ids(&exp["prompt_ids"]), ids(&exp["score_ids"]));
        // Logits at every prompt position, [T, V].
        let want_logits: Vec<f32> = exp["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
            .collect();
        let want_nll = exp["score_nll"].as_f64().unwrap();
        for form in forms {
            for dev in ["cpu", "gpu"] {
                let mut e = Engine::load(&model_dir().join(form), &opts(dev, EmbedDtype::F32)).unwrap();
                assert_eq!(e.model.config.activation, act, "{form}");
                assert_eq!(
                    e.tokenizer.encode("The quick brown fox").unwrap(),
                    prompt,
                    "{form}: prompt ids"
                );
                assert_eq!(e.tokenizer.encode(&text()).unwrap(), score_ids, "{form}: text ids");
                let logits = e.logits(&prompt).unwrap();
                assert_eq!(logits.len(), want_logits.len(), "{form}: logits shape");
                let scale = want_logits.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1.0);
                let worst = logits
                    .iter()
                    .zip(&want_logits)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= 1e-4 * scale,
                    "{form} on {dev}: logits differ from transformers by {worst}"
                );
                let (n, total) = e.score_ids(&score_ids).unwrap();
                assert_eq!(n as u64, exp["score_tokens"].as_u64().unwrap(), "{form}");
                let nll = total / n as f64;
                assert!(
                    (nll - want_nll).abs() < 2e-3,
                    "{form} on {dev}: nll {nll} vs transformers {want_nll}"
                );
                let g = e
                    .generate_ids(&prompt, 12, &SampleParams::default(), 0, false, &mut |_| true)
                    .unwrap();
                assert_eq!(g.tokens, ids(&exp["greedy_ids"]), "{form} on {dev}: greedy tokens");
                eprintln!("{form} on {dev}: nll {nll:.6} vs transformers {want_nll:.6}, max logit error {worst:.2e}");
            }
        }
    }
}

/// The tokenizer rebuilt from `tokenizer.ggml.*` encodes and decodes like the model's tokenizer.json on the
/// awkward strings of tokenizer_cases.json (whose ids transformers produced), with and without
/// `tokenizer.ggml.pre` (microsoft's file has none), and carries the chat template.
#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap()).unwrap();
    let json = bitnode_engine::tokenizer::Tokenizer::load(&model_dir().join("twin")).unwrap();
    for form in FORMS {
        let tok = bitnode_engine::tokenizer::Tokenizer::load(&model_dir().join(form)).unwrap();
        assert_eq!(tok.vocab_size(), json.vocab_size(), "{form}");
        for c in v["cases"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(text).unwrap(), want, "{form}: encode {text:?}");
            assert_eq!(
                tok.encode_plain(text).unwrap(),
                json.encode_plain(text).unwrap(),
                "{form}: {text:?}"
            );
            assert_eq!(
                tok.decode(&want).unwrap(),
                c["decoded_skip_special"].as_str().unwrap(),
                "{form}: decode {text:?}"
            );
        }
        let specials = tok.gguf.as_ref().unwrap();
        assert!(specials
            .chat_template
            .as_deref()
            .unwrap()
            .contains("<|start_header_id|>"));
        assert_eq!(specials.bos_token.as_deref(), Some("<|begin_of_text|>"));
        // The data loader renders chats with the GGUF's template and texts.
        let spec = bitnode_engine::data::DataSpec::for_model(&model_dir().join(form), &tok, 396, 64);
        assert_eq!(spec.chat_template, specials.chat_template);
        assert_eq!(
            (spec.bos_token.as_str(), spec.eos_token.as_str()),
            ("<|begin_of_text|>", "<|end_of_text|>")
        );
    }
}

fn gguf_err(r: Result<Model, EngineError>) -> String {
    match r {
        Err(e @ EngineError::Gguf { .. }) => e.to_string(),
        Err(e) => panic!("expected a GGUF error, got {e}"),
        Ok(_) => panic!("a broken file loaded"),
    }
}

/// A truncated or corrupt file passed as the model is refused with the reader's reason and the path,
/// never a panic; so is a file that holds something else.
#[test]
fn broken_gguf_files_are_refused_clearly() {
    let src = std::fs::read(model_dir().join("tq2_0.gguf")).unwrap();
    let dir = tempdir("gguf-broken");
    // Cut inside the header (the token list) and inside the tensor data.
    for cut in [100, 4_000, src.len() / 2, src.len() - 1] {
        let p = dir.join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &src[..cut]).unwrap();
        let msg = gguf_err(Model::load(&p));
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        assert!(
            ["truncated", "past the end", "cannot fit"]
                .iter()
                .any(|w| msg.contains(w)),
            "cut at {cut}: {msg}"
        );
        // The engine and the tokenizer say the same, without panicking.
        assert!(Engine::load(&p, &opts("cpu", EmbedDtype::F32)).is_err());
        assert!(bitnode_engine::tokenizer::Tokenizer::load(&p).is_err());
    }
    let p = dir.join("not.gguf");
    std::fs::write(&p, b"{\"model_type\": \"bitnet\"}").unwrap();
    assert!(gguf_err(Model::load(&p)).contains("not a GGUF file"));
    // A huge tensor count in an otherwise valid header.
    let mut huge = src.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes()[..8]);
    let p = dir.join("huge.gguf");
    std::fs::write(&p, &huge).unwrap();
    let msg = Engine::load(&p, &opts("cpu", EmbedDtype::F32))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains(&p.display().to_string()) && msg.contains("cannot fit"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The activation rule: `bitnet.hidden_activation` wins, and the engine runs what it names: the same
/// weights under SiLU load as a SiLU model and score differently from their ReLU² form; the engine's
/// `activation` option (`--activation`) overrides the file.
#[test]
fn hidden_activation_picks_the_ffn() {
    let src = std::fs::read(model_dir().join("tq1_0.gguf")).unwrap();
    // tq1_0 says `bitnet.hidden_activation = "relu2"`; "swish" has the same length and means SiLU.
    let at = src.windows(5).position(|w| w == b"relu2").unwrap();
    let mut silu = src.clone();
    silu[at..at + 5].copy_from_slice(b"swish");
    let dir = tempdir("gguf-silu");
    let p = dir.join("silu.gguf");
    std::fs::write(&p, &silu).unwrap();
    let m = Model::load(&p).unwrap();
    assert_eq!(m.config.activation, Activation::Silu);
    assert_eq!(
        bitnode_engine::model::load_config(&p).unwrap().activation,
        Activation::Silu
    );
    let score = |path: &std::path::Path, activation: Option<Activation>| {
        let o = EngineOptions {
            activation,
            ..opts("cpu", EmbedDtype::F32)
        };
        let mut e = Engine::load(path, &o).unwrap();
        let ids = e.tokenizer.encode(&text()).unwrap();
        let (n, total) = e.score_ids(&ids).unwrap();
        total / n as f64
    };
    let relu_file = model_dir().join("tq1_0.gguf");
    let (relu, silu) = (score(&relu_file, None), score(&p, None));
    assert!(
        relu.is_finite() && silu.is_finite() && (relu - silu).abs() > 1e-3,
        "{relu} {silu}"
    );
    // `--activation` overrides the file either way.
    assert_eq!(score(&relu_file, Some(Activation::Silu)), silu);
    assert_eq!(score(&p, Some(Activation::Relu2)), relu);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bitnode model export --gguf`: a Hugging Face directory written as a `bitnet` TQ2_0 GGUF loads back as
/// the same model, tied (the twin) and untied (the twin given its own `lm_head`, written to `output.weight`
/// in F32), with the same tokens, logits, NLL and greedy tokens bit for bit on the CPU reference.
#[test]
fn exported_gguf_models_equal_their_source_tied_and_untied() {
    use safetensors::{tensor::TensorView, SafeTensors};
    let dir = tempdir("gguf-export");
    let src = model_dir().join("twin");
    let untied = dir.join("untied");
    std::fs::create_dir_all(&untied).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), untied.join(f)).unwrap();
    }
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = Value::Bool(false);
    std::fs::write(untied.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // A head unlike the embedding, of fp16-exact values: (k mod 17 - 8) / 64.
    let head: Vec<f32> = (0..400 * 256)
        .map(|k| ((k * 7919) % 17) as f32 / 64.0 - 0.125)
        .collect();
    let head_bytes: Vec<u8> = bytemuck::cast_slice(&head).to_vec();
    let mut views: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                TensorView::new(v.dtype(), v.shape().to_vec(), v.data()).unwrap(),
            )
        })
        .collect();
    views.push((
        "lm_head.weight".into(),
        TensorView::new(safetensors::Dtype::F32, vec![400, 256], &head_bytes).unwrap(),
    ));
    std::fs::write(
        untied.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    for (name, d, tied) in [("twin", src, true), ("untied", untied, false)] {
        let out = dir.join(format!("{name}.gguf"));
        let r = bitnode_engine::model_export::export_model(&d, &out).unwrap();
        assert_eq!((r.tied, r.max_scale_rounding), (tied, 0.0), "{name}: {r:?}");
        let mut want = Engine::load(&d, &opts("cpu", EmbedDtype::F32)).unwrap();
        let mut got = Engine::load(&out, &opts("cpu", EmbedDtype::F32)).unwrap();
        assert_eq!(got.model.tied(), tied, "{name}");
        assert_eq!(got.model.config.activation, Activation::Relu2);
        assert_eq!(
            got.model.layers().unwrap(),
            want.model.layers().unwrap(),
            "{name}: layers"
        );
        let (w, g) = (outcome(&mut want), outcome(&mut got));
        assert_eq!(g.0, w.0, "{name}: token ids");
        assert_eq!(g.1, w.1, "{name}: logits");
        assert_eq!((g.2, g.3), (w.2, w.3), "{name}: score");
        assert_eq!(g.4, w.4, "{name}: greedy tokens");
    }
    // Widths TQ2_0 cannot hold are refused with the reason.
    let e = bitnode_engine::model_export::export_model(&fixtures().join("online_tied"), &dir.join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 256"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
