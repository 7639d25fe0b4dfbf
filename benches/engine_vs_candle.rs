//! Decode and prefill speed of moss's engine next to candle-transformers' own `quantized_qwen2`
//! forward loop, measured in the same run on the same model, so our overhead is visible.
//!
//!     cargo bench --bench engine_vs_candle -- [MODEL.gguf] [--prompt-tokens N] [--gen-tokens N]
//!
//! Without a model argument the default model from the cache is used.

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::quantized_qwen2::ModelWeights;
use moss::engine::{EngineHandle, EngineOptions};

struct Figures {
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

/// The reference: candle's example loop (prefill once, then one token a step, argmax).
fn raw_candle(path: &std::path::Path, prompt: &[u32], gen: usize) -> anyhow::Result<Figures> {
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let mut sampler = LogitsProcessor::new(0, None, None);
    let mut run = |model: &mut ModelWeights, n: usize| -> anyhow::Result<Figures> {
        model.clear_kv_cache();
        let t = Instant::now();
        let input = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&input, 0)?.squeeze(0)?;
        let mut next = sampler.sample(&logits)?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..n - 1 {
            let input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
            let logits = model.forward(&input, prompt.len() + i)?.squeeze(0)?;
            next = sampler.sample(&logits)?;
        }
        let decode = t.elapsed().as_secs_f64();
        Ok(Figures {
            prefill_tok_s: prompt.len() as f64 / prefill,
            decode_tok_s: (n - 1) as f64 / decode,
        })
    };
    run(&mut model, 4)?; // warm-up
    run(&mut model, gen)
}

fn arg_value(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let prompt_tokens = arg_value(&args, "--prompt-tokens", 128);
    let gen = arg_value(&args, "--gen-tokens", 64);
    let model = match args.iter().find(|a| a.ends_with(".gguf")) {
        Some(p) => p.into(),
        None => moss::models::default_model_path(),
    };
    anyhow::ensure!(
        model.is_file(),
        "{} not found: run scripts/fetch-model",
        model.display()
    );

    let mut opts = EngineOptions::new(&model);
    opts.device = "cpu".into();
    let engine = EngineHandle::start(opts)?;
    let prompt = moss::cli::bench::synthetic_prompt(&engine, prompt_tokens)?;

    // Alternate the two so that neither gets a cooler or warmer machine.
    let mut rows = Vec::new();
    moss::cli::bench::measure_simple(&engine, 8, 4, 1)?;
    for _ in 0..2 {
        let reference = raw_candle(&model, &prompt, gen)?;
        let ours = moss::cli::bench::measure_simple(&engine, prompt_tokens, gen, 1)?;
        rows.push((reference, ours));
    }
    let best_ref_decode = rows.iter().map(|r| r.0.decode_tok_s).fold(0.0, f64::max);
    let best_ref_prefill = rows.iter().map(|r| r.0.prefill_tok_s).fold(0.0, f64::max);
    let best_decode = rows.iter().map(|r| r.1.decode_tok_s).fold(0.0, f64::max);
    let best_prefill = rows.iter().map(|r| r.1.prefill_tok_s).fold(0.0, f64::max);
    println!(
        "model: {} ({prompt_tokens} prompt tokens, {gen} generated, best of 2)",
        model.display()
    );
    println!("{:<28}{:>14}{:>14}", "", "prefill tok/s", "decode tok/s");
    println!(
        "{:<28}{:>14.1}{:>14.1}",
        "candle quantized_qwen2", best_ref_prefill, best_ref_decode
    );
    println!(
        "{:<28}{:>14.1}{:>14.1}",
        "moss engine", best_prefill, best_decode
    );
    println!(
        "{:<28}{:>13.2}x{:>13.2}x",
        "ratio moss / candle",
        best_prefill / best_ref_prefill,
        best_decode / best_ref_decode
    );
    Ok(())
}
