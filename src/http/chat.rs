//! The answer stream: `POST /api/conversations/{id}/messages` and `/api/messages/{id}/regenerate`
//! answer with server-sent events — `queued`, `token`, then `done` or `error`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::auth::CurrentUser;
use super::{AppError, AppResult, AppState, JsonBody, OptionalJson};
use crate::chat::{self, StartError, StreamEvent, Turn};
use crate::db::chats::{self, NewMessage};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/conversations/{id}/messages", post(send))
        .route("/api/messages/{id}/regenerate", post(regenerate))
}

#[derive(Deserialize)]
struct SendBody {
    content: String,
    temperature: Option<f64>,
    max_tokens: Option<usize>,
}

#[derive(Deserialize, Default)]
struct RegenerateBody {
    temperature: Option<f64>,
    max_tokens: Option<usize>,
}

fn check_params(
    state: &AppState,
    temperature: Option<f64>,
    max_tokens: Option<usize>,
) -> AppResult<usize> {
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(AppError::invalid(
            "temperature",
            "temperature must be between 0 and 2",
            "temperature 必须在 0 到 2 之间",
        ));
    }
    let limit = state.config.chat.max_tokens_limit;
    match max_tokens {
        Some(n) if n == 0 || n > limit => Err(AppError::Invalid {
            field: "max_tokens",
            message: format!("max_tokens must be between 1 and {limit}"),
            message_zh: format!("max_tokens 必须在 1 到 {limit} 之间"),
        }),
        Some(n) => Ok(n),
        None => Ok(state.config.engine.max_tokens.min(limit)),
    }
}

/// Takes a generation slot for `user_id` without waiting — only once the whole request has been
/// read and checked, so a request still on its way holds nothing: `503 overloaded` when every
/// slot is taken, `429 busy` when the account has its answers in progress.
pub(crate) fn take_slot(state: &AppState, user_id: i64) -> AppResult<crate::admission::Permit> {
    state
        .admission
        .try_admit(user_id)
        .map_err(|shed| match shed {
            crate::admission::Shed::Busy => AppError::Busy,
            crate::admission::Shed::Overloaded => state.overloaded(),
        })
}

/// The account's and the service's daily token budgets.
pub(crate) async fn check_quota(state: &AppState, user_id: i64) -> AppResult<()> {
    let l = &state.config.limits;
    let now = std::time::SystemTime::now();
    let day = crate::admission::local_day(now, l.utc_offset_hours);
    if l.daily_user_tokens > 0
        && crate::db::usage::user_tokens(&state.db, user_id, &day).await? >= l.daily_user_tokens
    {
        return Err(AppError::QuotaExceeded {
            retry_after_secs: crate::admission::secs_until_midnight(now, l.utc_offset_hours),
        });
    }
    if l.daily_service_tokens > 0
        && crate::db::usage::service_tokens(&state.db, &day).await? >= l.daily_service_tokens
    {
        return Err(state.overloaded());
    }
    Ok(())
}

/// `429 cooldown` while the account's recent refusals earn a pause (browser and API alike).
pub(crate) async fn check_cooldown(state: &AppState, user_id: i64) -> AppResult<()> {
    match chat::cooldown_left(&state.chat_deps(), user_id).await? {
        Some(ms) => Err(AppError::Cooldown {
            retry_after_secs: (ms as u64).div_ceil(1000).max(1),
        }),
        None => Ok(()),
    }
}

