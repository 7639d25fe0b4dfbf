//! What a user changes about their own account, and what they can take with them.

use super::{Db, DbResult};
use crate::secrets::sha256_hex;

/// Sets a new password chosen while signed in: every other session of the account ends (this
/// one, `keep_session`, stays), sign-in failures are forgotten. API keys stay: the owner chose
/// this change, unlike a reset.
pub async fn change_password(
    db: &Db,
    user_id: i64,
    password_hash: &str,
    keep_session: &str,
) -> DbResult<()> {
    let mut tx = db.begin().await?;
    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
        .bind(password_hash)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM sessions WHERE user_id = $1 AND id_hash <> $2")
        .bind(user_id)
        .bind(sha256_hex(keep_session))
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM login_failures WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn set_display_name(db: &Db, user_id: i64, name: &str) -> DbResult<()> {
    sqlx::query("UPDATE users SET display_name = $1 WHERE id = $2")
        .bind(name)
        .bind(user_id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// One of the user's ratings, for their download.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct OwnRating {
    pub message_id: i64,
    pub rating: i64,
    pub comment: String,
    pub created_at: i64,
}

pub async fn ratings(db: &Db, user_id: i64) -> DbResult<Vec<OwnRating>> {
    Ok(sqlx::query_as::<_, OwnRating>(
        "SELECT message_id, rating, comment, created_at FROM feedback WHERE user_id = $1 ORDER BY id",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await?)
}

/// Every conversation of the user (kept API exchanges included), oldest first.
pub async fn conversation_ids(db: &Db, user_id: i64) -> DbResult<Vec<i64>> {
    Ok(
        sqlx::query_scalar("SELECT id FROM conversations WHERE user_id = $1 ORDER BY id")
            .bind(user_id)
            .fetch_all(&db.pool)
            .await?,
    )
}

/// A single-use link (token) an operator hands to a user who cannot get mail; the user's
/// earlier unused links end. Valid for `ttl_ms`.
pub async fn operator_reset(db: &Db, user_id: i64, ttl_ms: i64) -> DbResult<String> {
    let mut tx = db.begin().await?;
    let token = super::accounts::create_reset(&mut tx, user_id, ttl_ms).await?;
    tx.commit().await?;
    Ok(token)
}
