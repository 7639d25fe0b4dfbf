//! The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions` (plain and streamed),
//! with per-user `Bearer moss_…` keys. Same refusal policy, limits, quotas and overload answers as
//! the browser, in OpenAI's error shape. API requests are not stored in the browser history.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{AppError, AppState, Field};
use crate::answer::{self, Decision, Failure, Finish, Source, StreamEvent};
use crate::db::{accounts, keys};
use crate::engine::{ChatMessage, Role};

/// Completions: the `generate` rate-limit bucket, shed early when full.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/chat/completions", post(completions))
}

pub fn models_router() -> Router<AppState> {
    Router::new().route("/v1/models", get(models))
}

/// An error in OpenAI's shape (plus our Chinese text), keeping status and headers.
pub struct ApiError(AppError);

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        ApiError(e)
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.0.respond(|status, code, message, message_zh| {
            let kind = match status {
                StatusCode::UNAUTHORIZED => "authentication_error",
                StatusCode::FORBIDDEN => "permission_error",
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
                s if s.is_server_error() => "server_error",
                _ => "invalid_request_error",
            };
            let body = json!({"error": {"message": message, "message_zh": message_zh, "type": kind, "param": null, "code": code}});
            (status, Json(body)).into_response()
        })
    }
}

/// The owner of a valid API key.
pub struct ApiUser(pub accounts::User);

impl FromRequestParts<AppState> for ApiUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .filter(|k| k.starts_with("moss_") && k.len() < 200)
            .ok_or(ApiError(AppError::InvalidApiKey))?;
        let user_id = keys::authenticate(&state.db, key)
            .await?
            .ok_or(ApiError(AppError::InvalidApiKey))?;
        let user = accounts::user_by_id(&state.db, user_id)
            .await?
            .ok_or(ApiError(AppError::InvalidApiKey))?;
        Ok(ApiUser(user))
    }
}

/// The credentials of an `Authorization: Bearer …` header; the scheme is case-insensitive
/// (RFC 9110 11.1), so `bearer` and `BEARER` work too.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

fn model_id(state: &AppState) -> String {
    state.answers.backend.model_id()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn models(State(state): State<AppState>, _: ApiUser) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": model_id(&state), "object": "model", "created": 0, "owned_by": "moss"}]}),
    )
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[allow(dead_code)]
    model: Option<String>,
    messages: Vec<ApiMessage>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    stop: Option<StopField>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    /// OpenAI's switch for keeping a completion: here it files the exchange in the browser history.
    #[serde(default)]
    store: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    /// Send a last chunk (empty `choices`) with the token counts, as OpenAI does.
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ApiMessage {
    role: ApiRole,
    content: Content,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ApiRole {
    System,
    Developer,
    User,
    Assistant,
    /// Any other role (`tool`, `function`): refused with a clear message.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: PartKind,
    text: Option<String>,
}

#[derive(Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum PartKind {
    Text,
    /// Images, audio and files: refused with a clear message.
    #[serde(other)]
    Other,
}

fn invalid(field: Field, message: &str) -> ApiError {
    ApiError(AppError::invalid(field, message, "请求参数无效。"))
}

