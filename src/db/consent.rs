//! Consent: an append-only log of grants and withdrawals per pseudonymous subject and purpose.
//! The current state is the latest record; nothing is ever updated or deleted (triggers refuse it).

use super::{now_ms, Db, DbResult};

/// The purpose this service asks consent for.
pub const MODEL_IMPROVEMENT: &str = "model_improvement";

/// One record of the log.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ConsentRecord {
    pub id: i64,
    pub purpose: String,
    pub granted: i64,
    pub text_version: String,
    pub method: String,
    pub created_at: i64,
}

/// Appends a record.
pub async fn record(
    db: &Db,
    subject: &str,
    purpose: &str,
    granted: bool,
    text_version: &str,
    method: &str,
) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO consent_records (subject, purpose, granted, text_version, method, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(subject)
    .bind(purpose)
    .bind(granted as i64)
    .bind(text_version)
    .bind(method)
    .bind(now_ms())
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// The latest record for `subject` and `purpose` (None: never asked, which means not granted).
pub async fn current(db: &Db, subject: &str, purpose: &str) -> DbResult<Option<ConsentRecord>> {
    Ok(sqlx::query_as::<_, ConsentRecord>(
        "SELECT id, purpose, granted, text_version, method, created_at FROM consent_records \
         WHERE subject = $1 AND purpose = $2 ORDER BY id DESC LIMIT 1",
    )
    .bind(subject)
    .bind(purpose)
    .fetch_optional(&db.pool)
    .await?)
}

pub async fn is_granted(db: &Db, subject: &str) -> DbResult<bool> {
    Ok(current(db, subject, MODEL_IMPROVEMENT)
        .await?
        .is_some_and(|r| r.granted == 1))
}

/// Every record of a subject, oldest first.
pub async fn history(db: &Db, subject: &str) -> DbResult<Vec<ConsentRecord>> {
    Ok(sqlx::query_as::<_, ConsentRecord>(
        "SELECT id, purpose, granted, text_version, method, created_at FROM consent_records WHERE subject = $1 ORDER BY id",
    )
    .bind(subject)
    .fetch_all(&db.pool)
    .await?)
}
