//! Keeping an answer: stored in its conversation, with retries while the database is briefly
//! away, so an answer is never silently dropped.

use std::time::Duration;

use crate::db::chats::{self, NewMessage};
use crate::db::Db;

/// Where an answer ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Storage {
    /// Stored as this message.
    Kept(i64),
    /// Not to be stored (an API call without `store`).
    NotKept,
    /// Its conversation was deleted while the answer was made: nothing to store it in.
    Gone,
    /// The database refused or stayed away through every retry.
    Failed,
}

/// Stores an answer, retrying for a while if the database is briefly away: an answer is never
/// silently dropped.
pub(super) async fn store_with_retry(
    db: &Db,
    user_id: i64,
    conversation_id: i64,
    m: &NewMessage<'_>,
) -> Storage {
    for attempt in 0..10u32 {
        match chats::add_message(db, user_id, conversation_id, m).await {
            Ok(Some(msg)) => return Storage::Kept(msg.id),
            Ok(None) => return Storage::Gone,
            Err(e @ (crate::db::DbError::Other(_) | crate::db::DbError::Conflict)) => {
                // Not the database being away: trying again would fail the same way.
                tracing::error!("storing an answer failed: {e}");
                return Storage::Failed;
            }
            Err(e) => {
                tracing::warn!(attempt, "storing an answer failed: {e}");
                tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt.min(5)))).await;
            }
        }
    }
    tracing::error!("an answer could not be stored after retries");
    Storage::Failed
}
