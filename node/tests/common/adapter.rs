//! Comparing two PEFT adapters (`adapter_model.safetensors`, f32 tensors), shared by the test binaries
//! that check a delegated or failed-over fine-tune against an uninterrupted run.

/// Max |a - b| over the adapters' tensors; fails the test unless both hold the same names and shapes.
pub fn max_abs_diff(a: &[u8], b: &[u8]) -> f32 {
    let (a, b) = (
        safetensors::SafeTensors::deserialize(a).unwrap(),
        safetensors::SafeTensors::deserialize(b).unwrap(),
    );
    let sorted = |st: &safetensors::SafeTensors| {
        let mut n: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        n.sort();
        n
    };
    let names = sorted(&a);
    assert_eq!(names, sorted(&b), "the adapters hold different tensors");
    let f32s = |d: &[u8]| -> Vec<f32> {
        d.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let mut worst = 0f32;
    for n in &names {
        let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
        assert_eq!(x.shape(), y.shape(), "{n}");
        for (p, q) in f32s(x.data()).iter().zip(f32s(y.data())) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}
