//! The fast CPU kernels (issue 18, Engine IV): SIMD versions of the `cpu::*` reference ops on the same
//! packed layouts, chosen at run time by CPU feature, each with a portable path. The reference stays the
//! oracle: every kernel here has the reference function of the same name as its twin, and the tests compare
//! them on random shapes including ragged tails. `--device cpu` runs the CPU backend with these kernels
//! (on the cores `probe::usable_cpus` allows); `--device cpu-reference` runs the reference ones.
pub mod lm_head;
pub mod matmul_ternary;

pub use lm_head::lm_head;
pub use matmul_ternary::{matmul_ternary, matmul_ternary_portable, matmul_ternary_threads, Path};
