//! LoRA adapters as llama.cpp LoRA GGUF files (`bitnode adapter export`, `--adapter FILE.gguf`): the
//! exported file read back by the engine's strict reader has llama.cpp's keys, names, shapes (PEFT
//! orientation) and the safetensors values; loaded as an adapter it gives the PEFT directory's NLL exactly
//! on the CPU reference; corrupt or mismatched files are refused with a message that names the problem.
use bitnode_engine::gguf::{GgmlType, Gguf, GgufWriter, Value};
use bitnode_engine::lora::{export_gguf, gguf_key, shape, Adapter, TARGETS};
use bitnode_engine::model::Model;
use bitnode_engine::rng::Rng;
use bitnode_engine::{Engine, EngineOptions};
use bitnode_tests::{fixtures, tempdir};
use serde_json::Value as Json;
use std::path::Path;

fn expected() -> Json {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("lora").join("expected.json")).unwrap()).unwrap()
}

fn held_out_ids() -> Vec<u32> {
    expected()["held_out_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Mean NLL of `ids` on the CPU reference, with an adapter (a directory or a GGUF file) or without.
fn nll(model: &Path, lora: Option<&Path>, ids: &[u32]) -> f64 {
    let opts = EngineOptions {
        adapter: Some("cpu".into()),
        lora: lora.map(Path::to_path_buf),
        ..Default::default()
    };
    let mut eng = Engine::load(model, &opts).unwrap();
    let (n, total) = eng.score_ids(ids).unwrap();
    total / n as f64
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn exported_adapter_reads_back_and_scores_as_the_peft_directory() {
    let e = expected();
    let base = fixtures().join(e["base"].as_str().unwrap());
    let peft = fixtures().join("lora").join("final_adapter");
    let model = Model::load(&base).unwrap();
    let cfg = &model.config;
    let want = Adapter::load(&peft, cfg).unwrap();
    let out = tempdir("lora-gguf").join("adapter.gguf");
    let r = export_gguf(&peft, &base, &out).unwrap();
    assert_eq!(
        r.architecture, "bitnet",
        "a Hugging Face BitNet directory is llama.cpp's `bitnet`"
    );
    assert_eq!((r.rank, r.alpha), (want.rank, want.alpha));
    assert_eq!(r.tensors, 2 * 7 * cfg.num_layers);
    // No temporary file is left beside it.
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().collect();
    assert_eq!(left.len(), 1);

    // The file through the strict reader: llama.cpp's keys and types, names, ne and values.
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len() as u64, r.bytes);
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get("general.architecture"), Some(&Value::String("bitnet".into())));
    assert_eq!(g.get("general.type"), Some(&Value::String("adapter".into())));
    assert_eq!(g.get("adapter.type"), Some(&Value::String("lora".into())));
    assert_eq!(g.get("adapter.lora.alpha"), Some(&Value::F32(want.alpha)));
    assert_eq!(g.tensors().len(), r.tensors);
    for l in 0..cfg.num_layers {
        for t in 0..TARGETS.len() {
            let p = want.layers[l][t].as_ref().unwrap();
            let (o, i) = shape(cfg, t);
            for (ab, ne, vals) in [('A', [i, want.rank], &p.a), ('B', [want.rank, o], &p.b)] {
                let name = gguf_key(l, t, ab);
                let ti = g.tensor(&name).unwrap_or_else(|| panic!("{name} missing"));
                assert_eq!(ti.ty, GgmlType::F32, "{name}");
                assert_eq!(ti.ne, ne, "{name}: PEFT orientation");
                assert_eq!(&f32s(g.tensor_data(ti, &bytes).unwrap()), vals, "{name}");
            }
        }
    }
    assert_eq!(gguf_key(3, 3, 'A'), "blk.3.attn_output.weight.lora_a");
    assert_eq!(gguf_key(0, 6, 'B'), "blk.0.ffn_down.weight.lora_b");

    // Loaded back as an adapter: the same adapter, and the same NLL as the PEFT directory on the CPU
    // reference (the same f32 numbers, so exactly), which is PEFT's own NLL within the usual tolerance.
    assert_eq!(Adapter::load(&out, cfg).unwrap(), want);
    let ids = held_out_ids();
    let from_dir = nll(&base, Some(&peft), &ids);
    let from_gguf = nll(&base, Some(&out), &ids);
    assert_eq!(
        from_gguf, from_dir,
        "GGUF adapter {from_gguf} vs PEFT directory {from_dir}"
    );
    let peft_nll = e["held_out_nll_final"].as_f64().unwrap();
    assert!((from_gguf - peft_nll).abs() < 1e-4, "{from_gguf} vs PEFT {peft_nll}");
    assert!(
        (nll(&base, None, &ids) - from_gguf).abs() > 1e-3,
        "the adapter is applied"
    );

    // An adapter for another model's shapes is refused by the shape check.
    let other = Model::load(&fixtures().join("gguf_model").join("tq2_0.gguf")).unwrap();
    if other.config.hidden_size != cfg.hidden_size {
        let err = Adapter::load(&out, &other.config).unwrap_err().to_string();
        assert!(err.contains("ne = ["), "{err}");
        assert!(export_gguf(&peft, &fixtures().join("gguf_model").join("tq2_0.gguf"), &out).is_err());
    }
}

/// A GGUF base: the architecture comes from its file, and the adapter applied to the GGUF model scores as
/// the PEFT directory applied to the model's Hugging Face twin.
#[test]
fn adapter_for_a_gguf_base_takes_its_architecture() {
    let base = fixtures().join("gguf_model").join("tq2_0.gguf");
    let twin = fixtures().join("gguf_model").join("twin");
    let model = Model::load(&base).unwrap();
    let mut a = Adapter::init(&model.config, 4, 8.0, &["q_proj", "v_proj", "down_proj"], 5).unwrap();
    let mut rng = Rng::new(9);
    for p in a.pairs_mut() {
        p.b.iter_mut().for_each(|x| *x = 0.05 * rng.normal());
    }
    let dir = tempdir("lora-gguf-base");
    a.save(&dir.join("peft"), "tq2_0").unwrap();
    let out = dir.join("a.gguf");
    let r = export_gguf(&dir.join("peft"), &base, &out).unwrap();
    let arch = Gguf::parse(&std::fs::read(&base).unwrap())
        .unwrap()
        .architecture()
        .unwrap()
        .to_string();
    assert_eq!(r.architecture, arch);
    assert_eq!(r.tensors, 2 * 3 * model.config.num_layers);
    let back = Adapter::load(&out, &model.config).unwrap();
    assert_eq!(back, a);
    assert_eq!(back.targets(), vec!["q_proj", "v_proj", "down_proj"]);
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % model.config.vocab_size as u32).collect();
    let on_gguf = nll(&base, Some(&out), &ids);
    let on_twin = nll(&twin, Some(&dir.join("peft")), &ids);
    assert_eq!(on_gguf, on_twin);
    assert!(
        (nll(&base, None, &ids) - on_gguf).abs() > 1e-4,
        "the adapter is applied"
    );
}

