//! Numerical operations with a CPU reference path; the CUDA twins (kernels/*.cu) join them under
//! the `cuda` feature and are tested against these references.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod bert_fused;
pub mod paged_attention;
pub mod qmatmul;
pub mod rng;
pub mod sampling;
pub mod similarity;
#[cfg(feature = "cuda")]
pub mod similarity_variants;

/// Result type of the ops layer.
pub type Result<T> = std::result::Result<T, crate::error::OpsError>;

/// A raw output pointer shared by the tasks of one parallel op, each writing its own disjoint
/// elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: every op that shares one writes disjoint elements from its tasks and waits for all of
// them before the buffer is read.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
