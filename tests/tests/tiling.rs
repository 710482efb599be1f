//! Dynamic tiling: with a forced 32 KiB binding limit every large tensor (embedding / lm_head, fused
//! gate-up, q|k|v) is split into row tiles and prompts are run in small chunks. The outputs must be
//! bit-identical to the untiled run, because tiling only changes which dispatch computes a row. The
//! untiled run takes the prompt (65+ tokens) in one chunk, the tiled one in chunks of under 64.
use bitnode_engine::cpu::SampleParams;
use bitnode_engine::{EmbedDtype, Engine, EngineOptions};
use bitnode_tests::tempdir;

#[test]
fn forced_tiny_binding_limit_gives_identical_outputs() {
    let dir = tempdir("tiling");
    let p = bitnode_engine::synth::preset("tiny").unwrap();
    bitnode_engine::synth::synth(p, &dir, 11, bitnode_engine::synth::SynthFormat::Packed).unwrap();
    let run = |limit: Option<u64>, embed: EmbedDtype| {
        let o = EngineOptions {
            adapter: Some("gpu".into()),
            max_binding: limit,
            embed_dtype: embed,
            lora: None,
            activation: None,
        };
        let mut e = Engine::load(&dir, &o).unwrap();
        let ids = e
            .tokenizer
            .encode(&"tiling must not change a single bit. ".repeat(4))
            .unwrap();
        assert!(ids.len() > 64 && ids.len() < 128, "{} tokens", ids.len());
        let chunk = e.backend.max_chunk();
        let logits = e.logits(&ids).unwrap();
        let (n, nll) = e.score_ids(&ids).unwrap();
        let g = e
            .generate_ids(
                &ids[..20],
                24,
                &SampleParams {
                    temperature: 0.8,
                    top_k: 40,
                    top_p: 0.9,
                    repetition_penalty: 1.1,
                },
                5,
                false,
                &mut |_| true,
            )
            .unwrap();
        let mem = e.backend.memory();
        (logits, n, nll, g.tokens, chunk, mem)
    };
    for embed in [EmbedDtype::F32, EmbedDtype::F16] {
        let (l0, n0, s0, g0, c0, m0) = run(None, embed);
        let (l1, n1, s1, g1, c1, m1) = run(Some(32 * 1024), embed);
        assert!(
            c1 < 64 && c0 >= 128,
            "the limit must force prompt chunking (chunk {c1} vs {c0})"
        );
        assert!(m1.peak > 0 && m0.peak > 0);
        assert_eq!(l0, l1, "{embed:?}: logits differ between tiled and untiled runs");
        assert_eq!((n0, s0), (n1, s1), "{embed:?}: nll differs");
        assert_eq!(g0, g1, "{embed:?}: sampled continuation differs");
    }
}
