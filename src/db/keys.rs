//! API keys: shown once, stored as SHA-256, revocable, with a last-used time.

use super::{now_ms, Db, DbResult};
use crate::secrets::sha256_hex;

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ApiKey {
    pub id: i64,
    pub name: String,
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// Creates a key for `user_id`; returns its row and the full key (never stored).
pub async fn create(db: &Db, user_id: i64, name: &str) -> DbResult<(ApiKey, String)> {
    let key = crate::secrets::api_key();
    let row = sqlx::query_as::<_, ApiKey>(
        "INSERT INTO api_keys (user_id, name, key_hash, prefix, created_at) VALUES ($1, $2, $3, $4, $5) \
         RETURNING id, name, prefix, created_at, last_used_at, revoked_at",
    )
    .bind(user_id)
    .bind(name)
    .bind(sha256_hex(&key))
    .bind(&key[..12])
    .bind(now_ms())
    .fetch_one(&db.pool)
    .await?;
    Ok((row, key))
}

pub async fn list(db: &Db, user_id: i64) -> DbResult<Vec<ApiKey>> {
    Ok(sqlx::query_as::<_, ApiKey>(
        "SELECT id, name, prefix, created_at, last_used_at, revoked_at FROM api_keys WHERE user_id = $1 ORDER BY id DESC",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await?)
}

/// Revokes the caller's own key; false when it is not theirs or already revoked.
pub async fn revoke(db: &Db, user_id: i64, id: i64) -> DbResult<bool> {
    let r = sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
    )
    .bind(now_ms())
    .bind(id)
    .bind(user_id)
    .execute(&db.pool)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// The owner of a live key, touching its last-used time.
pub async fn authenticate(db: &Db, key: &str) -> DbResult<Option<i64>> {
    let now = now_ms();
    Ok(sqlx::query_scalar(
        "UPDATE api_keys SET last_used_at = $1 WHERE key_hash = $2 AND revoked_at IS NULL RETURNING user_id",
    )
    .bind(now)
    .bind(sha256_hex(key))
    .fetch_optional(&db.pool)
    .await?)
}
