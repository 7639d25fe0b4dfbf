//! Registration with an invite code, sign-in and sign-out, the current user, consent, and
//! password reset by e-mail.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use axum_extra::extract::CookieJar;
use serde::Deserialize;
use serde_json::json;

use super::auth::{cleared_cookie, cookie_name, session_cookie, CurrentUser};
use super::{
    bounded_text, check_password, hash_password, normalize_email, verify_password, AppError,
    AppResult, AppState, EmailBody, JsonBody,
};
use crate::db::accounts::{self, NewUser, User};
use crate::db::{consent, invites, now_ms, waitlist};

/// Registration, sign-in and password reset: the `auth` rate-limit bucket.
pub fn auth_router() -> Router<AppState> {
    Router::new()
        .route("/api/register", post(register))
        .route("/api/login", post(login))
        .route("/api/password/forgot", post(forgot_password))
        .route("/api/password/reset", post(reset_password))
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/consent", put(set_consent).get(consent_history))
}

#[derive(Deserialize)]
struct RegisterBody {
    invite_code: String,
    email: String,
    password: String,
    display_name: Option<String>,
    locale: Option<String>,
}

async fn register(
    State(state): State<AppState>,
    jar: CookieJar,
    JsonBody(b): JsonBody<RegisterBody>,
) -> AppResult<impl IntoResponse> {
    let email = normalize_email(&b.email)?;
    check_password(&state, &b.password)?;
    let display_name = bounded_text("display_name", b.display_name.as_deref().unwrap_or(""), 64)?;
    let display_name = if display_name.is_empty() {
        email.split('@').next().unwrap_or("").to_string()
    } else {
        display_name
    };
    let locale = super::normalize_locale(b.locale.as_deref());
    if crate::secrets::normalize_code(&b.invite_code).is_none() {
        return Err(AppError::InvalidInvite);
    }
    let password_hash = hash_password(b.password).await?;
    let user = create_account(
        &state,
        &b.invite_code,
        &email,
        &password_hash,
        &display_name,
        locale,
    )
    .await?;
    let token = accounts::create_session(&state.db, user.id, absolute_ms(&state)).await?;
    Ok((
        StatusCode::CREATED,
        jar.add(session_cookie(&state, token)),
        Json(json!({ "user": user_json(&user) })),
    ))
}

/// Redeems the code and creates the account in one transaction: an e-mail conflict rolls the
/// code's use back, and of many simultaneous registrations with one code exactly one succeeds.
async fn create_account(
    state: &AppState,
    code: &str,
    email: &str,
    password_hash: &str,
    display_name: &str,
    locale: &str,
) -> AppResult<User> {
    let mut tx = state.db.begin().await?;
    let (invite_id, role) = invites::redeem(&mut tx, code)
        .await?
        .ok_or(AppError::InvalidInvite)?;
    let new = NewUser {
        email,
        password_hash,
        display_name,
        role: &role,
        locale,
        invite_id: Some(invite_id),
    };
    let user = match accounts::insert_user(&mut tx, &new).await {
        Ok(u) => u,
        Err(e) if e.is_conflict() => return Err(AppError::EmailTaken),
        Err(e) => return Err(e.into()),
    };
    waitlist::mark_registered(&mut tx, email).await?;
    tx.commit().await.map_err(crate::db::DbError::from)?;
    tracing::info!(user = user.id, "account registered");
    Ok(user)
}

fn absolute_ms(state: &AppState) -> i64 {
    state.config.accounts.session_absolute_days as i64 * 86_400_000
}

fn user_json(u: &User) -> serde_json::Value {
    json!({"id": u.id, "email": u.email, "display_name": u.display_name, "role": u.role})
}

