//! One measured run: streams submitted together through the engine handle, their timings.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::engine::{
    Constraint, EngineHandle, Event, EventStream, GenerateRequest, SamplingParams, Timings, Usage,
};

/// What one run submits.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    /// Prompt tokens each stream prefills.
    pub prompt: usize,
    /// Tokens each stream generates.
    pub gen: usize,
    /// Streams submitted at once.
    pub concurrency: usize,
    /// Tokens already in each stream's context before its prompt (like `llama-bench -d`): they
    /// come from the prefix cache, computed once before the run.
    pub depth: usize,
    /// Every stream held to this grammar (compiled once, a clone per stream).
    pub constraint: Option<Constraint>,
    /// Let the engine draft by prompt lookup (off: the figures are the model's own speed; the
    /// bench's prompt repeats itself, which drafting would turn into a flattering number).
    pub lookup: bool,
}

/// The figures `moss bench` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub concurrency: usize,
    /// Tokens in context before the prompt.
    pub depth: usize,
    /// Prompt tokens per second of prefill (mean over streams; the depth is not counted).
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
    prompt_from(engine, "", n)
}

/// Runs numbered so far: each run's prompts start with their own number, so no run finds an
/// earlier run's tokens in the prefix cache.
static RUNS: AtomicUsize = AtomicUsize::new(0);

fn prompt_from(engine: &EngineHandle, lead: &str, n: usize) -> anyhow::Result<Vec<u32>> {
    let text = "The quick brown fox jumps over the lazy dog while the committee discusses the budget for next year. ";
    let unit = engine.info.prompts.encode_text(text)?;
    anyhow::ensure!(!unit.is_empty(), "the tokenizer produced no tokens");
    let mut ids = engine.info.prompts.encode_text(lead)?;
    ids.truncate(n);
    let rest = n.max(1) - ids.len().min(n.max(1));
    ids.extend(unit.iter().copied().cycle().take(rest));
    Ok(ids)
}

/// Runs `concurrency` greedy generations of `gen` tokens on a prompt of `prompt` tokens.
pub fn measure_simple(
    engine: &EngineHandle,
    prompt: usize,
    gen: usize,
    concurrency: usize,
) -> anyhow::Result<BenchReport> {
    measure(
        engine,
        &Workload {
            prompt,
            gen,
            concurrency,
            ..Default::default()
        },
    )
}

/// Runs `work`: greedy generations, every stream on the same prompt.
pub fn measure(engine: &EngineHandle, work: &Workload) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        work.depth == 0 || work.depth >= 8,
        "--depth must be 0 or at least 8 (shorter contexts are not kept by the prefix cache)"
    );
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let context = work.depth + work.prompt + work.gen;
    anyhow::ensure!(
        context <= engine.info.context_length,
        "depth + prompt + generated tokens ({context}) exceed the context ({} tokens)",
        engine.info.context_length
    );
    let ids = prompt_from(engine, &format!("Run {run}. "), work.depth + work.prompt)?;
    let request = GenerateRequest {
        prompt: ids,
        sampling: SamplingParams::greedy(),
        max_tokens: work.gen,
        stop: vec![],
        ignore_eos: true,
        constraint: work.constraint.clone(),
        no_lookup: !work.lookup,
        ..Default::default()
    };
    if work.depth > 0 {
        prime(engine, &request.prompt[..work.depth])?;
    }
    let reused_before = engine.stats.prefix_tokens_reused.load(Ordering::Relaxed);
    let requests = vec![request; work.concurrency.max(1)];
    let (results, wall) = run_streams(engine, requests)?;
    let n = results.len() as f64;
    // Prompt tokens each stream took from the prefix cache: the depth, when it was kept.
    let reused =
        (engine.stats.prefix_tokens_reused.load(Ordering::Relaxed) - reused_before) as f64 / n;
    anyhow::ensure!(
        reused + 0.5 >= work.depth as f64,
        "the prefix cache did not keep the {} tokens of depth (engine.kv_cache_mb too small?)",
        work.depth
    );
    Ok(summarise(engine, work, &results, wall, reused))
}