fn to_messages(msgs: Vec<ApiMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    msgs.into_iter()
        .map(|m| {
            let role = match m.role {
                ApiRole::System | ApiRole::Developer => Role::System,
                ApiRole::User => Role::User,
                ApiRole::Assistant => Role::Assistant,
                ApiRole::Other => {
                    return Err(invalid(
                        Field::Request("messages"),
                        "roles must be system, user or assistant",
                    ))
                }
            };
            let content = match m.content {
                Content::Text(t) => t,
                Content::Parts(parts) => {
                    if parts.iter().any(|p| p.kind != PartKind::Text) {
                        return Err(invalid(
                            Field::Request("messages"),
                            "only text content is supported",
                        ));
                    }
                    parts
                        .into_iter()
                        .filter_map(|p| p.text)
                        .collect::<Vec<_>>()
                        .join("")
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

async fn completions(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let fail = |e| ApiError(state.answer_error(e));
    let bad = |e: serde_json::Error| invalid(Field::Body, &format!("invalid request body: {e}"));
    let value: Value = serde_json::from_slice(&body).map_err(bad)?;
    super::reject_nul(&value)?;
    let req: CompletionRequest = serde_json::from_value(value).map_err(bad)?;
    let messages = to_messages(req.messages)?;
    answer::params::messages(&state.config, &messages).map_err(fail)?;
    let requested = answer::params::Requested {
        temperature: req.temperature,
        top_p: req.top_p,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        seed: req.seed,
        stop: match req.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
        },
        n: req.n,
    };
    let params = answer::Params::from_openai(&state.config, requested).map_err(fail)?;
    let id = format!("chatcmpl-{}", &crate::secrets::token()[..24]);
    let model = model_id(&state);
    let answers = &state.answers;
    // Every turn the caller wrote is checked: user turns, system messages, assistant turns.
    let texts = messages.iter().map(|m| m.content.as_str());
    let events = match answers.gate(user.id, texts).await.map_err(fail)? {
        Decision::Refuse(refusal) => answer::refusal_stream(refusal.answer, None),
        Decision::Answer(permit) => {
            let keep = match req.store {
                true => Some(keep_exchange(&state, user.id, &messages).await?),
                false => None,
            };
            let source = Source::Messages { messages, keep };
            answer::start(answers, user.id, source, params, permit)
                .await
                .map_err(fail)?
        }
    };
    if req.stream {
        let usage = req.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream(events, id, model, usage))
    } else {
        complete(&state, events, id, model).await
    }
}

/// `store: true`: a new conversation in the user's history holding the request's turns (the
/// answer is added when it is complete).
async fn keep_exchange(
    state: &AppState,
    user_id: i64,
    messages: &[ChatMessage],
) -> Result<i64, ApiError> {
    use crate::db::chats::{self, NewMessage};
    let first = messages
        .iter()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .unwrap_or("");
    let title: String = super::visible(first)
        .chars()
        .take(state.config.chat.title_chars)
        .collect();
    let conv = chats::create_conversation(&state.db, user_id, title.trim(), "web").await?;
    for m in messages.iter().filter(|m| m.role != Role::System) {
        // Assistant turns here were written by the caller, not by the model: kept as such, and
        // never exported as model answers.
        let author = if m.role == Role::Assistant {
            chats::Author::Caller
        } else {
            chats::Author::User
        };
        let finish = (m.role == Role::Assistant).then_some("stop");
        let nm = NewMessage {
            place: crate::db::chats::Place::AtLeaf,
            author,
            content: &m.content,
            finish_reason: finish,
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        chats::add_message(&state.db, user_id, conv.id, &nm).await?;
    }
    Ok(conv.id)
}

/// OpenAI's name for how an answer ended.
fn finish(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        Finish::Refused => "content_filter",
        Finish::Stop | Finish::Cancelled | Finish::Error => "stop",
    }
}

async fn complete(
    state: &AppState,
    mut events: tokio::sync::mpsc::Receiver<StreamEvent>,
    id: String,
    model: String,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = events.recv().await {
        match ev {
            StreamEvent::Token { text: t } => text.push_str(&t),
            StreamEvent::Queued { .. } | StreamEvent::Html { .. } => {}
            StreamEvent::Done { finish, usage, .. } => {
                let body = json!({
                    "id": id, "object": "chat.completion", "created": now_secs(), "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": self::finish(finish), "logprobs": null}],
                    "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": usage.prompt_tokens + usage.completion_tokens},
                });
                return Ok(Json(body).into_response());
            }
            StreamEvent::Failed { failure, message } => {
                return Err(ApiError(match failure {
                    Failure::Overloaded => state.overloaded(),
                    Failure::Unavailable => AppError::Unavailable(message),
                    Failure::GenerationFailed => AppError::Internal(message),
                }));
            }
        }
    }
    Err(ApiError(AppError::Internal(
        "the answer ended early".into(),
    )))
}

fn stream(
    rx: tokio::sync::mpsc::Receiver<StreamEvent>,
    id: String,
    model: String,
    include_usage: bool,
) -> Response {
    use std::collections::VecDeque;
    let created = now_secs();
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": choices});
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        c.to_string()
    };
    let choice = |delta: Value, finish: Option<&str>| json!([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]);
    // What is ready to send goes to `out`; `None` there ends the stream.
    let mut out: VecDeque<Option<String>> = VecDeque::new();
    out.push_back(Some(chunk(
        choice(json!({"role": "assistant", "content": ""}), None),
        None,
    )));
    let events = futures_util::stream::unfold(
        (rx, out, chunk),
        move |(mut rx, mut out, chunk)| async move {
            let event = |data: String| Ok::<_, Infallible>(Event::default().data(data));
            loop {
                if let Some(next) = out.pop_front() {
                    return next.map(|data| (event(data), (rx, out, chunk)));
                }
                match rx.recv().await {
                    Some(StreamEvent::Token { text }) => {
                        out.push_back(Some(chunk(choice(json!({"content": text}), None), None)));
                    }
                    Some(StreamEvent::Queued { .. } | StreamEvent::Html { .. }) => {}
                    Some(StreamEvent::Done { finish, usage, .. }) => {
                        out.push_back(Some(chunk(
                            choice(json!({}), Some(self::finish(finish))),
                            None,
                        )));
                        if include_usage {
                            let u = json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": usage.prompt_tokens + usage.completion_tokens});
                            out.push_back(Some(chunk(json!([]), Some(u))));
                        }
                        out.push_back(Some("[DONE]".into()));
                        out.push_back(None);
                    }
                    Some(StreamEvent::Failed { failure, message }) => {
                        let data = json!({"error": {"message": message, "type": "server_error", "code": failure.code()}}).to_string();
                        out.push_back(Some(data));
                        out.push_back(None);
                    }
                    None => return None,
                }
            }
        },
    );
    // Cache-Control: no-store comes from `security_headers`, as on every dynamic response.
    Sse::new(events).into_response()
}
