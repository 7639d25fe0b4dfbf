//! `moss bench`: prefill and decode speed, time to first token and aggregate throughput, measured
//! through the same engine handle that serves requests.

use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::{start_engine, ModelArgs};
use crate::config::Config;
use crate::engine::{EngineHandle, Event, GenerateRequest, Grammar, SamplingParams};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to generate per stream.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Streams submitted at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Instead: a conversation of this many turns, printing each turn's time to first token
    /// (the prompt grows with the history; the prefix cache should keep the time flat).
    #[arg(long)]
    pub turns: Option<usize>,
    /// Also measure with every stream held to a JSON schema (a list of records, the response
    /// format's grammar), printed next to the same run without.
    #[arg(long)]
    pub schema: bool,
}

/// The schema `--schema` holds streams to: records with open strings, so the answer does not
/// end before `--gen-tokens`.
fn bench_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "kind": {"enum": ["fruit", "tool", "city"]},
                "count": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}}
            },
            "required": ["name", "kind", "count", "tags"],
            "additionalProperties": false
        }
    })
}

/// The figures `moss bench` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub concurrency: usize,
    /// Prompt tokens per second of prefill (mean over streams).
    pub prefill_tok_s: f64,
    /// Generated tokens per second of one stream's decode steps (mean over streams).
    pub decode_tok_s: f64,
    /// Mean time from submitting a request to its first text.
    pub ttft_ms: f64,
    /// Generated tokens of all streams per second of wall time (prefill included).
    pub aggregate_tok_s: f64,
    /// Tokens per second of all streams together while every one of them is decoding.
    pub aggregate_decode_tok_s: f64,
}

/// A prompt of exactly `n` tokens cut from ordinary English text.
pub fn synthetic_prompt(engine: &EngineHandle, n: usize) -> anyhow::Result<Vec<u32>> {
    let text = "The quick brown fox jumps over the lazy dog while the committee discusses the budget for next year. ";
    let unit = engine.info.prompts.encode_text(text)?;
    anyhow::ensure!(!unit.is_empty(), "the tokenizer produced no tokens");
    Ok(unit.iter().copied().cycle().take(n.max(1)).collect())
}

/// Runs `concurrency` greedy generations of `gen` tokens on a prompt of `prompt` tokens.
pub fn measure(
    engine: &EngineHandle,
    prompt: usize,
    gen: usize,
    concurrency: usize,
) -> anyhow::Result<BenchReport> {
    measure_with(engine, prompt, gen, concurrency, None)
}

/// `measure`, every stream held to `grammar` when one is given.
pub fn measure_with(
    engine: &EngineHandle,
    prompt: usize,
    gen: usize,
    concurrency: usize,
    grammar: Option<Grammar>,
) -> anyhow::Result<BenchReport> {
    let ids = synthetic_prompt(engine, prompt)?;
    let request = GenerateRequest {
        prompt: ids,
        sampling: SamplingParams::greedy(),
        max_tokens: gen,
        stop: vec![],
        ignore_eos: true,
        grammar,
        ..Default::default()
    };
    let start = Instant::now();
    let streams = (0..concurrency.max(1))
        .map(|_| engine.generate(request.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let mut first: Option<f64> = None;
                let mut pieces = Vec::new();
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        Event::Text(_) => {
                            let now = start.elapsed().as_secs_f64();
                            first.get_or_insert(now);
                            pieces.push(now);
                        }
                        Event::Done { usage, timings, .. } => {
                            return Ok((first.unwrap_or(f64::NAN), usage, timings, pieces))
                        }
                        Event::Error(e) => return Err(anyhow::anyhow!(e)),
                        _ => {}
                    }
                }
                Err(anyhow::anyhow!("engine stopped"))
            })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("bench thread panicked"))??,
        );
    }
    let wall = start.elapsed().as_secs_f64();
    for r in &results {
        tracing::debug!(
            first = r.0,
            last = r.3.last().copied().unwrap_or(f64::NAN),
            pieces = r.3.len(),
            "bench stream"
        );
    }
    let n = results.len() as f64;
    // The window in which every stream is decoding: after the last first piece, before the
    // first stream's last piece.
    let from = results.iter().map(|r| r.0).fold(0.0, f64::max);
    let to = results
        .iter()
        .map(|r| r.3.last().copied().unwrap_or(0.0))
        .fold(f64::MAX, f64::min);
    let inside: usize = results
        .iter()
        .map(|r| r.3.iter().filter(|t| **t > from && **t <= to).count())
        .sum();
    let aggregate_decode_tok_s = if to > from {
        inside as f64 / (to - from)
    } else {
        f64::NAN
    };
    type Stream = (f64, crate::engine::Usage, crate::engine::Timings, Vec<f64>);
    let mean = |f: &dyn Fn(&Stream) -> f64| results.iter().map(f).sum::<f64>() / n;
    let completion: usize = results.iter().map(|r| r.1.completion_tokens).sum();
    Ok(BenchReport {
        model: engine.info.name.clone(),
        device: engine.info.device.clone(),
        prompt_tokens: prompt,
        gen_tokens: gen,
        concurrency: results.len(),
        prefill_tok_s: mean(&|r| r.1.prompt_tokens as f64 / r.2.prefill.as_secs_f64()),
        decode_tok_s: mean(&|r| {
            (r.1.completion_tokens.saturating_sub(1)) as f64 / r.2.decode.as_secs_f64()
        }),
        ttft_ms: mean(&|r| r.0 * 1000.0),
        aggregate_tok_s: completion as f64 / wall,
        aggregate_decode_tok_s,
    })
}

