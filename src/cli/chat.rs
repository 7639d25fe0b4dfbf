//! `moss chat`: the engine in the terminal, streaming each answer to stdout.

use std::io::{BufRead, Write};

use clap::Args;

use super::{start_engine, ModelArgs};
use crate::config::Config;
use crate::engine::{ChatMessage, EngineHandle, Event, GenerateRequest, Role};

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Ask one question, print the answer and exit (otherwise: a REPL on stdin).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Sampling temperature (0 = greedy, deterministic).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Longest answer in tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Seed for sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Replace the configured system prompt.
    #[arg(long)]
    pub system: Option<String>,
}

pub fn run(config: &Config, args: ChatArgs) -> anyhow::Result<()> {
    let engine = start_engine(config, &args.model)?;
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(prompt) = &args.prompt {
        history.push(ChatMessage::new(Role::User, prompt.clone()));
        answer(config, &args, &engine, &history)?;
        return Ok(());
    }
    eprintln!(
        "moss chat with {} — an empty line or Ctrl-D ends, /reset forgets the conversation",
        engine.info.name
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        if line.trim() == "/reset" {
            history.clear();
            continue;
        }
        history.push(ChatMessage::new(Role::User, line.trim_end().to_string()));
        let reply = answer(config, &args, &engine, &history)?;
        history.push(ChatMessage::new(Role::Assistant, reply));
    }
}

/// Streams one answer to stdout and returns its text.
fn answer(
    config: &Config,
    args: &ChatArgs,
    engine: &EngineHandle,
    history: &[ChatMessage],
) -> anyhow::Result<String> {
    let max_tokens = args.max_tokens.unwrap_or(config.engine.max_tokens);
    let system = args
        .system
        .as_deref()
        .unwrap_or(&config.engine.system_prompt);
    let prompt = engine.prompt(Some(system), history, max_tokens)?;
    let mut sampling = config.engine.sampling.params();
    if let Some(t) = args.temperature {
        sampling.temperature = t;
    }
    if args.seed.is_some() {
        sampling.seed = args.seed;
    }
    let request = GenerateRequest {
        prompt: prompt.ids,
        sampling,
        max_tokens,
        stop: config.engine.stop.clone(),
        ignore_eos: false,
        ..Default::default()
    };
    let mut events = engine.generate(request)?;
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Started | Event::Logprob(_) | Event::ToolCall(_) => {}
            Event::Text(piece) => {
                out.write_all(piece.as_bytes())?;
                out.flush()?;
                text.push_str(&piece);
            }
            Event::Done {
                finish_reason,
                usage,
                ..
            } => {
                writeln!(out)?;
                tracing::info!(
                    finish = finish_reason.as_str(),
                    prompt = usage.prompt_tokens,
                    completion = usage.completion_tokens,
                    "answer done"
                );
                return Ok(text);
            }
            Event::Error(e) => anyhow::bail!("generation failed: {e}"),
        }
    }
    anyhow::bail!("the engine stopped before the answer was complete")
}
