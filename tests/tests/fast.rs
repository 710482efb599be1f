//! The fast CPU kernels (`bitnode_engine::fast`) against their reference twins (`cpu::*`): the same bits on
//! random shapes, ragged tails included, on every code path this CPU can run.
use bitnode_engine::rng::Rng;
use bitnode_engine::{cpu, fast};
use bitnode_tests::random_linear;

#[test]
fn fast_matmul_ternary_equals_the_reference_on_every_path() {
    let mut rng = Rng::new(18);
    let path = fast::matmul_ternary::path();
    eprintln!("this CPU's path: {path:?}");
    // Input widths: less than one 128-element group, whole groups, groups plus a ragged tail of words.
    for &(t, o, i) in &[
        (1usize, 7usize, 16usize),
        (1, 33, 112),
        (3, 64, 128),
        (2, 5, 144),
        (1, 96, 256),
        (17, 40, 400),
        (4, 24, 2576),
    ] {
        let w = random_linear(&mut rng, o, i);
        // The whole int8 range, -128 included (the quantizer never writes it, the kernel must not care).
        let q: Vec<i8> = (0..t * i).map(|_| rng.next_u64() as u8 as i8).collect();
        let s: Vec<f32> = (0..t).map(|_| 10.0 + 100.0 * rng.uniform()).collect();
        let mut want = vec![0f32; t * o];
        cpu::matmul_ternary(&mut want, &q, &s, &w, t);
        for p in [fast::Path::Avx2, fast::Path::Portable] {
            let mut got = vec![f32::NAN; t * o];
            fast::matmul_ternary::matmul_ternary_on(p, &mut got, &q, &s, &w, t);
            let off = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(off, 0, "{p:?} {t}x{o}x{i}: {off} of {} outputs differ", t * o);
        }
        let mut got = vec![f32::NAN; t * o];
        fast::matmul_ternary(&mut got, &q, &s, &w, t);
        assert_eq!(got, want, "the default path, {t}x{o}x{i}");
    }
}

/// `--device cpu` (the fast kernels, on threads) gives the reference backend's bits: logits of every
/// position, the windowed NLL and greedy tokens, on a transformers fixture and on the GGUF twin (whose
/// 256-wide rows take the AVX2 groups), with and without continuous batching's slots.
#[test]
fn the_fast_cpu_backend_equals_the_reference() {
    use bitnode_engine::{EmbedDtype, Engine, EngineOptions};
    let opts = |dev: &str| EngineOptions {
        adapter: Some(dev.into()),
        embed_dtype: EmbedDtype::F32,
        ..Default::default()
    };
    for dir in [
        bitnode_tests::fixtures().join("online_untied"),
        bitnode_tests::fixtures().join("gguf_model/tq2_0.gguf"),
    ] {
        let mut want = Engine::load(&dir, &opts("cpu-reference")).unwrap();
        let mut got = Engine::load(&dir, &opts("cpu")).unwrap();
        assert!(
            got.backend.device_name().starts_with("cpu ("),
            "{}",
            got.backend.device_name()
        );
        assert_eq!(want.backend.device_name(), "cpu reference");
        let ids: Vec<u32> = (0..150u32).map(|i| (i * 37 + 5) % 390).collect();
        assert_eq!(
            got.logits(&ids[..40]).unwrap(),
            want.logits(&ids[..40]).unwrap(),
            "{}",
            dir.display()
        );
        assert_eq!(
            got.score_ids(&ids).unwrap(),
            want.score_ids(&ids).unwrap(),
            "{}",
            dir.display()
        );
        let p = bitnode_engine::cpu::SampleParams::default();
        let g = |e: &mut Engine| {
            e.generate_ids(&ids[..7], 12, &p, 0, false, &mut |_| true)
                .unwrap()
                .tokens
        };
        assert_eq!(g(&mut got), g(&mut want), "{}", dir.display());
    }
}

/// The fast lm_head (transposed head, eight rows per register, threads over 64-row blocks) gives the
/// reference's bits on both paths, a ragged last block included.
#[test]
fn fast_lm_head_equals_the_reference() {
    let mut rng = Rng::new(19);
    for &(t, c, v) in &[(1usize, 64usize, 400usize), (3, 256, 64), (5, 96, 1000), (2, 768, 129)] {
        let x = bitnode_tests::randn(&mut rng, t * c, 1.0);
        let w = bitnode_tests::randn(&mut rng, v * c, 0.5);
        let mut want = vec![0f32; t * v];
        cpu::lm_head(&mut want, &x, &w, t, c, v);
        let wt = fast::lm_head::transpose(&w, v, c);
        for p in [fast::Path::Avx2, fast::Path::Portable] {
            for threads in [1, 2, 3] {
                let mut got = vec![f32::NAN; t * v];
                fast::lm_head::lm_head_on(p, &mut got, &x, &wt, t, c, v, threads);
                let off = got
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(off, 0, "{p:?} {threads} threads {t}x{c}x{v}: {off} logits differ");
            }
        }
    }
}
