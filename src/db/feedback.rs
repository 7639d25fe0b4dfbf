//! Ratings of answers, and the export of consented ones for model improvement: only genuine
//! model answers, only while their author's consent stands, each with the question it answered.

use super::{now_ms, Db, DbResult};

/// Rates an answer of the user's own conversations (one rating per user and answer; a second
/// call replaces it). `consented` records whether consent was granted at this moment.
/// Returns false when the message is not the user's or not an answer.
pub async fn rate(
    db: &Db,
    user_id: i64,
    message_id: i64,
    rating: i64,
    comment: &str,
    consented: bool,
) -> DbResult<bool> {
    let mut tx = db.begin().await?;
    let owned: Option<i64> = sqlx::query_scalar(
        "SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id \
         WHERE m.id = $1 AND c.user_id = $2 AND m.role = 'assistant'",
    )
    .bind(message_id)
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?;
    if owned.is_none() {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO feedback (message_id, user_id, rating, comment, consented, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (message_id, user_id) DO UPDATE SET rating = excluded.rating, comment = excluded.comment, \
         consented = excluded.consented, created_at = excluded.created_at",
    )
    .bind(message_id)
    .bind(user_id)
    .bind(rating)
    .bind(comment)
    .bind(consented as i64)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// One exported rating.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportRecord {
    pub message_id: i64,
    /// Pseudonymous: the consent subject, never the e-mail.
    pub subject: String,
    pub prompt: String,
    pub answer: String,
    pub rating: i64,
    pub comment: String,
    pub rated_at: i64,
    pub consent_text_version: String,
}

/// Ratings that may be used for model improvement: of answers the model generated (not refusals
/// written by the rules, not assistant turns an API caller wrote), where consent was granted when
/// the rating was given, the latest consent record is still a grant, and the conversation is not
/// excluded.
pub async fn export_feedback(db: &Db) -> DbResult<Vec<ExportRecord>> {
    type Row = (
        i64,
        String,
        Option<String>,
        String,
        i64,
        String,
        i64,
        String,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT f.message_id, u.pseudonym, \
           (SELECT p.content FROM messages p WHERE p.id = m.parent_id AND p.role = 'user'), \
           m.content, f.rating, f.comment, f.created_at, cr.text_version \
         FROM feedback f \
         JOIN users u ON u.id = f.user_id \
         JOIN messages m ON m.id = f.message_id \
         JOIN conversations c ON c.id = m.conversation_id \
         JOIN consent_records cr ON cr.id = (SELECT MAX(id) FROM consent_records \
           WHERE subject = u.pseudonym AND purpose = 'model_improvement') \
         WHERE f.consented = 1 AND cr.granted = 1 AND c.exclude_from_training = 0 AND m.written_by = 'model' \
         ORDER BY f.id",
    )
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(message_id, subject, prompt, answer, rating, comment, rated_at, version)| {
                ExportRecord {
                    message_id,
                    subject,
                    prompt: prompt.unwrap_or_default(),
                    answer,
                    rating,
                    comment,
                    rated_at,
                    consent_text_version: version,
                }
            },
        )
        .collect())
}

/// Rating counts for the admin page: (thumbs up, thumbs down).
pub async fn rating_counts(db: &Db) -> DbResult<(i64, i64)> {
    let (up, down): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT CAST(SUM(CASE WHEN rating = 1 THEN 1 ELSE 0 END) AS BIGINT), \
         CAST(SUM(CASE WHEN rating = -1 THEN 1 ELSE 0 END) AS BIGINT) FROM feedback",
    )
    .fetch_one(&db.pool)
    .await?;
    Ok((up.unwrap_or(0), down.unwrap_or(0)))
}
