//! The engine: one OS thread owns the model; callers hold a cheap `EngineHandle`, send a
//! `GenerateRequest` and read a stream of `Event`s. Dropping the stream cancels the generation
//! within one token step. Requests run one at a time, in arrival order.

pub mod batch;
pub mod decoder;
pub mod detok;
pub mod device;
pub mod gguf;
pub mod grammar;
pub mod logprobs;
pub mod lookup;
pub use moss_kernels as kernels;
pub mod model;
mod prefixes;
pub mod prompt;
pub mod sampler;
mod sequence;
pub mod template;
pub mod tiny;
pub mod tokenizer;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use tokio::sync::mpsc;

pub use gguf::{Arch, LoadError};
pub use grammar::{Constraint, Grammar, Vocabulary};
pub use logprobs::{TokenLogprob, TokenText};
pub use prompt::{Prompt, PromptBuilder, PromptError};
pub use sampler::SamplingParams;
pub use template::{ChatMessage, Role, Tool, ToolCall};

/// How to load the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub model: PathBuf,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Upper bound on the context window (the model's own may be smaller).
    pub max_context: usize,
    /// How many requests may wait for the engine thread before `generate` refuses.
    pub queue_capacity: usize,
    /// Test knob: sleep this long after each generated token (slow generation on a tiny model).
    pub token_delay: Duration,
    /// Which implementation runs the model (moss's decoder by default; candle-transformers' to
    /// compare).
    pub implementation: model::Implementation,
    /// Most sequences advanced together in one step (moss's decoder: Qwen2, Llama, Gemma 3).
    pub max_batch: usize,
    /// KV-cache memory for running sequences (each reserves prompt + max_tokens positions; one
    /// runs whatever its size); finished sequences kept for prefix reuse use up to half of it and
    /// give it back when running ones need it.
    pub kv_cache_bytes: usize,
    /// Nice value added to the engine thread (and the compute threads it starts): under CPU
    /// contention the web server's threads run first, so shedding stays fast while answers
    /// are generated. 0 leaves the priority alone.
    pub nice: i32,
    /// Prompt-lookup drafting while the engine is quiet.
    pub lookup: lookup::LookupOptions,
}

impl EngineOptions {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            device: "auto".into(),
            max_context: 8192,
            queue_capacity: 64,
            token_delay: Duration::ZERO,
            implementation: Default::default(),
            max_batch: 8,
            kv_cache_bytes: 1 << 30,
            nice: 0,
            lookup: Default::default(),
        }
    }
}

/// What a caller asks for.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Keep going past end-of-turn tokens (benchmarks only).
    pub ignore_eos: bool,
    /// Report each token's log-probability and this many most likely alternatives
    /// (`Event::Logprob`); `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Generate only what this grammar allows: compiled by the caller
    /// (`Vocabulary::constraint`), off the engine's thread, so that a large schema never holds up
    /// the other answers' steps.
    pub constraint: Option<Constraint>,
    /// Never draft this request's tokens by prompt lookup (to compare with and without: the
    /// answer is the same either way).
    pub no_lookup: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-turn / EOS token or a stop string.
    Stop,
    /// `max_tokens` reached or the context window is full.
    Length,
    /// The caller went away.
    Cancelled,
    /// The model failed mid-answer.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

/// Token counts of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What the stream of one request carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request reached the model; prefill is starting.
    Started,
    /// The next piece of the answer (whole characters only).
    Text(String),
    /// The log-probability of the token just generated (before its text), when asked for.
    Logprob(TokenLogprob),
    /// A function call, as an upstream server reports it (the local model writes calls as
    /// text, read by the answer path).
    ToolCall(ToolCall),
    /// The answer is complete.
    Done {
        finish_reason: FinishReason,
        usage: Usage,
        timings: Timings,
    },
    /// Generation failed; nothing more follows.
    Error(String),
}

/// Where the time of one generation went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub queued: Duration,
    pub prefill: Duration,
    pub decode: Duration,
}

/// Why `generate` refused a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the engine queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
    #[error("the prompt has {prompt} tokens and {max_tokens} more were asked for, but the context holds {context}")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
}

/// Facts about the loaded model that callers may use without asking the engine thread.
pub struct ModelInfo {
    pub path: PathBuf,
    pub name: String,
    pub arch: Arch,
    pub context_length: usize,
    pub prompts: PromptBuilder,
    /// Token ids that end a turn (EOS, `<|im_end|>`, `<end_of_turn>`, …).
    pub end_of_turn: Vec<u32>,
    pub device: String,
    /// Requests the engine advances together (1 without batching).
    pub batch: usize,
    /// The tokens as bytes, for log-probabilities and grammars.
    pub vocabulary: Vocabulary,
    /// Weight bytes a decoding step reads (moss's decoder; unknown for the others).
    pub step_bytes: Option<usize>,
    /// The GPU the model is on (none on the CPU), for its memory in `/metrics`.
    pub gpu: Option<Device>,
}