#[derive(Deserialize)]
struct LoginBody {
    email: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    jar: CookieJar,
    JsonBody(b): JsonBody<LoginBody>,
) -> AppResult<impl IntoResponse> {
    let email = b.email.trim().to_lowercase();
    let record = accounts::login_record(&state.db, &email).await?;
    // Unknown addresses pay for a hash too, so timing does not tell which accounts exist.
    let hash = record
        .as_ref()
        .map(|r| r.password_hash.clone())
        .unwrap_or_else(|| crate::secrets::dummy_hash().to_string());
    let ok = b.password.len() <= 4096 && verify_password(b.password, hash).await?;
    let Some(record) = record else {
        return Err(AppError::InvalidCredentials);
    };
    let cfg = &state.config.accounts;
    if record.login_blocked_until > now_ms() {
        return Err(AppError::InvalidCredentials);
    }
    if !ok {
        accounts::record_failed_login(
            &state.db,
            record.id,
            cfg.free_login_failures,
            cfg.max_login_block_secs * 1000,
        )
        .await?;
        return Err(AppError::InvalidCredentials);
    }
    accounts::reset_failed_logins(&state.db, record.id).await?;
    // A new session id at every sign-in; any session the browser had before is ended.
    if let Some(old) = jar.get(cookie_name(&state)) {
        accounts::delete_session(&state.db, old.value()).await?;
    }
    let token = accounts::create_session(&state.db, record.id, absolute_ms(&state)).await?;
    let user = accounts::user_by_email(&state.db, &email)
        .await?
        .ok_or(AppError::InvalidCredentials)?;
    Ok((
        jar.add(session_cookie(&state, token)),
        Json(json!({ "user": user_json(&user) })),
    ))
}

async fn logout(State(state): State<AppState>, jar: CookieJar) -> AppResult<impl IntoResponse> {
    if let Some(c) = jar.get(cookie_name(&state)) {
        accounts::delete_session(&state.db, c.value()).await?;
    }
    Ok((StatusCode::NO_CONTENT, jar.add(cleared_cookie(&state))))
}

async fn consent_json(state: &AppState, user: &User) -> AppResult<serde_json::Value> {
    let granted = consent::is_granted(&state.db, &user.pseudonym).await?;
    Ok(json!({"model_improvement": granted, "text_version": state.config.consent.text_version}))
}

async fn me(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
) -> AppResult<Json<serde_json::Value>> {
    let c = consent_json(&state, &user).await?;
    let text = json!({"en": state.config.consent.text_en, "zh": state.config.consent.text_zh});
    Ok(Json(
        json!({"user": user_json(&user), "consent": c, "consent_text": text, "locale": user.locale}),
    ))
}

#[derive(Deserialize)]
struct ConsentBody {
    model_improvement: bool,
}

async fn set_consent(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    JsonBody(b): JsonBody<ConsentBody>,
) -> AppResult<Json<serde_json::Value>> {
    let version = &state.config.consent.text_version;
    consent::record(
        &state.db,
        &user.pseudonym,
        consent::MODEL_IMPROVEMENT,
        b.model_improvement,
        version,
        "settings",
    )
    .await?;
    Ok(Json(consent_json(&state, &user).await?))
}

/// The user's own consent log, oldest first: every grant and withdrawal they made.
async fn consent_history(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
) -> AppResult<Json<serde_json::Value>> {
    let records = consent::history(&state.db, &user.pseudonym).await?;
    let mut current = consent_json(&state, &user).await?;
    current["history"] =
        serde_json::to_value(records).map_err(|e| AppError::Internal(e.to_string()))?;
    Ok(Json(current))
}

async fn forgot_password(
    State(state): State<AppState>,
    JsonBody(b): JsonBody<EmailBody>,
) -> AppResult<impl IntoResponse> {
    // Same answer whether or not the account exists.
    let accepted = (StatusCode::ACCEPTED, Json(json!({"status": "accepted"})));
    let Ok(email) = normalize_email(&b.email) else {
        return Ok(accepted);
    };
    if let Some(user) = accounts::user_by_email(&state.db, &email).await? {
        if state.mail_enabled() {
            let ttl = state.config.accounts.reset_link_minutes * 60_000;
            let token = accounts::create_reset(&state.db, user.id, ttl).await?;
            let mail = crate::mail::reset_mail(&state.config, &email, &user.locale, &token);
            crate::db::outbox::enqueue_now(&state.db, &mail).await?;
        } else {
            tracing::warn!("password reset asked for, but no SMTP server is configured");
        }
    }
    Ok(accepted)
}

#[derive(Deserialize)]
struct ResetBody {
    token: String,
    password: String,
}

async fn reset_password(
    State(state): State<AppState>,
    JsonBody(b): JsonBody<ResetBody>,
) -> AppResult<StatusCode> {
    check_password(&state, &b.password)?;
    if b.token.len() > 128 {
        return Err(AppError::InvalidToken);
    }
    let hash = hash_password(b.password).await?;
    if accounts::reset_password(&state.db, &b.token, &hash).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::InvalidToken)
    }
}
