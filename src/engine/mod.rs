//! Drives the models: the device worker thread that owns them ([`worker`]) and the
//! single-sequence generation loop ([`generate`]). The batching scheduler and the paged KV cache
//! come with the batched engine.

pub mod generate;
pub mod kv_blocks;
pub mod scheduler;
pub mod stop;
pub mod worker;
