//! The admin API (admin role only): waitlist and admission, invite codes, users, rating counts.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::AdminUser;
use super::{bounded_text, AppError, AppResult, AppState, Field, JsonBody};
use crate::db::accounts::AccountRole;
use crate::db::invites::{self, InviteSpec};
use crate::db::waitlist::Pick;
use crate::db::{accounts, feedback, waitlist};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/admin/stats", get(stats))
        .route("/api/admin/waitlist", get(list_waitlist))
        .route("/api/admin/waitlist/admit", post(admit))
        .route("/api/admin/invites", get(list_invites).post(create_invites))
        .route("/api/admin/invites/{id}/revoke", post(revoke_invite))
        .route("/api/admin/users", get(list_users))
        .route("/api/admin/dashboard", get(dashboard))
        .route("/api/admin/waitlist/{id}/admit", post(admit_one))
        .route("/api/admin/waitlist/{id}", delete(remove_entry))
        .route("/api/admin/users/{id}/role", post(set_role))
        .route("/api/admin/users/{id}/reset-link", post(reset_link))
        .route("/api/admin/users/{id}", delete(delete_user))
}

#[derive(Deserialize)]
struct RangeQuery {
    range: Option<String>,
}

/// The dashboard's charts over the last `range` (`hour`, the default; `day`; `week`).
async fn dashboard(
    State(state): State<AppState>,
    _: AdminUser,
    axum::extract::Query(q): axum::extract::Query<RangeQuery>,
) -> AppResult<Json<Value>> {
    use crate::dashboard::Range;
    let range = match q.range.as_deref() {
        None | Some("hour") => Range::Hour,
        Some("day") => Range::Day,
        Some("week") => Range::Week,
        Some(_) => {
            return Err(AppError::invalid(
                Field::Request("range"),
                "range must be hour, day or week",
                "范围必须是 hour、day 或 week",
            ))
        }
    };
    let charts = crate::dashboard::charts(&state.db, range).await?;
    let auto = &state.config.waitlist.auto;
    let log: Vec<Value> = crate::autoadmit::log(&state.db, auto.every_secs, 10)
        .await?
        .into_iter()
        .map(|(at, admitted, reason)| json!({"at": at, "admitted": admitted, "reason": reason}))
        .collect();
    Ok(Json(json!({ "charts": charts,
                    "auto_admission": {"enabled": auto.enabled, "log": log} })))
}

/// Admits one entry; its code is in the answer when no e-mail is configured.
async fn admit_one(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<i64>,
) -> AppResult<Json<Value>> {
    let pick = Pick::Entry(id);
    let admitted = crate::admin::admit(&state.db, &state.config, pick, Some(admin.id)).await?;
    let Some(a) = admitted.first() else {
        // Unknown, unconfirmed or already invited.
        return Err(AppError::NotFound);
    };
    let link = format!("{}/register?code={}", state.config.public_url(), a.code);
    Ok(Json(match state.mail_enabled() {
        true => json!({"email": a.email, "emailed": true}),
        false => json!({"email": a.email, "emailed": false, "code": a.code, "link": link}),
    }))
}

async fn remove_entry(
    State(state): State<AppState>,
    _: AdminUser,
    Path(id): Path<i64>,
) -> AppResult<StatusCode> {
    match waitlist::remove(&state.db, id).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(AppError::NotFound),
    }
}

