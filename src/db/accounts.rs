//! Users, sessions, password resets and per-account login throttling.

use super::{now_ms, Db, DbError, DbResult, UnknownValue};
use crate::secrets::sha256_hex;

/// A user as the rest of the program sees it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub display_name: String,
    #[sqlx(try_from = "String")]
    pub role: AccountRole,
    #[serde(skip)]
    pub pseudonym: String,
    pub locale: String,
    pub created_at: i64,
}

impl User {
    pub fn is_admin(&self) -> bool {
        self.role == AccountRole::Admin
    }
}

/// What an account may do (the `role` column of users and invite codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountRole {
    User,
    Admin,
}

impl AccountRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountRole::User => "user",
            AccountRole::Admin => "admin",
        }
    }
}

impl std::fmt::Display for AccountRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AccountRole {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, UnknownValue> {
        match s {
            "user" => Ok(AccountRole::User),
            "admin" => Ok(AccountRole::Admin),
            other => Err(UnknownValue(other.to_string())),
        }
    }
}

impl TryFrom<String> for AccountRole {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, UnknownValue> {
        s.parse()
    }
}

const USER_COLS: &str = "id, email, display_name, role, pseudonym, locale, created_at";

/// What a new account is made of.
pub struct NewUser<'a> {
    pub email: &'a str,
    pub password_hash: &'a str,
    pub display_name: &'a str,
    pub role: AccountRole,
    pub locale: &'a str,
    pub invite_id: Option<i64>,
}

/// Inserts a user inside `tx`; `None` when the e-mail is taken (the transaction stays usable).
pub async fn insert_user(tx: &mut sqlx::AnyConnection, u: &NewUser<'_>) -> DbResult<Option<User>> {
    let row = sqlx::query_as::<_, User>(
        "INSERT INTO users (email, password_hash, display_name, role, pseudonym, locale, invite_id, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (email) DO NOTHING \
         RETURNING id, email, display_name, role, pseudonym, locale, created_at",
    )
    .bind(u.email)
    .bind(u.password_hash)
    .bind(u.display_name)
    .bind(u.role.as_str())
    .bind(crate::secrets::token())
    .bind(u.locale)
    .bind(u.invite_id)
    .bind(now_ms())
    .fetch_optional(tx)
    .await?;
    Ok(row)
}

pub async fn user_by_email(db: &Db, email: &str) -> DbResult<Option<User>> {
    let sql = format!("SELECT {USER_COLS} FROM users WHERE email = $1");
    Ok(sqlx::query_as::<_, User>(&sql)
        .bind(email)
        .fetch_optional(&db.pool)
        .await?)
}

pub async fn list_users(db: &Db) -> DbResult<Vec<User>> {
    let sql = format!("SELECT {USER_COLS} FROM users ORDER BY id");
    Ok(sqlx::query_as::<_, User>(&sql).fetch_all(&db.pool).await?)
}

pub async fn count_users(db: &Db) -> DbResult<i64> {
    Ok(sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM users")
        .fetch_one(&db.pool)
        .await?)
}

