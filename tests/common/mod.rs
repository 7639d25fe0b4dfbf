//! Shared test helpers: tiny models written by the real GGUF writer, engines on them, and the
//! location of the real models (present when scripts/fetch-model has run, as in CI).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use moss::engine::tiny::{write_tiny_model, TinySpec};
use moss::engine::{
    Arch, EngineHandle, EngineOptions, Event, FinishReason, GenerateRequest, SamplingParams, Usage,
};

/// Writes a tiny model of `arch` into `dir` and returns its path.
pub fn tiny_model(dir: &Path, arch: Arch) -> PathBuf {
    tiny_model_with(dir, arch, TinySpec::new(arch).context)
}

/// `tiny_model` with a context window of `context` tokens.
pub fn tiny_model_with(dir: &Path, arch: Arch, context: usize) -> PathBuf {
    let path = dir.join(format!("tiny-{}.gguf", arch.name()));
    let spec = TinySpec {
        context,
        ..TinySpec::new(arch)
    };
    write_tiny_model(&path, &spec).expect("write tiny model");
    path
}

/// The device engine tests run on: `MOSS_TEST_DEVICE` (`cuda:0` in scripts/gpu-check), else the
/// CPU.
pub fn test_device() -> String {
    std::env::var("MOSS_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

pub fn start(model: &Path, token_delay: Duration) -> EngineHandle {
    let mut opts = EngineOptions::new(model);
    opts.device = test_device();
    opts.token_delay = token_delay;
    EngineHandle::start(opts).expect("engine starts")
}

pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: vec![],
        ignore_eos: false,
        ..Default::default()
    }
}

/// Runs a request to the end and returns (text pieces, finish reason, usage).
pub fn collect(engine: &EngineHandle, req: GenerateRequest) -> (Vec<String>, FinishReason, Usage) {
    let mut rx = engine.generate(req).expect("submitted");
    let mut pieces = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Text(t) => pieces.push(t),
            Event::Done {
                finish_reason,
                usage,
                ..
            } => return (pieces, finish_reason, usage),
            Event::Error(e) => panic!("generation failed: {e}"),
            Event::Started | Event::Logprob(_) | Event::ToolCall(_) => {}
        }
    }
    panic!("stream ended without Done");
}

/// The real model at `file` in the model cache, if fetched. With MOSS_REQUIRE_MODELS=1 (CI) a
/// missing model fails the test instead of skipping it.
pub fn real_model(file: &str) -> Option<PathBuf> {
    let path = moss::models::cache_dir().join(file);
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("MOSS_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{} is missing; run scripts/fetch-model", path.display());
    }
    skipped(&format!(
        "{} not present (run scripts/fetch-model)",
        path.display()
    ));
    None
}

/// Says that the running test did not run its check, and why: on standard error and in
/// `target/tmp/skipped.log`, which `scripts/test` prints at the end (cargo has no "skipped"
/// result, and a test that returns early would otherwise read as passed).
pub fn skipped(why: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let line = format!("skipped {test}: {why}");
    eprintln!("{line}");
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped.log");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        // One write per line: tests run in parallel and append to the same file.
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

pub const QWEN_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
pub const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
pub mod proxy;
pub mod server;

/// The negative log-likelihood of each of `chunk`'s second half, given what comes before, fed
/// one token at a time from position 0 — as `llama-perplexity` scores a chunk.
pub fn chunk_nll(model: &mut moss::engine::model::Model, chunk: &[u32]) -> Vec<f64> {
    let n = chunk.len();
    let mut out = Vec::with_capacity(n / 2);
    for j in 0..n - 1 {
        let l: Vec<f32> = model
            .forward(&chunk[j..j + 1], j)
            .unwrap()
            .to_vec1()
            .unwrap();
        if j >= n / 2 {
            let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = l.iter().map(|v| (*v as f64 - max).exp()).sum::<f64>().ln() + max;
            out.push(lse - l[chunk[j + 1] as usize] as f64);
        }
    }
    out
}
