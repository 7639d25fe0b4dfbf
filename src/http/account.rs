//! The user's own account: name, password, a download of everything the service holds about
//! them, and deleting it all.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use axum_extra::extract::CookieJar;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{cleared_cookie, cookie_name, CurrentUser};
use super::{
    bounded_text, check_password, hash_password, verify_password, AppError, AppResult, AppState,
    ClientAddr, Field, JsonBody,
};
use crate::db::{accounts, chats, consent, keys, now_ms, profile};

/// The paths that check the password: the `auth` rate-limit bucket, like signing in.
pub fn password_router() -> Router<AppState> {
    Router::new()
        .route("/api/me/password", put(change_password))
        .route("/api/me/delete", post(delete_account))
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/me/profile", put(set_profile))
        .route("/api/me/export", get(export))
}

/// The password given is the account's (with the same bounded hashing as signing in).
async fn confirm_password(
    state: &AppState,
    client: std::net::IpAddr,
    user: &accounts::User,
    password: String,
) -> AppResult<()> {
    if password.len() > 4096 {
        return Err(AppError::InvalidCredentials);
    }
    let record = accounts::login_record(&state.db, &user.email, "").await?;
    let hash = record.map(|r| r.password_hash);
    match verify_password(state, client, password, hash).await? {
        true => Ok(()),
        false => Err(AppError::InvalidCredentials),
    }
}

#[derive(Deserialize)]
struct PasswordBody {
    current: String,
    password: String,
}

/// A new password: other sessions end, this one stays.
async fn change_password(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    CurrentUser(user): CurrentUser,
    jar: CookieJar,
    JsonBody(b): JsonBody<PasswordBody>,
) -> AppResult<StatusCode> {
    check_password(&state, &b.password)?;
    confirm_password(&state, client, &user, b.current).await?;
    let hash = hash_password(&state, client, b.password).await?;
    let session = jar
        .get(cookie_name(&state))
        .map(|c| c.value().to_string())
        .unwrap_or_default();
    profile::change_password(&state.db, user.id, &hash, &session).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ProfileBody {
    display_name: String,
}

async fn set_profile(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    JsonBody(b): JsonBody<ProfileBody>,
) -> AppResult<Json<Value>> {
    let name = bounded_text(Field::DisplayName, &b.display_name, 64)?;
    profile::set_display_name(&state.db, user.id, &name).await?;
    Ok(Json(json!({"display_name": name})))
}

/// Everything the service holds about the user, as one JSON file: the account, every
/// conversation with all its messages (every version), ratings, the consent history, API keys
/// (their names and prefixes; the keys themselves are never stored).
async fn export(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
) -> AppResult<impl IntoResponse> {
    let mut conversations = Vec::new();
    for id in profile::conversation_ids(&state.db, user.id).await? {
        let Some(c) = chats::conversation(&state.db, user.id, id).await? else {
            continue; // deleted meanwhile
        };
        let messages = chats::messages(&state.db, user.id, id).await?;
        conversations.push(json!({
            "id": c.id, "title": c.title, "source": c.source, "created_at": c.created_at,
            "updated_at": c.updated_at, "exclude_from_training": c.exclude_from_training == 1,
            "messages": messages,
        }));
    }
    let body = json!({
        "exported_at": now_ms(),
        "account": {"id": user.id, "email": user.email, "display_name": user.display_name,
                    "role": user.role, "locale": user.locale, "created_at": user.created_at},
        "conversations": conversations,
        "ratings": profile::ratings(&state.db, user.id).await?,
        "consent_history": consent::history(&state.db, &user.pseudonym).await?,
        "api_keys": keys::list(&state.db, user.id).await?,
    });
    let headers = [
        (header::CONTENT_TYPE, "application/json"),
        (
            header::CONTENT_DISPOSITION,
            "attachment; filename=\"moss-account.json\"",
        ),
    ];
    Ok((headers, body.to_string()))
}

#[derive(Deserialize)]
struct DeleteBody {
    password: String,
}

/// Deletes the account and everything it owns, after the password; consent records stay,
/// naming only a pseudonym nothing links to anyone any more.
async fn delete_account(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    CurrentUser(user): CurrentUser,
    jar: CookieJar,
    JsonBody(b): JsonBody<DeleteBody>,
) -> AppResult<impl IntoResponse> {
    confirm_password(&state, client, &user, b.password).await?;
    accounts::delete_user(&state.db, &user.email).await?;
    Ok((jar.add(cleared_cookie(&state)), StatusCode::NO_CONTENT))
}
