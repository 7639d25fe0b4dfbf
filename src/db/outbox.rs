//! The e-mail outbox: mails are queued in the same transaction as what caused them, and a
//! background sender delivers them with retries (see `mail.rs`).

use super::{now_ms, Db, DbResult};

/// A mail to queue.
#[derive(Debug, Clone)]
pub struct NewMail {
    pub kind: &'static str,
    pub to: String,
    pub subject: String,
    pub body: String,
}

/// A queued mail.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Mail {
    pub id: i64,
    pub kind: String,
    pub to_email: String,
    pub subject: String,
    pub body: String,
    pub attempts: i64,
}

pub async fn enqueue(conn: &mut sqlx::AnyConnection, m: &NewMail) -> DbResult<i64> {
    let now = now_ms();
    Ok(sqlx::query_scalar(
        "INSERT INTO outbox (kind, to_email, subject, body, next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, $5) RETURNING id",
    )
    .bind(m.kind)
    .bind(&m.to)
    .bind(&m.subject)
    .bind(&m.body)
    .bind(now)
    .fetch_one(conn)
    .await?)
}

pub async fn enqueue_now(db: &Db, m: &NewMail) -> DbResult<i64> {
    let mut conn = db.pool.acquire().await?;
    enqueue(&mut conn, m).await
}

/// Claims up to `limit` due mails: pushes their next attempt `lease_ms` ahead so another sender
/// (another replica) does not take them at the same time.
pub async fn claim_due(db: &Db, limit: i64, lease_ms: i64) -> DbResult<Vec<Mail>> {
    let now = now_ms();
    let mut tx = db.begin().await?;
    let lock = if db.backend == super::Backend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let sql = format!(
        "SELECT id, kind, to_email, subject, body, attempts FROM outbox \
         WHERE sent_at IS NULL AND failed_at IS NULL AND next_attempt_at <= $1 ORDER BY id LIMIT $2{lock}"
    );
    let mails: Vec<Mail> = sqlx::query_as(&sql)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
    for m in &mails {
        sqlx::query("UPDATE outbox SET next_attempt_at = $1 WHERE id = $2")
            .bind(now + lease_ms)
            .bind(m.id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(mails)
}

/// Marks a mail sent and drops its body (it may hold a code or a private link).
pub async fn mark_sent(db: &Db, id: i64) -> DbResult<()> {
    sqlx::query("UPDATE outbox SET sent_at = $1, body = '', attempts = attempts + 1 WHERE id = $2")
        .bind(now_ms())
        .bind(id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Records a failed attempt: retry after `retry_in_ms`, or give up after `max_attempts`.
pub async fn mark_failed(
    db: &Db,
    id: i64,
    error: &str,
    retry_in_ms: i64,
    max_attempts: i64,
) -> DbResult<()> {
    let now = now_ms();
    sqlx::query(
        "UPDATE outbox SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2, \
         failed_at = CASE WHEN attempts + 1 >= $3 THEN $4 ELSE NULL END WHERE id = $5",
    )
    .bind(error)
    .bind(now + retry_in_ms)
    .bind(max_attempts)
    .bind(now)
    .bind(id)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Mails not yet sent nor given up (for operators and tests).
pub async fn pending_count(db: &Db) -> DbResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL AND failed_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await?)
}
