//! Cited answers: retrieve passages, build the prompt, generate, and turn the model's `[n]`
//! markers into citations of the passages it was given ([`pipeline`]); prompt rules and passage
//! hygiene ([`prompt`]); the streaming marker tracker ([`citations`]).

pub mod citations;
pub mod grounding;
pub mod pipeline;
pub mod prompt;
pub mod safety;
pub mod template;

pub use pipeline::{AnswerEvent, AnswerRequest, GroundingMode, Pipeline, RagConfig};
pub use prompt::Audience;
