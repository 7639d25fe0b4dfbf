//! The dashboard's per-minute rollups (migration 0007): each process adds what it counted to
//! its own rows; reading adds the replicas up.

use super::{Backend, Db, DbResult};

/// One value to write: metric name, value, and whether the minute keeps its highest value
/// (a peak) instead of the sum.
pub struct Write<'a> {
    pub metric: &'a str,
    pub value: f64,
    pub peak: bool,
}

/// Adds `values` to `replica`'s row of `minute` (Unix minutes).
pub async fn add(db: &Db, minute: i64, replica: &str, values: &[Write<'_>]) -> DbResult<()> {
    let highest = match db.backend {
        Backend::Sqlite => "MAX(rollups.value, excluded.value)",
        Backend::Postgres => "GREATEST(rollups.value, excluded.value)",
    };
    let mut tx = db.begin().await?;
    for w in values {
        let merge = match w.peak {
            true => highest,
            false => "rollups.value + excluded.value",
        };
        let sql = format!(
            "INSERT INTO rollups (minute, replica, metric, value) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (minute, replica, metric) DO UPDATE SET value = {merge}"
        );
        sqlx::query(&sql)
            .bind(minute)
            .bind(replica)
            .bind(w.metric)
            .bind(w.value)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Every metric of every minute since `since` (a Unix minute), added up over replicas:
/// (minute, metric, value).
pub async fn series(db: &Db, since: i64) -> DbResult<Vec<(i64, String, f64)>> {
    Ok(sqlx::query_as(
        "SELECT minute, metric, SUM(value) FROM rollups WHERE minute >= $1 \
         GROUP BY minute, metric ORDER BY minute",
    )
    .bind(since)
    .fetch_all(&db.pool)
    .await?)
}

/// What the tables themselves tell per bucket since `since_ms`: waitlist joins, admissions,
/// ratings, and the people who asked something.
pub async fn activity(db: &Db, since_ms: i64, bucket_ms: i64) -> DbResult<Vec<(i64, String, i64)>> {
    let sql = format!(
        "SELECT (created_at / {bucket_ms}) * {bucket_ms} AS t, 'joined', COUNT(*) FROM waitlist WHERE created_at >= $1 GROUP BY t \
         UNION ALL SELECT (invited_at / {bucket_ms}) * {bucket_ms} AS t, 'admitted', COUNT(*) FROM waitlist WHERE invited_at >= $1 GROUP BY t \
         UNION ALL SELECT (created_at / {bucket_ms}) * {bucket_ms} AS t, 'ratings', COUNT(*) FROM feedback WHERE created_at >= $1 GROUP BY t \
         UNION ALL SELECT (m.created_at / {bucket_ms}) * {bucket_ms} AS t, 'active_users', COUNT(DISTINCT c.user_id) \
           FROM messages m JOIN conversations c ON c.id = m.conversation_id \
           WHERE m.created_at >= $1 AND m.role = 'user' GROUP BY t"
    );
    Ok(sqlx::query_as(&sql)
        .bind(since_ms)
        .fetch_all(&db.pool)
        .await?)
}

/// Forgets minutes before `before`.
pub async fn prune(db: &Db, before: i64) -> DbResult<u64> {
    let r = sqlx::query("DELETE FROM rollups WHERE minute < $1")
        .bind(before)
        .execute(&db.pool)
        .await?;
    Ok(r.rows_affected())
}
