//! Conversations, their messages, and feedback on answers — always the signed-in user's own.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::CurrentUser;
use super::{bounded_text, AppError, AppResult, AppState, Field, JsonBody, OptionalJson};
use crate::db::branches;
use crate::db::chats::{self, Conversation, Message};
use crate::db::consent;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/conversations", get(list).post(create))
        .route(
            "/api/conversations/{id}",
            get(show).patch(update).delete(remove),
        )
        .route("/api/conversations/{id}/branch", post(switch_branch))
        .route("/api/messages/{id}/feedback", post(feedback))
}

fn conversation_json(c: &Conversation) -> Value {
    json!({"id": c.id, "title": c.title, "updated_at": c.updated_at, "created_at": c.created_at,
           "exclude_from_training": c.exclude_from_training == 1})
}

/// A message as the browser gets it: the text and its sanitised HTML rendering.
pub fn message_json(m: &Message) -> Value {
    let html = if m.role == chats::MessageRole::Assistant {
        crate::render::markdown(&m.content)
    } else {
        crate::render::plain(&m.content)
    };
    json!({"id": m.id, "role": m.role, "content": m.content, "html": html, "created_at": m.created_at,
           "finish_reason": m.finish_reason, "rating": m.rating})
}

#[derive(Deserialize)]
struct ListQuery {
    /// Words to find in titles and messages.
    q: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Query(query): Query<ListQuery>,
) -> AppResult<Json<Value>> {
    let q = query.q.as_deref().unwrap_or("");
    let q = bounded_text(Field::Query, q, crate::db::search::MAX_QUERY_CHARS)?;
    let convs = if q.is_empty() {
        chats::list_conversations(&state.db, user.id).await?
    } else {
        crate::db::search::conversations(&state.db, user.id, &q).await?
    };
    Ok(Json(
        json!({"conversations": convs.iter().map(conversation_json).collect::<Vec<_>>()}),
    ))
}

#[derive(Deserialize, Default)]
struct CreateBody {
    title: Option<String>,
}

async fn create(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    OptionalJson(b): OptionalJson<CreateBody>,
) -> AppResult<impl IntoResponse> {
    let title = bounded_text(Field::Title, b.title.as_deref().unwrap_or(""), 200)?;
    let c = chats::create_conversation(&state.db, user.id, &title, "web").await?;
    Ok((StatusCode::CREATED, Json(conversation_json(&c))))
}

async fn show(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
) -> AppResult<Json<Value>> {
    let c = chats::conversation(&state.db, user.id, id)
        .await?
        .ok_or(AppError::NotFound)?;
    // Asked before the messages are read: an answer that ends in between is then both stored
    // and announced, never neither.
    let answering = state.answers.live.get(id, user.id).is_some();
    let all = chats::messages(&state.db, user.id, id).await?;
    let mut v = conversation_json(&c);
    v["messages"] = branch_json(&all, c.leaf_id);
    v["answering"] = json!(answering);
    Ok(Json(v))
}

/// The branch being viewed, each message with its siblings (`‹ 1 / 2 ›`).
fn branch_json(all: &[Message], leaf: Option<i64>) -> Value {
    branches::path_to(all, leaf)
        .into_iter()
        .map(|m| {
            let mut v = message_json(m);
            v["siblings"] = json!(branches::siblings(all, m));
            v
        })
        .collect()
}

#[derive(Deserialize)]
struct BranchBody {
    message_id: i64,
}

/// Shows the branch through `message_id` (an edited question or another answer), at its newest
/// end; answers with the conversation as `GET` does.
async fn switch_branch(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
    JsonBody(b): JsonBody<BranchBody>,
) -> AppResult<Json<Value>> {
    let c = chats::conversation(&state.db, user.id, id)
        .await?
        .ok_or(AppError::NotFound)?;
    let all = chats::messages(&state.db, user.id, id).await?;
    if !all.iter().any(|m| m.id == b.message_id) {
        return Err(AppError::NotFound);
    }
    let leaf = branches::newest_end(&all, b.message_id);
    branches::set_leaf(&state.db, user.id, id, leaf).await?;
    let mut v = conversation_json(&c);
    v["messages"] = branch_json(&all, Some(leaf));
    v["answering"] = json!(state.answers.live.get(id, user.id).is_some());
    Ok(Json(v))
}

#[derive(Deserialize)]
struct UpdateBody {
    title: Option<String>,
    exclude_from_training: Option<bool>,
}

async fn update(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
    JsonBody(b): JsonBody<UpdateBody>,
) -> AppResult<Json<Value>> {
    let title = b
        .title
        .as_deref()
        .map(|t| bounded_text(Field::Title, t, 200))
        .transpose()?;
    if !chats::update_conversation(
        &state.db,
        user.id,
        id,
        title.as_deref(),
        b.exclude_from_training,
    )
    .await?
    {
        return Err(AppError::NotFound);
    }
    let c = chats::conversation(&state.db, user.id, id)
        .await?
        .ok_or(AppError::NotFound)?;
    Ok(Json(conversation_json(&c)))
}

async fn remove(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
) -> AppResult<StatusCode> {
    if chats::delete_conversation(&state.db, user.id, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFound)
    }
}

#[derive(Deserialize)]
struct FeedbackBody {
    rating: i64,
    comment: Option<String>,
}

async fn feedback(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
    JsonBody(b): JsonBody<FeedbackBody>,
) -> AppResult<Json<Value>> {
    if b.rating != 1 && b.rating != -1 {
        return Err(AppError::invalid(
            Field::Rating,
            "rating must be 1 or -1",
            "评分必须是 1 或 -1",
        ));
    }
    let comment =
        super::bounded_multiline(Field::Comment, b.comment.as_deref().unwrap_or(""), 2000)?;
    let consented = consent::is_granted(&state.db, &user.pseudonym).await?;
    if !crate::db::feedback::rate(&state.db, user.id, id, b.rating, &comment, consented).await? {
        return Err(AppError::NotFound);
    }
    Ok(Json(
        json!({"message_id": id, "rating": b.rating, "comment": comment}),
    ))
}
