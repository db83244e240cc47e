//! Drives the models: the device worker thread that owns them ([`worker`]), the continuous
//! batching scheduler over the paged KV cache ([`scheduler`]) and the single-sequence generation
//! loop of the command line ([`generate`]).

pub mod generate;
pub mod scheduler;
pub mod stop;
pub mod worker;