/// Counters the engine thread keeps, readable from anywhere.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests submitted and not yet finished (waiting or running).
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// Requests the engine thread has finished with (done, failed or skipped).
    pub requests_finished: AtomicU64,
    pub requests_started: AtomicU64,
    pub tokens_generated: AtomicU64,
    pub requests_cancelled: AtomicU64,
    /// Prompt tokens whose keys and values came from the prefix cache instead of the model.
    pub prefix_tokens_reused: AtomicU64,
    /// Tokens drafted by prompt lookup, and those of them that the model's own choice confirmed.
    pub draft_tokens: AtomicU64,
    pub draft_accepted: AtomicU64,
    /// Most sequences ever advanced in one step.
    pub batch_peak: std::sync::atomic::AtomicUsize,
}

struct Job {
    request: GenerateRequest,
    events: mpsc::UnboundedSender<Event>,
    submitted: std::time::Instant,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    pub info: Arc<ModelInfo>,
    pub stats: Arc<EngineStats>,
}

/// The event stream of one request; dropping it cancels the generation.
pub type EventStream = mpsc::UnboundedReceiver<Event>;

impl EngineHandle {
    /// Loads the model on a new engine thread and waits until it is ready (or failed).
    pub fn start(options: EngineOptions) -> Result<Self, LoadError> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(options.queue_capacity.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("moss-engine".into())
            .spawn(move || worker::run(options, jobs_rx, ready_tx, thread_stats))
            .map_err(|e| LoadError::Device(format!("cannot start the engine thread: {e}")))?;
        let info = ready_rx
            .recv()
            .map_err(|_| LoadError::Device("the engine thread died while loading".into()))??;
        Ok(Self {
            jobs: jobs_tx,
            info,
            stats,
        })
    }

    /// Requests waiting or running.
    pub fn load(&self) -> usize {
        self.stats.in_flight.load(Ordering::Relaxed)
    }

    /// How many requests must finish before a new one starts (0: it joins the batch at once).
    pub fn ahead(&self) -> usize {
        (self.load() + 1).saturating_sub(self.info.batch)
    }

    /// Queues a request without waiting; the stream yields its events.
    pub fn generate(&self, request: GenerateRequest) -> Result<EventStream, SubmitError> {
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let context = self.info.context_length;
        if request.prompt.len() >= context {
            return Err(SubmitError::TooLong {
                prompt: request.prompt.len(),
                max_tokens: request.max_tokens,
                context,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job {
            request,
            events: tx,
            submitted: std::time::Instant::now(),
        };
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        self.jobs.try_send(job).map_err(|e| {
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
            }
        })?;
        Ok(rx)
    }

    /// Builds a prompt for a conversation that leaves room for `max_tokens` of answer.
    pub fn prompt(
        &self,
        system: Option<&str>,
        history: &[ChatMessage],
        max_tokens: usize,
    ) -> Result<Prompt, PromptError> {
        self.prompt_with_tools(system, history, &[], max_tokens)
    }

    /// `prompt` with the functions the model may call.
    pub fn prompt_with_tools(
        &self,
        system: Option<&str>,
        history: &[ChatMessage],
        tools: &[Tool],
        max_tokens: usize,
    ) -> Result<Prompt, PromptError> {
        let limit = self
            .info
            .context_length
            .saturating_sub(max_tokens.min(self.info.context_length / 2));
        self.info.prompts.build_with(system, history, tools, limit)
    }

    /// The memory of the GPU the model is on.
    pub fn gpu_memory(&self) -> Option<device::Memory> {
        device::memory(self.info.gpu.as_ref()?)
    }

    pub fn tokens_generated(&self) -> u64 {
        self.stats.tokens_generated.load(Ordering::Relaxed)
    }
}

/// Parses `--device`: `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn select_device(spec: &str) -> Result<Device, LoadError> {
    let spec = spec.trim();
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0).map_err(|e| LoadError::Device(e.to_string()))
            } else {
                Ok(Device::Cpu)
            }
        }
        _ => {
            let ordinal = match spec.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        LoadError::Device(format!("bad device `{spec}` (use auto, cpu or cuda:N)"))
                    })?,
                None => {
                    return Err(LoadError::Device(format!(
                        "bad device `{spec}` (use auto, cpu or cuda:N)"
                    )))
                }
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(LoadError::Device(format!(
                    "`{spec}` asked for, but this binary was built without the `cuda` feature or no GPU is visible"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| LoadError::Device(e.to_string()))
        }
    }
}
