//! The fast CPU kernels (issue 18, Engine IV): SIMD versions of the `cpu::*` reference ops on the same
//! packed layouts, chosen at run time by CPU feature, each with a portable path. The reference stays the
//! oracle: every kernel here has the reference function of the same name as its twin, and the tests compare
//! them on random shapes including ragged tails. Not yet behind a backend: this is the first kernel of the
//! fast CPU backend the issue asks for.
pub mod matmul_ternary;

pub use matmul_ternary::{matmul_ternary, matmul_ternary_portable, Path};
