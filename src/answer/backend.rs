//! Where answers come from: the local engine (a GGUF model in this process) or upstream
//! OpenAI-compatible servers. The answer path sees one interface: start an answer, get a stream
//! of engine `Event`s; dropping the stream cancels it either way.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::params::{Field, Format};
use super::tools::ToolChoice;
use super::AnswerError;
use crate::engine::{
    ChatMessage, Constraint, EngineHandle, EngineStats, EventStream, GenerateRequest, Grammar,
    SamplingParams, SubmitError, Tool,
};
use crate::upstream::{TargetHealth, Upstream, UpstreamError, UpstreamRequest};

#[derive(Clone)]
pub enum Backend {
    Local(EngineHandle),
    Upstream(Upstream),
}

impl From<EngineHandle> for Backend {
    fn from(e: EngineHandle) -> Self {
        Backend::Local(e)
    }
}

/// One answer to generate.
pub struct AnswerRequest {
    pub system: Option<String>,
    pub history: Vec<ChatMessage>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Alternatives to report with each token's log-probability (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    /// What a local model must generate (a response format or a forced call).
    pub grammar: Option<Grammar>,
    /// The functions the model is shown.
    pub tools: Vec<Tool>,
    /// For an upstream, which passes them on as they were asked for.
    pub format: Format,
    pub tool_choice: ToolChoice,
}

/// What `/readyz` reports about inference.
pub struct Readiness {
    pub ready: bool,
    pub detail: serde_json::Value,
}