async fn send(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
    JsonBody(b): JsonBody<SendBody>,
) -> AppResult<Response> {
    let content = b.content.trim().to_string();
    if content.is_empty() {
        return Err(AppError::invalid(
            "content",
            "the message is empty",
            "消息不能为空",
        ));
    }
    let max_chars = state.config.chat.max_message_chars;
    if content.chars().count() > max_chars {
        return Err(AppError::PromptTooLong { max_chars });
    }
    let max_tokens = check_params(&state, b.temperature, b.max_tokens)?;
    let deps = state.chat_deps();
    let refusal = chat::refusal_for(&deps, [content.as_str()]);
    // A refusal needs no model, so it takes no slot; anything else takes one before any
    // database work, so that shedding stays cheap when the service is busiest.
    let permit = match refusal {
        Some(_) => None,
        None => Some(take_slot(&state, user.id)?),
    };
    chats::conversation(&state.db, user.id, id)
        .await?
        .ok_or(AppError::NotFound)?;
    check_cooldown(&state, user.id).await?;
    if permit.is_some() {
        check_quota(&state, user.id).await?;
    }
    // The question is stored before the answer starts.
    let m = NewMessage {
        author: chats::Author::User,
        content: &content,
        finish_reason: None,
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    let question = chats::add_message(&state.db, user.id, id, &m)
        .await?
        .ok_or(AppError::NotFound)?;
    let title: String = super::visible(&content)
        .chars()
        .take(state.config.chat.title_chars)
        .collect();
    chats::set_title_if_empty(&state.db, id, title.trim()).await?;
    let events = match (refusal, permit) {
        (Some(answer), _) => chat::refuse(&deps, user.id, id, answer).await,
        (None, Some(permit)) => {
            let turn = Turn {
                user_id: user.id,
                conversation_id: id,
                question_id: Some(question.id),
                replaces: None,
                max_tokens,
                temperature: b.temperature,
                permit,
                stateless: None,
            };
            chat::start_answer(&deps, turn).await
        }
        (None, None) => unreachable!("a permit is taken for every answer the model makes"),
    };
    match events {
        Ok(rx) => Ok(stream(rx)),
        Err(e) => {
            // Nothing will answer this question: take it back rather than leave it dangling.
            chats::truncate_from(&state.db, id, question.id).await?;
            Err(start_error(&state, e))
        }
    }
}

async fn regenerate(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
    OptionalJson(b): OptionalJson<RegenerateBody>,
) -> AppResult<Response> {
    let max_tokens = check_params(&state, b.temperature, b.max_tokens)?;
    let answer = chats::owned_message(&state.db, user.id, id)
        .await?
        .ok_or(AppError::NotFound)?;
    if answer.role != "assistant" {
        return Err(AppError::invalid(
            "message",
            "only answers can be regenerated",
            "只能重新生成回答",
        ));
    }
    check_cooldown(&state, user.id).await?;
    let deps = state.chat_deps();
    let question = chats::messages(&state.db, user.id, answer.conversation_id)
        .await?
        .into_iter()
        .filter(|m| m.id < answer.id)
        .rev()
        .find(|m| m.role == "user");
    let refusal = question
        .as_ref()
        .and_then(|q| chat::refusal_for(&deps, [q.content.as_str()]));
    let permit = match refusal {
        Some(_) => None,
        None => Some(take_slot(&state, user.id)?),
    };
    if permit.is_some() {
        check_quota(&state, user.id).await?;
    }
    let events = match (refusal, permit) {
        (Some(text), _) => {
            chats::truncate_from(&state.db, answer.conversation_id, answer.id).await?;
            chat::refuse(&deps, user.id, answer.conversation_id, text).await
        }
        (None, Some(permit)) => {
            let turn = Turn {
                user_id: user.id,
                conversation_id: answer.conversation_id,
                question_id: None,
                replaces: Some(answer.id),
                max_tokens,
                temperature: b.temperature,
                permit,
                stateless: None,
            };
            chat::start_answer(&deps, turn).await
        }
        (None, None) => unreachable!("a permit is taken for every answer the model makes"),
    };
    events.map(stream).map_err(|e| start_error(&state, e))
}

pub(crate) fn start_error(state: &AppState, e: StartError) -> AppError {
    match e {
        StartError::PromptTooLong => AppError::PromptTooLong { max_chars: 0 },
        StartError::Overloaded => state.overloaded(),
        StartError::Db(d) => d.into(),
        StartError::Upstream(m) => AppError::Unavailable(m),
        StartError::Internal(m) => AppError::Internal(m),
    }
}

fn sse_event(ev: StreamEvent) -> Event {
    let (name, data) = match ev {
        StreamEvent::Queued { position } => ("queued", json!({ "position": position })),
        StreamEvent::Token { text } => ("token", json!({ "text": text })),
        StreamEvent::Done {
            message_id,
            finish_reason,
            usage,
            html,
        } => (
            "done",
            json!({"message_id": message_id, "finish_reason": finish_reason, "html": html,
                   "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}}),
        ),
        StreamEvent::Error { code, message } => {
            ("error", json!({ "code": code, "message": message }))
        }
    };
    Event::default().event(name).data(data.to_string())
}

/// The SSE response; when the client goes away the receiver is dropped and the answer task
/// stores what it has as `cancelled`.
fn stream(rx: mpsc::Receiver<StreamEvent>) -> Response {
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|ev| (Ok::<_, Infallible>(sse_event(ev)), rx))
    });
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    // Cache-Control: no-store comes from `security_headers`, as on every dynamic response.
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}
