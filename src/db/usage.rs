//! Daily token usage, counted in the database so that every replica sees the same totals.

use super::{Db, DbResult};

/// Tokens `user_id` has used on `day`.
pub async fn user_tokens(db: &Db, user_id: i64, day: &str) -> DbResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT tokens FROM usage_daily WHERE user_id = $1 AND day = $2")
            .bind(user_id)
            .bind(day)
            .fetch_optional(&db.pool)
            .await?
            .unwrap_or(0),
    )
}

/// Tokens the whole service has used on `day`.
pub async fn service_tokens(db: &Db, day: &str) -> DbResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT tokens FROM service_usage_daily WHERE day = $1")
            .bind(day)
            .fetch_optional(&db.pool)
            .await?
            .unwrap_or(0),
    )
}

/// Adds `tokens` to the user's and the service's count for `day`, in one transaction.
pub async fn add(db: &Db, user_id: i64, day: &str, tokens: i64) -> DbResult<()> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO usage_daily (user_id, day, tokens) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id, day) DO UPDATE SET tokens = usage_daily.tokens + excluded.tokens",
    )
    .bind(user_id)
    .bind(day)
    .bind(tokens)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO service_usage_daily (day, tokens) VALUES ($1, $2) \
         ON CONFLICT (day) DO UPDATE SET tokens = service_usage_daily.tokens + excluded.tokens",
    )
    .bind(day)
    .bind(tokens)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
