//! The answer as OpenAI shapes it: one `chat.completion` object, or `chat.completion.chunk`
//! server-sent events — text, log-probabilities with the text they belong to, function calls.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc::Receiver;

use super::{now_secs, ApiError};
use crate::answer::{Failure, Finish, StreamEvent};
use crate::engine::{TokenLogprob, TokenText, ToolCall, Usage};
use crate::http::{AppError, AppState};

/// OpenAI's name for how an answer ended.
fn finish(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        Finish::Refused => "content_filter",
        Finish::ToolCalls => "tool_calls",
        Finish::Stop | Finish::Cancelled | Finish::Error => "stop",
    }
}

/// A log-probability as JSON can carry it (OpenAI writes −9999 for an impossible token).
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

fn token_json(t: &TokenText) -> Value {
    json!({"token": t.token, "logprob": finite(t.logprob), "bytes": t.bytes})
}

fn logprob_json(lp: &TokenLogprob) -> Value {
    let mut v = token_json(&lp.chosen);
    v["top_logprobs"] = lp.top_logprobs.iter().map(token_json).collect();
    v
}

/// The `logprobs` of a choice: `null` when none were asked for.
fn logprobs_json(asked: bool, entries: &[TokenLogprob]) -> Value {
    match asked {
        false => Value::Null,
        true => {
            json!({"content": entries.iter().map(logprob_json).collect::<Vec<_>>(), "refusal": null})
        }
    }
}

fn call_json(call: &ToolCall) -> Value {
    json!({"id": call.id, "type": "function",
           "function": {"name": call.name, "arguments": call.arguments}})
}

fn usage_json(u: Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens})
}

fn failed(state: &AppState, failure: Failure, message: String) -> ApiError {
    ApiError(match failure {
        Failure::Overloaded => state.overloaded(),
        Failure::Unavailable => AppError::Unavailable(message),
        Failure::GenerationFailed => AppError::Internal(message),
    })
}

/// The whole answer as one `chat.completion`.
pub(super) async fn complete(
    state: &AppState,
    mut events: Receiver<StreamEvent>,
    id: String,
    model: String,
    logprobs: bool,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut entries = Vec::new();
    let mut calls = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            StreamEvent::Token { text: t } => text.push_str(&t),
            StreamEvent::Logprob(lp) => entries.push(lp),
            StreamEvent::ToolCall(call) => calls.push(call_json(&call)),
            StreamEvent::Queued { .. } | StreamEvent::Html { .. } => {}
            StreamEvent::Done { finish, usage, .. } => {
                let mut message = json!({"role": "assistant", "content": text, "refusal": null});
                if !calls.is_empty() {
                    if text.is_empty() {
                        message["content"] = Value::Null;
                    }
                    message["tool_calls"] = Value::Array(calls);
                }
                let body = json!({
                    "id": id, "object": "chat.completion", "created": now_secs(), "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": self::finish(finish),
                                 "logprobs": logprobs_json(logprobs, &entries)}],
                    "usage": usage_json(usage),
                });
                return Ok(Json(body).into_response());
            }
            StreamEvent::Failed { failure, message } => {
                return Err(failed(state, failure, message))
            }
        }
    }
    Err(ApiError(AppError::Internal(
        "the answer ended early".into(),
    )))
}

/// How the chunks of one streamed answer are written.
struct Chunks {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    logprobs: bool,
    /// Log-probabilities of tokens whose text has not been sent yet.
    pending: Vec<TokenLogprob>,
    calls: usize,
}

impl Chunks {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> String {
        let mut c = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "choices": choices});
        if self.include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        c.to_string()
    }

    /// A chunk with `delta`; the log-probabilities waiting go with it.
    fn delta(&mut self, delta: Value, finish: Option<&str>) -> String {
        let lp = logprobs_json(self.logprobs, &std::mem::take(&mut self.pending));
        let lp = if lp.is_null() || lp["content"].as_array().is_some_and(Vec::is_empty) {
            Value::Null
        } else {
            lp
        };
        let choice = json!([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lp}]);
        self.chunk(choice, None)
    }

    /// What one event adds to the stream (`None` in the queue ends it).
    fn on(&mut self, ev: StreamEvent, out: &mut VecDeque<Option<String>>) {
        match ev {
            StreamEvent::Token { text } => {
                out.push_back(Some(self.delta(json!({"content": text}), None)))
            }
            StreamEvent::Logprob(lp) => self.pending.push(lp),
            StreamEvent::ToolCall(call) => {
                let mut c = call_json(&call);
                c["index"] = json!(self.calls);
                self.calls += 1;
                out.push_back(Some(self.delta(json!({"tool_calls": [c]}), None)));
            }
            StreamEvent::Queued { .. } | StreamEvent::Html { .. } => {}
            StreamEvent::Done { finish, usage, .. } => {
                out.push_back(Some(self.delta(json!({}), Some(self::finish(finish)))));
                if self.include_usage {
                    out.push_back(Some(self.chunk(json!([]), Some(usage_json(usage)))));
                }
                out.push_back(Some("[DONE]".into()));
                out.push_back(None);
            }
            StreamEvent::Failed { failure, message } => {
                let data = json!({"error": {"message": message, "type": "server_error", "code": failure.code()}});
                out.push_back(Some(data.to_string()));
                out.push_back(None);
            }
        }
    }
}

/// The answer as `chat.completion.chunk` events.
pub(super) fn stream(
    rx: Receiver<StreamEvent>,
    id: String,
    model: String,
    include_usage: bool,
    logprobs: bool,
) -> Response {
    let mut chunks = Chunks {
        id,
        model,
        created: now_secs(),
        include_usage,
        logprobs,
        pending: Vec::new(),
        calls: 0,
    };
    // What is ready to send goes to `out`; `None` there ends the stream.
    let mut out: VecDeque<Option<String>> = VecDeque::new();
    out.push_back(Some(
        chunks.delta(json!({"role": "assistant", "content": ""}), None),
    ));
    let events = futures_util::stream::unfold(
        (rx, out, chunks),
        |(mut rx, mut out, mut chunks)| async move {
            let event = |data: String| Ok::<_, Infallible>(Event::default().data(data));
            loop {
                if let Some(next) = out.pop_front() {
                    return next.map(|data| (event(data), (rx, out, chunks)));
                }
                match rx.recv().await {
                    Some(ev) => chunks.on(ev, &mut out),
                    None => return None,
                }
            }
        },
    );
    // Cache-Control: no-store comes from `security_headers`, as on every dynamic response.
    Sse::new(events).into_response()
}
