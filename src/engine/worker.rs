//! The engine thread: loads the model once, then runs queued requests one after another,
//! streaming text back and dropping a request as soon as its receiver is gone.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::gguf::{LoadError, ModelFile};
use super::model::Model;
use super::prompt::PromptBuilder;
use super::sequence::{Sequence, Step};
use super::template::ChatTemplate;
use super::{
    select_device, EngineOptions, EngineStats, Event, FinishReason, Job, ModelInfo, Timings,
};

/// Longest slice of a prompt sent through the model at once (bounds prefill memory).
const PREFILL_CHUNK: usize = 512;

/// Entry point of the engine thread.
pub(super) fn run(
    options: EngineOptions,
    mut jobs: mpsc::Receiver<Job>,
    ready: std::sync::mpsc::Sender<Result<Arc<ModelInfo>, LoadError>>,
    stats: Arc<EngineStats>,
) {
    lower_priority(options.nice);
    let (mut model, info) = match load(&options) {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // The batched engine's key/value store, made before the service is told the model is ready.
    let pool = match model
        .batched()
        .map(|d| super::batch::kv_pool(d, &info, &options))
    {
        Some(Err(e)) => {
            let _ = ready.send(Err(LoadError::Device(format!(
                "cannot make the key/value cache: {e}"
            ))));
            return;
        }
        pool => pool.and_then(Result::ok),
    };
    let info = Arc::new(info);
    if ready.send(Ok(info.clone())).is_err() {
        return;
    }
    if let (Some(batched), Some(pool)) = (model.batched(), pool.as_ref()) {
        super::batch::run(batched, pool, &info, &mut jobs, &options, &stats);
        return;
    }
    while let Some(job) = jobs.blocking_recv() {
        run_job(&mut model, &info, job, &options, &stats);
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        stats.requests_finished.fetch_add(1, Ordering::Relaxed);
    }
}

fn run_job(
    model: &mut Model,
    info: &ModelInfo,
    job: Job,
    options: &EngineOptions,
    stats: &EngineStats,
) {
    if job.events.is_closed() {
        stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stats.requests_started.fetch_add(1, Ordering::Relaxed);
    let _ = job.events.send(Event::Started);
    let queued = job.submitted.elapsed();
    let outcome = generate(model, info, &job, options, stats, queued);
    match outcome {
        Ok(done) => {
            if matches!(
                done,
                Event::Done {
                    finish_reason: FinishReason::Cancelled,
                    ..
                }
            ) {
                stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
            }
            let _ = job.events.send(done);
        }
        Err(e) => {
            tracing::error!("generation failed: {e}");
            let _ = job.events.send(Event::Error(e.to_string()));
        }
    }
}

/// Lowers this thread's priority; threads it starts (candle's compute pool, created on first
/// use here) inherit it.
fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority with PRIO_PROCESS and who = 0 changes only the calling thread
        // on Linux; it reads no memory of ours.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if r != 0 {
            tracing::warn!("could not lower the engine thread's priority");
        }
    }
}

