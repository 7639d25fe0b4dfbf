//! One answer's request to an OpenAI-compatible server: the conversation in OpenAI's shape and
//! the caller's settings (sampling, stop strings, log-probabilities, response format, functions)
//! passed on as they were asked for.

use serde_json::{json, Value};

use crate::engine::{ChatMessage, Role, Tool};

/// What one answer needs from the upstream.
pub struct UpstreamRequest {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// OpenAI's `response_format`, passed on as asked for.
    pub response_format: Option<Value>,
    pub tools: Vec<Tool>,
    /// OpenAI's `tool_choice`, passed on as asked for.
    pub tool_choice: Option<Value>,
}

pub(super) fn request_body(model: &str, req: &UpstreamRequest) -> Value {
    let messages: Vec<Value> = req.messages.iter().map(message).collect();
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
    });
    if let Some(p) = req.top_p {
        body["top_p"] = json!(p);
    }
    if let Some(s) = req.seed {
        body["seed"] = json!(s);
    }
    if !req.stop.is_empty() {
        // OpenAI's API takes at most four.
        body["stop"] = json!(req.stop.iter().take(4).collect::<Vec<_>>());
    }
    if let Some(k) = req.logprobs {
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(k);
    }
    if let Some(f) = &req.response_format {
        body["response_format"] = f.clone();
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| json!({"type": "function", "function": t}))
            .collect();
        body["tools"] = json!(tools);
    }
    if let Some(c) = &req.tool_choice {
        body["tool_choice"] = c.clone();
    }
    body
}

/// A message in OpenAI's shape.
fn message(m: &ChatMessage) -> Value {
    let role = match m.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    let mut v = json!({"role": role, "content": m.content});
    if !m.tool_calls.is_empty() {
        let calls: Vec<Value> = m
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
        v["tool_calls"] = json!(calls);
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    v
}
