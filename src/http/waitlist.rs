//! Waitlist signup (same answer for new and known addresses), confirmation, and status.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{normalize_email, normalize_locale, AppError, AppResult, AppState, JsonBody};
use crate::db::waitlist;

/// Signup: the `waitlist` rate-limit bucket.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/waitlist", post(signup))
}

pub fn status_router() -> Router<AppState> {
    Router::new().route("/api/waitlist/status", get(status))
}

#[derive(Deserialize)]
struct SignupBody {
    email: String,
    locale: Option<String>,
}

async fn signup(
    State(state): State<AppState>,
    JsonBody(b): JsonBody<SignupBody>,
) -> AppResult<impl IntoResponse> {
    let email = normalize_email(&b.email)?;
    let locale = normalize_locale(b.locale.as_deref());
    let mail = state.mail_enabled();
    let resend = state.config.waitlist.resend_confirmation_minutes * 60_000;
    // Without e-mail there is no way to confirm: the entry waits at once, and its private status
    // link is given here instead of in a mail (to the first signup of the address only: a link is
    // never handed out again to whoever types the address).
    let joined = waitlist::signup(&state.db, &email, locale, !mail, resend).await?;
    let body = match (mail, joined) {
        (true, waitlist::Joined::New(token) | waitlist::Joined::Resent(token)) => {
            let m = crate::mail::confirm_mail(&state.config, &email, locale, &token);
            crate::db::outbox::enqueue_now(&state.db, &m).await?;
            json!({"status": "accepted", "mail": true})
        }
        (true, waitlist::Joined::Known) => json!({"status": "accepted", "mail": true}),
        (false, waitlist::Joined::New(token)) => {
            let status = waitlist::status(&state.db, &token).await?;
            let url = format!(
                "{}/waitlist/status?token={token}",
                state.config.public_url()
            );
            json!({"status": "accepted", "mail": false, "known": false,
                   "position": status.and_then(|s| s.position), "status_url": url})
        }
        (false, _) => json!({"status": "accepted", "mail": false, "known": true}),
    };
    Ok((StatusCode::ACCEPTED, Json(body)))
}

#[derive(Deserialize)]
pub struct TokenQuery {
    pub token: Option<String>,
}

async fn status(
    State(state): State<AppState>,
    Query(q): Query<TokenQuery>,
) -> AppResult<Json<waitlist::Status>> {
    let token = q
        .token
        .filter(|t| t.len() <= 128)
        .ok_or(AppError::NotFound)?;
    waitlist::status(&state.db, &token)
        .await?
        .map(Json)
        .ok_or(AppError::NotFound)
}
