//! `moss bench`: prefill and decode speed, time to first token and aggregate throughput, measured
//! through the same engine handle that serves requests, next to the machine's read bandwidth.
//!
//! Rooms: `measure` (one run), `bandwidth` (the memory ceiling), `schema` (`--schema`),
//! `lookup` (`--lookup`), `conversation` (`--turns`).

mod bandwidth;
mod conversation;
mod lookup;
mod measure;
mod schema;

use clap::Args;
use serde::Serialize;

use super::{start_engine, ModelArgs};
use crate::config::Config;
pub use measure::{measure, measure_simple, synthetic_prompt, BenchReport, Workload};

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
    /// Tokens already in context before the prompt (as `llama-bench -d`): prefill and decode are
    /// measured after them.
    #[arg(long, default_value_t = 0)]
    pub depth: usize,
    /// Skip measuring the read bandwidth (it reads a 1 GiB buffer, which a peak-RSS measurement
    /// of the bench would count).
    #[arg(long)]
    pub no_bandwidth: bool,
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
    /// Instead: prompt-lookup drafting on answers that copy their prompt (code to fix, text to
    /// correct) and on plain chat questions, each with and without, and whether the answers match.
    #[arg(long)]
    pub lookup: bool,
}

/// The memory ceiling: one decoding step reads every weight once.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    /// Measured read bandwidth with the engine's thread count, GB/s.
    pub read_gb_s: f64,
    pub threads: usize,
    /// Weight bytes one decoding step reads, MB.
    pub step_mb: f64,
    /// Single-stream decode at that bandwidth, tokens per second (keys and values not counted).
    pub decode_limit_tok_s: f64,
    /// The measured decode's share of it.
    pub decode_share: f64,
}

pub fn run(config: &Config, args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.gen_tokens >= 2, "--gen-tokens must be at least 2");
    // The bench measures the engine: it may run every requested stream together (up to
    // engine.max_batch) whatever the service admits as running (limits.max_running).
    let mut config = config.clone();
    config.limits.max_running = config.limits.max_running.max(args.concurrency);
    let config = &config;
    // Measured first, while nothing else runs (the engine's compute threads wait spinning for a
    // while after each step).
    let plain = args.turns.is_none() && !args.schema && !args.lookup && !args.no_bandwidth;
    let threads = candle_core::utils::get_num_threads();
    let read = plain.then(|| bandwidth::read_bandwidth(threads));
    let engine = start_engine(config, &args.model)?;
    measure_simple(&engine, 8, 4, 1)?; // warm-up: first-touch allocations, caches
    if let Some(turns) = args.turns {
        return conversation::conversation(&engine, config, turns, args.gen_tokens);
    }
    let work = Workload {
        prompt: args.prompt_tokens,
        gen: args.gen_tokens,
        concurrency: args.concurrency,
        depth: args.depth,
        constraint: None,
        lookup: false,
    };
    if args.lookup {
        return lookup::compare_lookup(&engine, &config.engine.system_prompt, &work, args.json);
    }
    let report = measure(&engine, &work)?;
    if args.schema {
        return schema::compare_schema(&engine, &args, &work, report);
    }
    // The host's bandwidth says nothing about a GPU's.
    let read = read.filter(|_| engine.info.gpu.is_none());
    let ceiling = engine.info.step_bytes.zip(read).map(|(bytes, read)| {
        let limit = read / bytes as f64;
        Ceiling {
            read_gb_s: read / 1e9,
            threads,
            step_mb: bytes as f64 / 1e6,
            decode_limit_tok_s: limit,
            decode_share: report.decode_tok_s / limit,
        }
    });
    if args.json {
        let mut out = serde_json::to_value(&report)?;
        out["ceiling"] = serde_json::to_value(&ceiling)?;
        println!("{out}");
        return Ok(());
    }
    print(&report, ceiling.as_ref());
    Ok(())
}

fn print(report: &BenchReport, ceiling: Option<&Ceiling>) {
    println!("model            {} on {}", report.model, report.device);
    println!(
        "prompt / gen     {} / {} tokens, {} stream(s){}",
        report.prompt_tokens,
        report.gen_tokens,
        report.concurrency,
        match report.depth {
            0 => String::new(),
            d => format!(", after {d} tokens of context"),
        }
    );
    println!("prefill          {:.1} tok/s", report.prefill_tok_s);
    match ceiling {
        Some(c) => println!(
            "decode           {:.1} tok/s ({:.0} % of the bandwidth limit)",
            report.decode_tok_s,
            c.decode_share * 100.0
        ),
        None => println!("decode           {:.1} tok/s", report.decode_tok_s),
    }
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
    if let Some(c) = ceiling {
        println!(
            "bandwidth        {:.1} GB/s read ({} threads); a step reads {:.0} MB of weights: at most {:.1} tok/s",
            c.read_gb_s, c.threads, c.step_mb, c.decode_limit_tok_s
        );
    }
}
