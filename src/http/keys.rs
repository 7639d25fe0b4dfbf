//! Personal API keys for the OpenAI-compatible API: the full key is shown once, at creation.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::CurrentUser;
use super::{bounded_text, AppError, AppResult, AppState, Field, OptionalJson};
use crate::db::keys;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/keys", get(list).post(create))
        .route("/api/keys/{id}", delete(revoke))
}

async fn list(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
) -> AppResult<Json<Value>> {
    Ok(Json(json!({"keys": keys::list(&state.db, user.id).await?})))
}

#[derive(Deserialize, Default)]
struct CreateBody {
    name: Option<String>,
}

async fn create(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    OptionalJson(b): OptionalJson<CreateBody>,
) -> AppResult<impl IntoResponse> {
    let name = bounded_text(Field::Name, b.name.as_deref().unwrap_or(""), 100)?;
    let (row, key) = keys::create(&state.db, user.id, &name).await?;
    let mut v = serde_json::to_value(&row).map_err(|e| AppError::Internal(e.to_string()))?;
    v["key"] = json!(key);
    Ok((StatusCode::CREATED, Json(v)))
}

async fn revoke(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<i64>,
) -> AppResult<StatusCode> {
    if keys::revoke(&state.db, user.id, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFound)
    }
}