/// Sets a user's role; false when no such user.
pub async fn set_role(db: &Db, email: &str, role: AccountRole) -> DbResult<bool> {
    let r = sqlx::query("UPDATE users SET role = $1 WHERE email = $2")
        .bind(role.as_str())
        .bind(email)
        .execute(&db.pool)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// Credentials and throttle state for a sign-in attempt from one client.
#[derive(Debug, sqlx::FromRow)]
pub struct LoginRecord {
    pub id: i64,
    pub password_hash: String,
    /// Until when this client may not sign in to this account (0: it may).
    pub blocked_until: i64,
}

/// The account behind `email` and the throttle state of `client` for it: one statement, whether
/// or not the account exists.
pub async fn login_record(db: &Db, email: &str, client: &str) -> DbResult<Option<LoginRecord>> {
    Ok(sqlx::query_as::<_, LoginRecord>(
        "SELECT u.id, u.password_hash, COALESCE(f.blocked_until, 0) AS blocked_until FROM users u \
         LEFT JOIN login_failures f ON f.user_id = u.id AND f.client = $2 WHERE u.email = $1",
    )
    .bind(email)
    .bind(client)
    .fetch_optional(&db.pool)
    .await?)
}

/// Counts a failed sign-in of `client` on the account; after `free` failures each further one
/// blocks that client (only) for a doubling delay, capped at `max_block_ms`. Someone guessing
/// from one address slows themselves down; the owner, elsewhere, is never locked out by it.
pub async fn record_failed_login(
    db: &Db,
    user_id: i64,
    client: &str,
    free: i64,
    max_block_ms: i64,
) -> DbResult<()> {
    let now = now_ms();
    // One transaction: the count and the block it earns are seen together.
    let mut tx = db.begin().await?;
    let failures: i64 = sqlx::query_scalar(
        "INSERT INTO login_failures (user_id, client, failures, blocked_until, updated_at) VALUES ($1, $2, 1, 0, $3) \
         ON CONFLICT (user_id, client) DO UPDATE SET failures = login_failures.failures + 1, updated_at = $3 \
         RETURNING failures",
    )
    .bind(user_id)
    .bind(client)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    if failures > free {
        let exp = (failures - free - 1).min(20) as u32;
        let block = (1000i64 << exp).min(max_block_ms);
        sqlx::query(
            "UPDATE login_failures SET blocked_until = $1 WHERE user_id = $2 AND client = $3",
        )
        .bind(now + block)
        .bind(user_id)
        .bind(client)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Forgets `client`'s failures on the account (after a successful sign-in from it).
pub async fn clear_failed_logins(db: &Db, user_id: i64, client: &str) -> DbResult<()> {
    sqlx::query("DELETE FROM login_failures WHERE user_id = $1 AND client = $2")
        .bind(user_id)
        .bind(client)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Removes throttle rows untouched since `before` (run periodically).
pub async fn purge_login_failures(db: &Db, before: i64) -> DbResult<u64> {
    let r = sqlx::query("DELETE FROM login_failures WHERE updated_at < $1 AND blocked_until < $1")
        .bind(before)
        .execute(&db.pool)
        .await?;
    Ok(r.rows_affected())
}

/// Creates a session and returns the cookie value (only its hash is stored).
pub async fn create_session(db: &Db, user_id: i64, absolute_ms: i64) -> DbResult<String> {
    let token = crate::secrets::token();
    let now = now_ms();
    sqlx::query("INSERT INTO sessions (id_hash, user_id, created_at, last_seen_at, expires_at) VALUES ($1, $2, $3, $3, $4)")
        .bind(sha256_hex(&token))
        .bind(user_id)
        .bind(now)
        .bind(now + absolute_ms)
        .execute(&db.pool)
        .await?;
    Ok(token)
}

/// The user of a live session, refreshing its idle timer; expired sessions are deleted.
pub async fn session_user(db: &Db, token: &str, idle_ms: i64) -> DbResult<Option<User>> {
    let now = now_ms();
    let hash = sha256_hex(token);
    let sql = format!(
        "SELECT {} FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE s.id_hash = $1 AND s.expires_at > $2 AND s.last_seen_at > $3",
        super::prefixed(USER_COLS, "u")
    );
    let user = sqlx::query_as::<_, User>(&sql)
        .bind(&hash)
        .bind(now)
        .bind(now - idle_ms)
        .fetch_optional(&db.pool)
        .await?;
    match &user {
        // Touch at most once a minute: a page load should not be a write every time.
        Some(_) => {
            sqlx::query(
                "UPDATE sessions SET last_seen_at = $1 WHERE id_hash = $2 AND last_seen_at < $3",
            )
            .bind(now)
            .bind(&hash)
            .bind(now - 60_000)
            .execute(&db.pool)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
                .bind(&hash)
                .execute(&db.pool)
                .await?;
        }
    }
    Ok(user)
}

pub async fn delete_session(db: &Db, token: &str) -> DbResult<()> {
    sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
        .bind(sha256_hex(token))
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Removes sessions past their expiry (run periodically).
pub async fn purge_sessions(db: &Db, idle_ms: i64) -> DbResult<u64> {
    let now = now_ms();
    let r = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1 OR last_seen_at <= $2")
        .bind(now)
        .bind(now - idle_ms)
        .execute(&db.pool)
        .await?;
    Ok(r.rows_affected())
}

/// Reset links made for `user_id` since `since` (the per-account mail throttle).
pub async fn resets_since(db: &Db, user_id: i64, since: i64) -> DbResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM password_resets WHERE user_id = $1 AND created_at >= $2",
    )
    .bind(user_id)
    .bind(since)
    .fetch_one(&db.pool)
    .await?)
}

/// Stores a new password-reset token for `user_id` and ends the earlier unused ones (only the
/// newest link works), inside `tx`; returns the token for the e-mail.
pub async fn create_reset(
    tx: &mut sqlx::AnyConnection,
    user_id: i64,
    ttl_ms: i64,
) -> DbResult<String> {
    let token = crate::secrets::token();
    let now = now_ms();
    sqlx::query("UPDATE password_resets SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL")
        .bind(now)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO password_resets (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
        .bind(sha256_hex(&token))
        .bind(user_id)
        .bind(now)
        .bind(now + ttl_ms)
        .execute(&mut *tx)
        .await?;
    Ok(token)
}

/// What a used reset token did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetDone {
    /// API keys that were live and are now revoked.
    pub keys_revoked: u64,
}

/// Uses a reset token (once, before expiry), in one transaction: sets the password, ends every
/// session, revokes every API key (a reset means the password may have been known to someone
/// else, who may also have made keys) and forgets sign-in failures. `None` when the token is
/// unknown, used or expired.
pub async fn reset_password(
    db: &Db,
    token: &str,
    password_hash: &str,
) -> DbResult<Option<ResetDone>> {
    let mut tx = db.begin().await?;
    let now = now_ms();
    let user_id: Option<i64> = sqlx::query_scalar(
        "UPDATE password_resets SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 \
         RETURNING user_id",
    )
    .bind(now)
    .bind(sha256_hex(token))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(user_id) = user_id else {
        return Ok(None);
    };
    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
        .bind(password_hash)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    for stmt in [
        "DELETE FROM sessions WHERE user_id = $1",
        "DELETE FROM login_failures WHERE user_id = $1",
    ] {
        sqlx::query(stmt).bind(user_id).execute(&mut *tx).await?;
    }
    let keys = sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE password_resets SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL")
        .bind(now)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(ResetDone {
        keys_revoked: keys.rows_affected(),
    }))
}

/// Deletes an account and everything it owns (cascades), and its waitlist entry. Consent records
/// stay: they name only the pseudonym, which nothing links to a person once the user row is gone.
pub async fn delete_user(db: &Db, email: &str) -> DbResult<bool> {
    let mut tx = db.begin().await?;
    let r = sqlx::query("DELETE FROM users WHERE email = $1")
        .bind(email)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM waitlist WHERE email = $1")
        .bind(email)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(r.rows_affected() > 0)
}

impl DbError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, DbError::Conflict)
    }
}

pub async fn user_by_id(db: &Db, id: i64) -> DbResult<Option<User>> {
    let sql = format!("SELECT {USER_COLS} FROM users WHERE id = $1");
    Ok(sqlx::query_as::<_, User>(&sql)
        .bind(id)
        .fetch_optional(&db.pool)
        .await?)
}
