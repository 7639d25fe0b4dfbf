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
    AppResult, AppState, ClientAddr, EmailBody, Field, JsonBody,
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
    ClientAddr(client): ClientAddr,
    jar: CookieJar,
    JsonBody(b): JsonBody<RegisterBody>,
) -> AppResult<impl IntoResponse> {
    let email = normalize_email(&b.email)?;
    check_password(&state, &b.password)?;
    let display_name = bounded_text(
        Field::DisplayName,
        b.display_name.as_deref().unwrap_or(""),
        64,
    )?;
    let display_name = if display_name.is_empty() {
        email.split('@').next().unwrap_or("").to_string()
    } else {
        display_name
    };
    let locale = super::normalize_locale(b.locale.as_deref());
    // A code that cannot be redeemed costs no password hash (a flood of made-up codes would).
    if !invites::is_redeemable(&state.db, &b.invite_code).await? {
        return Err(AppError::InvalidInvite);
    }
    let password_hash = hash_password(&state, client, b.password).await?;
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

/// Redeems the code and creates the account in one transaction; of many simultaneous
/// registrations with one code exactly one succeeds. An address that already has an account
/// still spends the code's use (`409 email_taken`): were the use given back, one code could test
/// address after address for an account.
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
        role,
        locale,
        invite_id: Some(invite_id),
    };
    let Some(user) = accounts::insert_user(&mut tx, &new).await? else {
        tx.commit().await.map_err(crate::db::DbError::from)?;
        return Err(AppError::EmailTaken);
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
    ClientAddr(client): ClientAddr,
    jar: CookieJar,
    JsonBody(b): JsonBody<LoginBody>,
) -> AppResult<impl IntoResponse> {
    let email = b.email.trim().to_lowercase();
    if b.password.len() > 4096 {
        return Err(AppError::InvalidCredentials);
    }
    let who = client.to_string();
    // Known and unknown addresses do the same work in the same order: one lookup, one hash
    // (against a random password's hash for no account); a failure is recorded after answering.
    let record = accounts::login_record(&state.db, &email, &who).await?;
    let hash = record.as_ref().map(|r| r.password_hash.clone());
    let ok = verify_password(&state, client, b.password, hash).await?;
    let Some(record) = record else {
        return Err(AppError::InvalidCredentials);
    };
    // This client is blocked for this account: answered exactly like a wrong password.
    if record.blocked_until > now_ms() {
        return Err(AppError::InvalidCredentials);
    }
    if !ok {
        let (db, cfg) = (state.db.clone(), state.config.clone());
        tokio::spawn(async move {
            let a = &cfg.accounts;
            let r = accounts::record_failed_login(
                &db,
                record.id,
                &who,
                a.free_login_failures,
                a.max_login_block_secs * 1000,
            );
            if let Err(e) = r.await {
                tracing::warn!("recording a failed sign-in failed: {e}");
            }
        });
        return Err(AppError::InvalidCredentials);
    }
    accounts::clear_failed_logins(&state.db, record.id, &who).await?;
    // A new session id at every sign-in; any session the browser had before is ended.
    if let Some(old) = jar.get(cookie_name(&state)) {
        accounts::delete_session(&state.db, old.value()).await?;
    }
    let token = accounts::create_session(&state.db, record.id, absolute_ms(&state)).await?;
    let user = accounts::user_by_id(&state.db, record.id)
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
        json!({"user": user_json(&user), "consent": c, "consent_text": text, "locale": user.locale,
               "model": state.answers.backend.model_id()}),
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

/// Answers before any work: the request is queued (`crate::recovery`), so known and unknown
/// addresses get the same answer in the same time.
async fn forgot_password(
    State(state): State<AppState>,
    JsonBody(b): JsonBody<EmailBody>,
) -> (StatusCode, Json<serde_json::Value>) {
    if let Ok(email) = normalize_email(&b.email) {
        state.resets.request(email);
    }
    // Whether mail goes out at all depends on the service, not on the address: saying so tells
    // nothing about accounts, and spares people waiting for a mail that cannot come.
    (
        StatusCode::ACCEPTED,
        Json(json!({"status": "accepted", "mail": state.mail_enabled()})),
    )
}

#[derive(Deserialize)]
struct ResetBody {
    token: String,
    password: String,
}

/// Sets the new password: every session ends and every API key is revoked (the reset page says
/// so, and keys are made anew in Settings).
async fn reset_password(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    JsonBody(b): JsonBody<ResetBody>,
) -> AppResult<StatusCode> {
    check_password(&state, &b.password)?;
    if b.token.len() > 128 {
        return Err(AppError::InvalidToken);
    }
    let hash = hash_password(&state, client, b.password).await?;
    let done = accounts::reset_password(&state.db, &b.token, &hash)
        .await?
        .ok_or(AppError::InvalidToken)?;
    tracing::info!(keys_revoked = done.keys_revoked, "password reset");
    Ok(StatusCode::NO_CONTENT)
}