impl Backend {
    /// The model's name, as shown in `/readyz` and `/v1/models`.
    pub fn model_id(&self) -> String {
        match self {
            Backend::Local(e) => e
                .info
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| e.info.name.clone()),
            Backend::Upstream(u) => u.model().to_string(),
        }
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        match self {
            Backend::Local(e) => &e.stats,
            Backend::Upstream(u) => u.stats(),
        }
    }

    /// The memory of the GPU a local model is on.
    pub fn gpu_memory(&self) -> Option<crate::engine::device::Memory> {
        match self {
            Backend::Local(e) => e.gpu_memory(),
            Backend::Upstream(_) => None,
        }
    }

    /// Requests waiting or running (for a local engine: how many are ahead of a new one).
    pub fn load(&self) -> usize {
        self.stats().in_flight.load(Ordering::Relaxed)
    }

    /// How many answers must finish before a new one starts: a local engine's queue beyond its
    /// batch; none for an upstream (its own queueing is its business).
    pub fn ahead(&self) -> usize {
        match self {
            Backend::Local(e) => e.ahead(),
            Backend::Upstream(_) => 0,
        }
    }

    /// Starts generating; for an upstream this waits for its response headers.
    pub async fn start(&self, req: AnswerRequest) -> Result<EventStream, AnswerError> {
        match self {
            Backend::Local(engine) => {
                let prompt = engine
                    .prompt_with_tools(
                        req.system.as_deref(),
                        &req.history,
                        &req.tools,
                        req.max_tokens,
                    )
                    .map_err(|e| match e {
                        crate::engine::PromptError::TooLong { .. } => {
                            AnswerError::PromptTooLong { max_chars: None }
                        }
                        crate::engine::PromptError::NoTools => AnswerError::Invalid {
                            field: Field::Tools,
                            message: e.to_string(),
                            message_zh: "该模型的对话模板不支持函数调用".into(),
                        },
                        other => AnswerError::Internal(other.to_string()),
                    })?;
                let constraint = match &req.grammar {
                    Some(grammar) => {
                        let forced = matches!(
                            req.tool_choice,
                            ToolChoice::Required | ToolChoice::Function(_)
                        );
                        Some(compile_grammar(engine, grammar, forced).await?)
                    }
                    None => None,
                };
                let request = GenerateRequest {
                    prompt: prompt.ids,
                    sampling: req.sampling,
                    max_tokens: req.max_tokens,
                    stop: req.stop,
                    ignore_eos: false,
                    logprobs: req.logprobs,
                    constraint,
                    no_lookup: false,
                };
                engine.generate(request).map_err(|e| match e {
                    SubmitError::TooLong { .. } => AnswerError::PromptTooLong { max_chars: None },
                    SubmitError::QueueFull | SubmitError::Stopped => AnswerError::Overloaded,
                    SubmitError::EmptyPrompt => AnswerError::Internal("empty prompt".into()),
                })
            }
            Backend::Upstream(up) => {
                let messages = up
                    .fit(req.system.as_deref(), &req.history)
                    .map_err(upstream_error)?;
                let request = UpstreamRequest {
                    messages,
                    max_tokens: req.max_tokens,
                    temperature: req.sampling.temperature,
                    top_p: req.sampling.top_p,
                    seed: req.sampling.seed,
                    stop: req.stop,
                    logprobs: req.logprobs,
                    response_format: match req.format {
                        Format::Text => None,
                        Format::JsonObject => Some(serde_json::json!({"type": "json_object"})),
                        Format::JsonSchema(schema) => Some(serde_json::json!({
                            "type": "json_schema",
                            "json_schema": {"name": "answer", "schema": schema, "strict": true},
                        })),
                    },
                    tool_choice: match (&req.tool_choice, req.tools.is_empty()) {
                        (_, true) => None,
                        (ToolChoice::None, _) => Some(serde_json::json!("none")),
                        (ToolChoice::Auto, _) => Some(serde_json::json!("auto")),
                        (ToolChoice::Required, _) => Some(serde_json::json!("required")),
                        (ToolChoice::Function(name), _) => Some(serde_json::json!(
                            {"type": "function", "function": {"name": name}}
                        )),
                    },
                    tools: req.tools,
                };
                up.generate(request).await.map_err(upstream_error)
            }
        }
    }

    /// Local: the model is loaded before the server listens. Upstream: at least one answers.
    /// What this process's backend is doing now, read without asking anyone (the admin's load
    /// view): answers waiting or running, tokens made since start, and each upstream URL.
    pub fn load_detail(&self) -> serde_json::Value {
        let generated = self
            .stats()
            .tokens_generated
            .load(std::sync::atomic::Ordering::Relaxed);
        let upstream = match self {
            Backend::Local(_) => None,
            Backend::Upstream(u) => Some(u.targets()),
        };
        serde_json::json!({"in_flight": self.load(), "tokens_generated": generated,
                           "upstream": upstream})
    }

    pub async fn readiness(&self) -> Readiness {
        match self {
            Backend::Local(e) => Readiness {
                ready: true,
                detail: serde_json::json!({"backend": "local", "model": e.info.name}),
            },
            Backend::Upstream(u) => {
                let health: Vec<TargetHealth> = u.health().await;
                Readiness {
                    ready: health.iter().any(|h| h.up),
                    detail: serde_json::json!({
                        "backend": "openai",
                        "model": u.model(),
                        "upstream": health,
                    }),
                }
            }
        }
    }
}

/// Compiles `grammar` for the model before the answer is queued, once, off the async threads and
/// off the engine's (a large schema takes a while), so that a grammar llguidance rejects is the
/// caller's error and the engine only clones what was compiled.
async fn compile_grammar(
    engine: &EngineHandle,
    grammar: &Grammar,
    forced_call: bool,
) -> Result<Constraint, AnswerError> {
    let info = engine.info.clone();
    let g = grammar.clone();
    let compiled = tokio::task::spawn_blocking(move || info.vocabulary.constraint(&g))
        .await
        .map_err(|e| AnswerError::Internal(e.to_string()))?;
    compiled.map_err(|e| {
        let field = match forced_call {
            true => Field::Tools,
            false => Field::ResponseFormat,
        };
        AnswerError::Invalid {
            field,
            message: format!("the schema cannot be used: {e}"),
            message_zh: "该 JSON schema 无法使用".into(),
        }
    })
}

fn upstream_error(e: UpstreamError) -> AnswerError {
    match e {
        UpstreamError::TooLong => AnswerError::PromptTooLong { max_chars: None },
        UpstreamError::Overloaded => AnswerError::Overloaded,
        UpstreamError::Refused(m) => AnswerError::Unavailable(m),
    }
}
