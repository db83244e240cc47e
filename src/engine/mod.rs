//! Drives the models. For now a single-sequence generation loop; the batching scheduler, the
//! paged KV cache and the device worker thread come with the batched engine.

pub mod generate;