/// Loads the model file, tokenizer and template.
pub(super) fn load(options: &EngineOptions) -> Result<(Model, ModelInfo), LoadError> {
    let device = select_device(&options.device)?;
    let file = ModelFile::open(&options.model)?;
    // On a GPU: its memory logged, and a model that cannot fit refused before loading.
    let weights = std::fs::metadata(&file.path).map_or(0, |m| m.len() as usize);
    super::device::check_fits(&device, weights, options.kv_cache_bytes)?;
    let tokenizer = super::tokenizer::load(&file.path, &file.content).map_err(|source| {
        LoadError::Tokenizer {
            path: file.path.clone(),
            source,
        }
    })?;
    let token_text = |key: &str| file.md_u32(key).and_then(|id| tokenizer.id_to_token(id));
    let bos_text = token_text("tokenizer.ggml.bos_token_id").unwrap_or_default();
    let eos_text = token_text("tokenizer.ggml.eos_token_id").unwrap_or_default();
    let fallback = super::template::fallback_for(|t| tokenizer.token_to_id(t).is_some());
    let template = ChatTemplate::new(
        file.md_str("tokenizer.chat_template"),
        fallback,
        &bos_text,
        &eos_text,
    );
    let add_bos = file
        .md_bool("tokenizer.ggml.add_bos_token")
        .unwrap_or(false);
    let bos = add_bos
        .then(|| file.md_u32("tokenizer.ggml.bos_token_id"))
        .flatten();
    let mut end_of_turn: Vec<u32> = file
        .md_u32("tokenizer.ggml.eos_token_id")
        .into_iter()
        .collect();
    for text in [
        "<|im_end|>",
        "<|endoftext|>",
        "<end_of_turn>",
        "<|eot_id|>",
        "<|end|>",
        "</s>",
    ] {
        if let Some(id) = tokenizer.token_to_id(text) {
            if !end_of_turn.contains(&id) {
                end_of_turn.push(id);
            }
        }
    }
    let model_ctx = file
        .arch_u32("context_length")
        .map(|c| c as usize)
        .unwrap_or(options.max_context);
    let name = file
        .md_str("general.name")
        .map(str::to_string)
        .or_else(|| {
            file.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "model".into());
    let (path, arch) = (file.path.clone(), file.arch);
    // How many logits a step gives: the embedding's rows (the output projection has as many).
    let vocab_size = file
        .content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .unwrap_or_else(|| tokenizer.get_vocab_size(true));
    let model = Model::load(file, &device, options.implementation)?;
    let batch = if model.batched().is_some() {
        options.max_batch.max(1)
    } else {
        1
    };
    let context_length = model_ctx
        .min(options.max_context)
        .min(model.max_positions)
        .max(2);
    let end = end_of_turn.first().copied().unwrap_or(0);
    let vocabulary = crate::engine::Vocabulary::new(tokenizer.clone(), vocab_size, end);
    let info = ModelInfo {
        step_bytes: model.batched().map(|d| d.step_bytes()),
        gpu: (!device.is_cpu()).then(|| device.clone()),
        vocabulary,
        path,
        name,
        arch,
        context_length,
        prompts: PromptBuilder::new(template, tokenizer, bos),
        end_of_turn,
        device: format!("{device:?}"),
        batch,
    };
    tracing::info!(model = %info.path.display(), arch = arch.name(), context = context_length, device = %info.device, "model loaded");
    Ok((model, info))
}

fn generate(
    model: &mut Model,
    info: &ModelInfo,
    job: &Job,
    options: &EngineOptions,
    stats: &EngineStats,
    queued: std::time::Duration,
) -> candle_core::Result<Event> {
    let req = &job.request;
    let events = &job.events;
    model.reset();
    let started = Instant::now();
    let mut logits = None;
    for (i, chunk) in req.prompt.chunks(PREFILL_CHUNK).enumerate() {
        if events.is_closed() {
            break;
        }
        logits = Some(model.forward(chunk, i * PREFILL_CHUNK)?);
    }
    let prefill = started.elapsed();
    let decode_start = Instant::now();
    let mut seq = Sequence::new(req, info);
    let finish = loop {
        let Some(current) = logits.take() else {
            break FinishReason::Cancelled;
        };
        match seq.advance(&current, info, events, stats)? {
            Step::Finished(reason) => break reason,
            Step::Continue(next) => {
                if !options.token_delay.is_zero() {
                    std::thread::sleep(options.token_delay);
                }
                logits = Some(model.forward(&[next], seq.tokens.len() - 1)?);
            }
        }
    };
    seq.flush(events);
    Ok(Event::Done {
        finish_reason: finish,
        usage: seq.usage(),
        timings: Timings {
            queued,
            prefill,
            decode: decode_start.elapsed(),
        },
    })
}