/// A small valid adapter file for the `online_tied` model, built key by key so that each test below can
/// break one thing.
fn write(path: &Path, f: impl FnOnce(&mut GgufWriter)) {
    let mut w = GgufWriter::new();
    f(&mut w);
    std::fs::write(path, w.to_bytes()).unwrap();
}

#[test]
fn corrupt_and_mismatched_adapter_ggufs_are_refused_clearly() {
    let base = fixtures().join("online_tied");
    let model = Model::load(&base).unwrap();
    let cfg = &model.config;
    let dir = tempdir("lora-gguf-bad");
    let good = dir.join("good.gguf");
    export_gguf(&fixtures().join("lora").join("final_adapter"), &base, &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let err = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        Adapter::load(&p, cfg).unwrap_err().to_string()
    };
    let check = |e: String, want: &str| assert!(e.contains(want), "expected {want:?} in: {e}");

    check(
        err("truncated.gguf", &bytes[..bytes.len() - 100]),
        "past the end of the file",
    );
    check(err("header.gguf", &bytes[..40]), "metadata count = 5 cannot fit");
    let mut m = bytes.clone();
    m[0] = b'X';
    check(err("magic.gguf", &m), "not a GGUF file");
    check(err("empty.gguf", &[]), "truncated GGUF");
    // A model file given as an adapter.
    let e = Adapter::load(&fixtures().join("gguf_model").join("tq2_0.gguf"), cfg)
        .unwrap_err()
        .to_string();
    check(e, "not a LoRA adapter");

    let (o, i) = shape(cfg, 0);
    let header = |w: &mut GgufWriter, arch: &str| {
        w.add_str("general.architecture", arch).unwrap();
        w.add_str("general.type", "adapter").unwrap();
        w.add_str("adapter.type", "lora").unwrap();
    };
    let pair = |w: &mut GgufWriter, l: usize, r: usize| {
        w.add_f32(&gguf_key(l, 0, 'A'), &[i, r], &vec![0.1; i * r]).unwrap();
        w.add_f32(&gguf_key(l, 0, 'B'), &[r, o], &vec![0.2; r * o]).unwrap();
    };
    let load = |name: &str, f: &dyn Fn(&mut GgufWriter)| {
        let p = dir.join(name);
        write(&p, |w| f(w));
        Adapter::load(&p, cfg)
    };
    // Valid without alpha: scale 1, as llama.cpp takes it.
    let a = load("noalpha.gguf", &|w| {
        header(w, "bitnet");
        pair(w, 0, 2);
    })
    .unwrap();
    assert_eq!((a.rank, a.alpha, a.targets()), (2, 2.0, vec!["q_proj"]));
    let e = |name: &str, f: &dyn Fn(&mut GgufWriter)| load(name, f).unwrap_err().to_string();
    check(
        e("arch.gguf", &|w| {
            header(w, "llama");
            pair(w, 0, 2);
        }),
        "another architecture",
    );
    check(
        e("type.gguf", &|w| {
            w.add_str("general.architecture", "bitnet").unwrap();
            w.add_str("general.type", "adapter").unwrap();
            w.add_str("adapter.type", "control_vector").unwrap();
            pair(w, 0, 2);
        }),
        "only \"lora\"",
    );
    check(
        e("alpha.gguf", &|w| {
            header(w, "bitnet");
            w.add_str("adapter.lora.alpha", "16").unwrap();
            pair(w, 0, 2);
        }),
        "adapter.lora.alpha",
    );
    check(
        e("unpaired.gguf", &|w| {
            header(w, "bitnet");
            pair(w, 0, 2);
            w.add_f32(&gguf_key(1, 0, 'A'), &[i, 2], &vec![0.1; i * 2]).unwrap();
        }),
        "has no blk.1.attn_q.weight.lora_b",
    );
    check(
        e("rank.gguf", &|w| {
            header(w, "bitnet");
            pair(w, 0, 2);
            pair(w, 1, 3);
        }),
        "blk.1.attn_q.weight.lora_a",
    );
    check(
        e("transposed.gguf", &|w| {
            header(w, "bitnet");
            w.add_f32(&gguf_key(0, 0, 'A'), &[2, i], &vec![0.1; i * 2]).unwrap();
        }),
        "ne = [2, ",
    );
    check(
        e("layer.gguf", &|w| {
            header(w, "bitnet");
            pair(w, cfg.num_layers, 2);
        }),
        &format!("layer {}", cfg.num_layers),
    );
    check(
        e("name.gguf", &|w| {
            header(w, "bitnet");
            pair(w, 0, 2);
            w.add_f32("token_embd.weight.lora_a", &[1], &[0.0]).unwrap();
        }),
        "token_embd.weight.lora_a\": not a LoRA tensor",
    );
    check(
        e("nan.gguf", &|w| {
            header(w, "bitnet");
            w.add_f32(&gguf_key(0, 0, 'A'), &[i, 1], &vec![f32::NAN; i]).unwrap();
            w.add_f32(&gguf_key(0, 0, 'B'), &[1, o], &vec![0.0; o]).unwrap();
        }),
        "is NaN",
    );
    check(
        e("none.gguf", &|w| {
            header(w, "bitnet");
        }),
        "no LoRA tensors",
    );
    // rsLoRA cannot be expressed in llama.cpp's format: export refuses it.
    let peft = dir.join("rslora");
    Adapter::load(&fixtures().join("lora").join("final_adapter"), cfg)
        .unwrap()
        .save(&peft, "online_tied")
        .unwrap();
    let cpath = peft.join("adapter_config.json");
    let mut c: Json = serde_json::from_str(&std::fs::read_to_string(&cpath).unwrap()).unwrap();
    c["use_rslora"] = Json::Bool(true);
    std::fs::write(&cpath, c.to_string()).unwrap();
    let e = export_gguf(&peft, &base, &dir.join("rs.gguf")).unwrap_err().to_string();
    check(e, "use_rslora");
    assert!(!dir.join("rs.gguf").exists());
}
