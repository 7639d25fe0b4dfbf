//! The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions` (plain and streamed),
//! with per-user `Bearer moss_…` keys. Same refusal policy, limits, quotas and overload answers as
//! the browser, in OpenAI's error shape. API requests are not stored in the browser history.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{AppError, AppState, Field};
use crate::answer::{self, Decision, Source};
use crate::db::{accounts, keys};
use crate::engine::{ChatMessage, Role};

mod request;
mod response;

use request::{invalid, to_messages, CompletionRequest};

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
        // The parameter a 422 is about, as OpenAI names it in `param`.
        let param = match &self.0 {
            AppError::Invalid { field, .. } => Some(field.name()),
            _ => None,
        };
        self.0.respond(|status, code, message, message_zh| {
            let kind = match status {
                StatusCode::UNAUTHORIZED => "authentication_error",
                StatusCode::FORBIDDEN => "permission_error",
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
                s if s.is_server_error() => "server_error",
                _ => "invalid_request_error",
            };
            let body = json!({"error": {"message": message, "message_zh": message_zh, "type": kind, "param": param, "code": code}});
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

async fn completions(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let fail = |e| ApiError(state.answer_error(e));
    let bad = |e: serde_json::Error| invalid(Field::Body, &format!("invalid request body: {e}"));
    let value: Value = serde_json::from_slice(&body).map_err(bad)?;
    super::reject_nul(&value)?;
    let mut req: CompletionRequest = serde_json::from_value(value).map_err(bad)?;
    let requested = req.requested();
    let messages = to_messages(std::mem::take(&mut req.messages))?;
    answer::params::messages(&state.config, &messages).map_err(fail)?;
    let params = answer::Params::from_openai(&state.config, requested).map_err(fail)?;
    let logprobs = params.logprobs.is_some();
    let id = format!("chatcmpl-{}", &crate::secrets::token()[..24]);
    let model = model_id(&state);
    let answers = &state.answers;
    // Every turn the caller wrote is checked: user turns, system messages, assistant turns,
    // function results and the arguments of earlier calls.
    let mut texts: Vec<&str> = Vec::new();
    for m in &messages {
        texts.push(&m.content);
        texts.extend(m.tool_calls.iter().map(|c| c.arguments.as_str()));
    }
    let decision = answers.gate(user.id, texts).await.map_err(fail)?;
    let events = match decision {
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
        Ok(response::stream(events, id, model, usage, logprobs))
    } else {
        response::complete(&state, events, id, model, logprobs).await
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
    // The conversation's text turns (function calls and results are not kept).
    let text_turns = messages
        .iter()
        .filter(|m| matches!(m.role, Role::User | Role::Assistant) && !m.content.is_empty());
    for m in text_turns {
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
