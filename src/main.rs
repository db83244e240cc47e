//! The `cited` command line: parses arguments into a [`Config`] and dispatches.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Parser;

use cited::config::{Args, Command, Config};
use cited::engine::generate::generate_greedy;
use cited::models::bert::Embedder;
use cited::models::chat_template::{ChatMessage, ChatTemplate, Role};
use cited::models::gguf::GgufFile;
use cited::models::llama::Llama;
use cited::models::tokenizer::BpeTokenizer;

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match &args.command {
        Command::Embed { texts } => {
            let cfg = Config::from_args(&args.models, true, false)?;
            let device = cfg.device.open()?;
            let embedder = Embedder::load(&cfg.embedder, &device)?;
            let vectors = embedder.embed(texts)?.to_vec2::<f32>()?;
            println!("{}", serde_json::to_string(&vectors)?);
        }
        Command::Generate {
            prompt,
            system,
            max_tokens,
        } => {
            let cfg = Config::from_args(&args.models, false, true)?;
            let device = cfg.device.open()?;
            let mut file = GgufFile::open(&cfg.generator)?;
            let tokenizer = BpeTokenizer::from_gguf(file.content())?;
            let model = Llama::from_gguf(&mut file, &device, cfg.weights)?;
            let source = tokenizer
                .chat_template()
                .context("the GGUF file carries no chat template")?;
            let bos = tokenizer
                .bos_id()
                .and_then(|id| tokenizer.token_text(id))
                .unwrap_or("");
            let eos = tokenizer
                .eos_id()
                .and_then(|id| tokenizer.token_text(id))
                .unwrap_or("");
            let template = ChatTemplate::new(source, bos, eos)?;
            let ids = template.encode(
                &tokenizer,
                system,
                &[ChatMessage::new(Role::User, prompt)],
                true,
            )?;
            let mut stdout = std::io::stdout();
            let out = generate_greedy(&model, &tokenizer, &ids, *max_tokens, |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            })?;
            println!();
            let decode_rate = if out.tokens.len() > 1 {
                (out.tokens.len() - 1) as f64 / out.decode.as_secs_f64()
            } else {
                0.0
            };
            tracing::info!(
                prompt_tokens = out.prompt_tokens,
                generated = out.tokens.len(),
                stop = ?out.stop,
                prefill_tok_s = format!("{:.1}", out.prompt_tokens as f64 / out.prefill.as_secs_f64()),
                decode_tok_s = format!("{decode_rate:.1}"),
                "generation finished"
            );
        }
        Command::Tokenize { text, special } => {
            let cfg = Config::from_args(&args.models, false, true)?;
            let file = GgufFile::open(&cfg.generator)?;
            let tokenizer = BpeTokenizer::from_gguf(file.content())?;
            println!("{:?}", tokenizer.encode(text, *special)?);
        }
    }
    Ok(())
}
