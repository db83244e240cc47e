//! Numerical operations with a CPU reference path; the CUDA twins (kernels/*.cu) join them under
//! the `cuda` feature and are tested against these references.

pub mod attention;
pub mod rng;
pub mod sampling;
pub mod similarity;
#[cfg(feature = "cuda")]
pub mod similarity_variants;

/// Result type of the ops layer.
pub type Result<T> = std::result::Result<T, crate::error::OpsError>;