/// The user row an admin acts on; never the admin's own (no one locks themselves out).
async fn other_user(
    state: &AppState,
    admin: &accounts::User,
    id: i64,
) -> AppResult<accounts::User> {
    let user = accounts::user_by_id(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    if user.id == admin.id {
        return Err(AppError::invalid(
            Field::Request("id"),
            "use your own account page for your own account",
            "请在自己的账号页面管理自己的账号",
        ));
    }
    Ok(user)
}

#[derive(Deserialize)]
struct RoleBody {
    role: String,
}

async fn set_role(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<i64>,
    JsonBody(b): JsonBody<RoleBody>,
) -> AppResult<StatusCode> {
    let role: AccountRole = b.role.parse().map_err(|_| {
        AppError::invalid(
            Field::Request("role"),
            "role must be admin or user",
            "角色必须是 admin 或 user",
        )
    })?;
    let user = other_user(&state, &admin, id).await?;
    accounts::set_role(&state.db, &user.email, role).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A single-use reset link to hand to the user (valid `accounts.reset_link_minutes`).
async fn reset_link(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<i64>,
) -> AppResult<Json<Value>> {
    let user = other_user(&state, &admin, id).await?;
    let url = crate::admin::reset_link(&state.db, &state.config, user.id).await?;
    Ok(Json(json!({"email": user.email, "url": url})))
}

async fn delete_user(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<i64>,
) -> AppResult<StatusCode> {
    let user = other_user(&state, &admin, id).await?;
    accounts::delete_user(&state.db, &user.email).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stats(State(state): State<AppState>, _: AdminUser) -> AppResult<Json<Value>> {
    let (up, down) = feedback::rating_counts(&state.db).await?;
    Ok(Json(json!({
        "users": accounts::count_users(&state.db).await?,
        "waiting": waitlist::waiting_count(&state.db).await?,
        "ratings": {"up": up, "down": down},
        "admitted_answers": state.answers.admission.in_use(),
        "backend": state.answers.backend.load_detail(),
    })))
}

async fn list_waitlist(State(state): State<AppState>, _: AdminUser) -> AppResult<Json<Value>> {
    let entries = waitlist::list(&state.db).await?;
    let rows: Vec<Value> = entries
        .iter()
        .map(|e| json!({"id": e.id, "email": e.email, "locale": e.locale, "state": e.state(), "created_at": e.created_at}))
        .collect();
    Ok(Json(json!({"entries": rows})))
}

#[derive(Deserialize)]
struct AdmitBody {
    count: i64,
}

fn check_count(n: i64) -> AppResult<i64> {
    if (1..=1000).contains(&n) {
        Ok(n)
    } else {
        Err(AppError::invalid(
            Field::Count,
            "count must be between 1 and 1000",
            "数量必须在 1 到 1000 之间",
        ))
    }
}

/// Admits the oldest confirmed entries. Codes are in the answer only when no e-mail is configured
/// (then the operator hands them out); otherwise the invitations are in the outbox.
async fn admit(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    JsonBody(b): JsonBody<AdmitBody>,
) -> AppResult<Json<Value>> {
    let count = check_count(b.count)?;
    let admitted = crate::admin::admit(
        &state.db,
        &state.config,
        Pick::Oldest(count),
        Some(admin.id),
    )
    .await?;
    let show_codes = !state.mail_enabled();
    let rows: Vec<Value> = admitted
        .iter()
        .map(|a| {
            if show_codes {
                json!({"email": a.email, "code": a.code})
            } else {
                json!({"email": a.email})
            }
        })
        .collect();
    Ok(Json(
        json!({"admitted": rows, "emailed": state.mail_enabled()}),
    ))
}

async fn list_invites(State(state): State<AppState>, _: AdminUser) -> AppResult<Json<Value>> {
    let list = invites::list(&state.db).await?;
    let rows: Vec<Value> = list
        .iter()
        .map(|i| {
            let mut v = serde_json::to_value(i).unwrap_or_default();
            v["state"] = json!(i.state());
            v
        })
        .collect();
    Ok(Json(json!({"invites": rows})))
}

#[derive(Deserialize)]
struct CreateInvites {
    count: Option<i64>,
    uses: Option<i64>,
    expires_in_days: Option<i64>,
    note: Option<String>,
}

async fn create_invites(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    JsonBody(b): JsonBody<CreateInvites>,
) -> AppResult<impl IntoResponse> {
    let count = check_count(b.count.unwrap_or(1))?;
    let uses = b.uses.unwrap_or(state.config.invites.default_uses);
    if !(1..=100_000).contains(&uses) {
        return Err(AppError::invalid(
            Field::Uses,
            "uses must be between 1 and 100000",
            "使用次数必须在 1 到 100000 之间",
        ));
    }
    let expires = match b.expires_in_days {
        Some(d) if !(1..=3650).contains(&d) => {
            return Err(AppError::invalid(
                Field::ExpiresInDays,
                "expires_in_days must be between 1 and 3650",
                "有效天数必须在 1 到 3650 之间",
            ))
        }
        d => d.map(|d| d * 86_400_000),
    };
    let note = bounded_text(Field::Note, b.note.as_deref().unwrap_or(""), 200)?;
    let spec = InviteSpec {
        max_uses: uses,
        expires_in_ms: expires,
        note,
        role: crate::db::accounts::AccountRole::User,
        created_by: Some(admin.id),
    };
    let codes = invites::mint_many(&state.db, count as usize, &spec).await?;
    Ok((StatusCode::CREATED, Json(json!({"codes": codes}))))
}

async fn revoke_invite(
    State(state): State<AppState>,
    _: AdminUser,
    Path(id): Path<i64>,
) -> AppResult<StatusCode> {
    if invites::revoke_by_id(&state.db, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFound)
    }
}

async fn list_users(State(state): State<AppState>, _: AdminUser) -> AppResult<Json<Value>> {
    Ok(Json(
        json!({"users": accounts::list_users(&state.db).await?}),
    ))
}