pub fn run(config: &Config, args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.gen_tokens >= 2, "--gen-tokens must be at least 2");
    // The bench measures the engine: it may run every requested stream together (up to
    // engine.max_batch) whatever the service admits as running (limits.max_running).
    let mut config = config.clone();
    config.limits.max_running = config.limits.max_running.max(args.concurrency);
    let config = &config;
    let engine = start_engine(config, &args.model)?;
    measure(&engine, 8, 4, 1)?; // warm-up: first-touch allocations, caches
    if let Some(turns) = args.turns {
        return conversation(&engine, config, turns, args.gen_tokens);
    }
    let report = measure(
        &engine,
        args.prompt_tokens,
        args.gen_tokens,
        args.concurrency,
    )?;
    if args.schema {
        return compare_schema(&engine, &args, report);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("model            {} on {}", report.model, report.device);
        println!(
            "prompt / gen     {} / {} tokens, {} stream(s)",
            report.prompt_tokens, report.gen_tokens, report.concurrency
        );
        println!("prefill          {:.1} tok/s", report.prefill_tok_s);
        println!("decode           {:.1} tok/s", report.decode_tok_s);
        println!("first token      {:.0} ms", report.ttft_ms);
        println!(
            "aggregate        {:.1} tok/s (prefill included), {} while all decode",
            report.aggregate_tok_s,
            if report.aggregate_decode_tok_s.is_nan() {
                "never all decoding at once (concurrency above engine.max_batch?)".to_string()
            } else {
                format!("{:.1} tok/s", report.aggregate_decode_tok_s)
            }
        );
    }
    Ok(())
}

/// The same run with every stream held to `bench_schema`, alternating with runs without (the
/// first one without is `plain`), and the ratio of the two.
fn compare_schema(
    engine: &EngineHandle,
    args: &BenchArgs,
    plain: BenchReport,
) -> anyhow::Result<()> {
    let grammar = Grammar::JsonSchema(bench_schema());
    engine
        .info
        .vocabulary
        .prepare()
        .map_err(|e| anyhow::anyhow!(e))?;
    let run = |g: Option<Grammar>| {
        measure_with(
            engine,
            args.prompt_tokens,
            args.gen_tokens,
            args.concurrency,
            g,
        )
    };
    // (held to the schema, report)
    let mut rows = vec![(false, plain), (true, run(Some(grammar.clone()))?)];
    rows.push((false, run(None)?));
    rows.push((true, run(Some(grammar))?));
    let label = |schema: bool| if schema { "schema" } else { "without" };
    if args.json {
        let reports: Vec<_> = rows
            .iter()
            .map(|(k, r)| serde_json::json!({"run": label(*k), "report": r}))
            .collect();
        println!("{}", serde_json::to_string(&reports)?);
        return Ok(());
    }
    println!(
        "model {} on {}; prompt {} / gen {} tokens, {} stream(s)",
        engine.info.name, engine.info.device, args.prompt_tokens, args.gen_tokens, args.concurrency
    );
    println!("run        decode tok/s   aggregate tok/s");
    for (schema, r) in &rows {
        let kind = label(*schema);
        println!(
            "{kind:<10} {:>12.1} {:>17.1}",
            r.decode_tok_s, r.aggregate_tok_s
        );
    }
    let mean = |schema: bool, f: fn(&BenchReport) -> f64| {
        let v: Vec<f64> = rows
            .iter()
            .filter(|(s, _)| *s == schema)
            .map(|(_, r)| f(r))
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!(
        "schema / without: decode {:.2}x, aggregate {:.2}x",
        mean(true, |r| r.decode_tok_s) / mean(false, |r| r.decode_tok_s),
        mean(true, |r| r.aggregate_tok_s) / mean(false, |r| r.aggregate_tok_s)
    );
    Ok(())
}

/// A conversation of `turns` turns with the configured system prompt; prints each turn's prompt
/// length and time to first token.
fn conversation(
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
