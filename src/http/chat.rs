//! The answer stream: `POST /api/conversations/{id}/messages` and `/api/messages/{id}/regenerate`
//! answer with server-sent events — `queued`, `token` and `html` (the answer so far, rendered),
//! then `done` or `error`. The answer goes on if the page goes away: `GET …/stream` follows it
//! again from its start (after a reload, or in another tab), `POST …/stop` ends it.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderValue;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::auth::CurrentUser;
use super::{AppError, AppResult, AppState, Field, JsonBody, OptionalJson};
use crate::answer::{self, params, Decision, Params, Source, StreamEvent};
use crate::db::chats::{self, NewMessage};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/conversations/{id}/messages", post(send))
        .route("/api/messages/{id}/regenerate", post(regenerate))
        .route("/api/messages/{id}/edit", post(edit))
        .route("/api/conversations/{id}/stream", get(follow))
        .route("/api/conversations/{id}/stop", post(stop))
}

/// The answer being made in the conversation, from its start: the same events as the request
/// that asked for it. 204 when none is being made.
async fn follow(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    if let Some(live) = state.answers.live.get(id, user.id) {
        return Ok(stream(live.follow()));
    }
    chats::conversation(&state.db, user.id, id)
        .await?
        .ok_or(AppError::NotFound)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Ends the answer being made in the conversation; what it has written is kept (`cancelled`).
/// 204 whether or not one was running.
async fn stop(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
) -> AppResult<StatusCode> {
    match state.answers.live.get(id, user.id) {
        Some(live) => live.stop(),
        None => {
            chats::conversation(&state.db, user.id, id)
                .await?
                .ok_or(AppError::NotFound)?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
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

/// A new question in a conversation: checked, then the gate (cool-down, refusal rules, slot,
/// quota) before anything is stored; the question is stored at the end of the branch being
/// viewed, then answered (by the model, or by the rules), and taken back if nothing can answer it.
async fn send(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
    JsonBody(b): JsonBody<SendBody>,
) -> AppResult<Response> {
    chats::conversation(&state.db, user.id, id)
        .await?
        .ok_or(AppError::NotFound)?;
    ask(&state, user.id, id, chats::Place::AtLeaf, b).await
}

/// An edited question: a new question beside the one edited (which stays, with its answers, as
/// another branch), answered like any other.
async fn edit(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
    JsonBody(b): JsonBody<SendBody>,
) -> AppResult<Response> {
    let old = chats::owned_message(&state.db, user.id, id)
        .await?
        .ok_or(AppError::NotFound)?;
    if old.role != chats::MessageRole::User {
        return Err(AppError::invalid(
            Field::Message,
            "only questions can be edited",
            "只能编辑提问",
        ));
    }
    let place = chats::Place::Under(old.parent_id);
    ask(&state, user.id, old.conversation_id, place, b).await
}

/// Stores a question at `place` and answers it (see `send`).
async fn ask(
    state: &AppState,
    user_id: i64,
    conversation: i64,
    place: chats::Place,
    b: SendBody,
) -> AppResult<Response> {
    let answers = &state.answers;
    let fail = |e| state.answer_error(e);
    let content = params::message(&state.config, &b.content).map_err(fail)?;
    let params = Params::from_browser(&state.config, b.temperature, b.max_tokens).map_err(fail)?;
    let decision = answers
        .gate(user_id, [content.as_str()])
        .await
        .map_err(fail)?;
    let m = NewMessage {
        author: chats::Author::User,
        place,
        content: &content,
        finish_reason: None,
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    let question = chats::add_message(&state.db, user_id, conversation, &m)
        .await?
        .ok_or(AppError::NotFound)?;
    let title: String = super::visible(&content)
        .chars()
        .take(state.config.chat.title_chars)
        .collect();
    chats::set_title_if_empty(&state.db, conversation, title.trim()).await?;
    let events = match decision {
        Decision::Refuse(refusal) => {
            answers
                .refuse_in(user_id, conversation, question.id, refusal)
                .await
        }
        Decision::Answer(permit) => {
            let source = Source::Conversation {
                id: conversation,
                question: Some(question.id),
                after: question.id,
            };
            answer::start(answers, user_id, source, params, permit).await
        }
    };
    match events {
        Ok(rx) => Ok(stream(rx)),
        Err(e) => {
            // Nothing will answer this question: take it back rather than leave it dangling.
            answers.take_back(conversation, question.id).await?;
            Err(fail(e))
        }
    }
}

/// Another answer to the question `id` answers, beside it (the earlier answers stay; the new
/// one is shown).
async fn regenerate(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
    OptionalJson(b): OptionalJson<RegenerateBody>,
) -> AppResult<Response> {
    let answers = &state.answers;
    let fail = |e| state.answer_error(e);
    let params = Params::from_browser(&state.config, b.temperature, b.max_tokens).map_err(fail)?;
    let answer = chats::owned_message(&state.db, user.id, id)
        .await?
        .ok_or(AppError::NotFound)?;
    let question = match (answer.role, answer.parent_id) {
        (chats::MessageRole::Assistant, Some(q)) => chats::owned_message(&state.db, user.id, q)
            .await?
            .filter(|q| q.role == chats::MessageRole::User),
        _ => None,
    };
    let Some(question) = question else {
        return Err(AppError::invalid(
            Field::Message,
            "only answers can be regenerated",
            "只能重新生成回答",
        ));
    };
    let conversation = answer.conversation_id;
    let gate = answers.gate(user.id, [question.content.as_str()]);
    let events = match gate.await.map_err(fail)? {
        Decision::Refuse(refusal) => {
            answers
                .refuse_in(user.id, conversation, question.id, refusal)
                .await
        }
        Decision::Answer(permit) => {
            let source = Source::Conversation {
                id: conversation,
                question: None,
                after: question.id,
            };
            answer::start(answers, user.id, source, params, permit).await
        }
    };
    events.map(stream).map_err(fail)
}

fn sse_event(ev: StreamEvent) -> Event {
    let (name, data) = match ev {
        StreamEvent::Queued {
            position,
            wait_secs,
        } => (
            "queued",
            json!({ "position": position, "wait_secs": wait_secs }),
        ),
        StreamEvent::Token { text } => ("token", json!({ "text": text })),
        StreamEvent::Logprob(lp) => ("logprob", json!(lp)),
        StreamEvent::ToolCall(call) => ("tool_call", json!(call)),
        StreamEvent::Html { html, text_len } => {
            ("html", json!({ "html": html, "text_len": text_len }))
        }
        StreamEvent::Done {
            message_id,
            finish,
            usage,
            html,
        } => (
            "done",
            json!({"message_id": message_id, "finish_reason": finish.as_str(), "html": html,
                   "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}}),
        ),
        StreamEvent::Failed { failure, message } => (
            "error",
            json!({ "code": failure.code(), "message": message }),
        ),
    };
    Event::default().event(name).data(data.to_string())
}

/// The SSE response. When the client goes away the receiver is dropped: a conversation's answer
/// goes on (only this follower ends), an API answer ends and is kept as `cancelled`.
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