/// Submits every request at once and follows their streams; returns them and the wall time.
pub(super) fn run_streams(
    engine: &EngineHandle,
    requests: Vec<GenerateRequest>,
) -> anyhow::Result<(Vec<Stream>, f64)> {
    let start = Instant::now();
    let streams = requests
        .into_iter()
        .map(|r| engine.generate(r))
        .collect::<Result<Vec<_>, _>>()?;
    let handles: Vec<_> = streams
        .into_iter()
        .map(|rx| std::thread::spawn(move || follow(rx, start)))
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("bench thread panicked"))??,
        );
    }
    Ok((results, start.elapsed().as_secs_f64()))
}

/// The figures of a run's streams; `reused`: prompt tokens per stream that came from the prefix
/// cache (not prefilled).
pub(super) fn summarise(
    engine: &EngineHandle,
    work: &Workload,
    results: &[Stream],
    wall: f64,
    reused: f64,
) -> BenchReport {
    let n = results.len() as f64;
    // The window in which every stream is decoding: after the last first piece, before the
    // first stream's last piece.
    let from = results.iter().map(|r| r.first).fold(0.0, f64::max);
    let to = results
        .iter()
        .map(|r| r.pieces.last().copied().unwrap_or(0.0))
        .fold(f64::MAX, f64::min);
    let inside: usize = results
        .iter()
        .map(|r| r.pieces.iter().filter(|t| **t > from && **t <= to).count())
        .sum();
    let aggregate_decode_tok_s = if to > from {
        inside as f64 / (to - from)
    } else {
        f64::NAN
    };
    let mean = |f: &dyn Fn(&Stream) -> f64| results.iter().map(f).sum::<f64>() / n;
    let completion: usize = results.iter().map(|r| r.usage.completion_tokens).sum();
    BenchReport {
        model: engine.info.name.clone(),
        device: engine.info.device.clone(),
        prompt_tokens: work.prompt,
        gen_tokens: work.gen,
        concurrency: results.len(),
        depth: work.depth,
        prefill_tok_s: mean(&|r| {
            (r.usage.prompt_tokens as f64 - reused) / r.timings.prefill.as_secs_f64()
        }),
        decode_tok_s: mean(&|r| {
            (r.usage.completion_tokens.saturating_sub(1)) as f64 / r.timings.decode.as_secs_f64()
        }),
        ttft_ms: mean(&|r| r.first * 1000.0),
        aggregate_tok_s: completion as f64 / wall,
        aggregate_decode_tok_s,
    }
}

/// Computes `context` once and leaves it in the prefix cache.
fn prime(engine: &EngineHandle, context: &[u32]) -> anyhow::Result<()> {
    let rx = engine.generate(GenerateRequest {
        prompt: context.to_vec(),
        sampling: SamplingParams::greedy(),
        max_tokens: 1,
        ignore_eos: true,
        no_lookup: true,
        ..Default::default()
    })?;
    follow(rx, Instant::now()).map(|_| ())
}

/// One stream's record: when its first and each text piece came (seconds from the start), its
/// usage and the engine's timings.
pub(super) struct Stream {
    pub(super) first: f64,
    pub(super) usage: Usage,
    pub(super) timings: Timings,
    pub(super) pieces: Vec<f64>,
    /// The answer's text.
    pub(super) text: String,
}

fn follow(mut rx: EventStream, start: Instant) -> anyhow::Result<Stream> {
    let mut first: Option<f64> = None;
    let mut pieces = Vec::new();
    let mut text = String::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Text(t) => {
                let now = start.elapsed().as_secs_f64();
                first.get_or_insert(now);
                pieces.push(now);
                text.push_str(&t);
            }
            Event::Done { usage, timings, .. } => {
                return Ok(Stream {
                    first: first.unwrap_or(f64::NAN),
                    usage,
                    timings,
                    pieces,
                    text,
                })
            }
            Event::Error(e) => return Err(anyhow::anyhow!(e)),
            _ => {}
        }
    }
    Err(anyhow::anyhow!("engine stopped"))
}
