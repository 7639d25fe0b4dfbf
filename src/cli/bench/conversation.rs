//! `moss bench --turns`: a growing conversation, each turn's time to first token.

use std::time::Instant;

use crate::config::Config;
use crate::engine::{EngineHandle, Event, GenerateRequest, SamplingParams};

/// A conversation of `turns` turns with the configured system prompt; prints each turn's prompt
/// length and time to first token.
pub(super) fn conversation(
    engine: &EngineHandle,
    config: &Config,
    turns: usize,
    gen: usize,
) -> anyhow::Result<()> {
    use crate::engine::{ChatMessage, Role};
    let topics = [
        "the history of Paris",
        "how bridges carry load",
        "why the sky is blue",
        "the rules of chess",
        "how bread rises",
        "what a compiler does",
        "the water cycle",
        "how vaccines work",
        "the life of bees",
        "how tides happen",
    ];
    let system = config.engine.system_prompt.as_str();
    let mut history: Vec<ChatMessage> = Vec::new();
    let mut first_ttft = None;
    for turn in 0..turns {
        let topic = topics[turn % topics.len()];
        history.push(ChatMessage::new(
            Role::User,
            format!("Please tell me about {topic}, in a few sentences, for a curious student."),
        ));
        let prompt = engine.prompt(Some(system), &history, gen)?.ids;
        let n = prompt.len();
        let request = GenerateRequest {
            prompt,
            sampling: SamplingParams::greedy(),
            max_tokens: gen,
            stop: vec![],
            ignore_eos: false,
            ..Default::default()
        };
        let start = Instant::now();
        let mut rx = engine.generate(request)?;
        let (mut ttft, mut answer) = (None, String::new());
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Text(t) => {
                    ttft.get_or_insert(start.elapsed().as_secs_f64() * 1000.0);
                    answer.push_str(&t);
                }
                Event::Done { .. } => break,
                Event::Error(e) => anyhow::bail!(e),
                Event::Started | Event::Logprob(_) | Event::ToolCall(_) => {}
            }
        }
        let ttft = ttft.unwrap_or(f64::NAN);
        let first = *first_ttft.get_or_insert(ttft);
        println!(
            "turn {:>2}: prompt {:>5} tokens, first token {:>7.0} ms ({:.2}x turn 1)",
            turn + 1,
            n,
            ttft,
            ttft / first
        );
        history.push(ChatMessage::new(Role::Assistant, answer));
    }
    println!(
        "prefix tokens reused: {}",
        engine
            .stats
            .prefix_tokens_reused
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
