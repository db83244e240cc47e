//! Numerical operations with a CPU reference path; the CUDA twins (kernels/*.cu) join them under
//! the `cuda` feature and are tested against these references.

pub mod attention;
