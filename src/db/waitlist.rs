//! The waitlist: one row per address (stored exactly once), double opt-in, position in line,
//! and admission in batches that mints a code and queues the invitation in one transaction.

use super::outbox::{enqueue, NewMail};
use super::{now_ms, Backend, Db, DbResult};
use crate::db::invites::{mint, InviteSpec};
use crate::secrets::sha256_hex;

/// What the status page shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    pub state: WaitState,
    /// 1-based place among confirmed entries still waiting (null unless waiting).
    pub position: Option<i64>,
    pub ahead: Option<i64>,
    pub joined_at: i64,
}

/// A waitlist row for the admin list.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Entry {
    pub id: i64,
    pub email: String,
    pub locale: String,
    pub confirmed_at: Option<i64>,
    pub invited_at: Option<i64>,
    pub registered_at: Option<i64>,
    pub created_at: i64,
}

/// Where a waitlist entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaitState {
    /// The confirmation link has not been followed yet.
    Unconfirmed,
    /// Confirmed, in line.
    Waiting,
    /// A code was sent.
    Invited,
    /// The code was used.
    Registered,
}

impl WaitState {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitState::Unconfirmed => "unconfirmed",
            WaitState::Waiting => "waiting",
            WaitState::Invited => "invited",
            WaitState::Registered => "registered",
        }
    }
}

impl std::fmt::Display for WaitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Entry {
    pub fn state(&self) -> WaitState {
        if self.registered_at.is_some() {
            WaitState::Registered
        } else if self.invited_at.is_some() {
            WaitState::Invited
        } else if self.confirmed_at.is_some() {
            WaitState::Waiting
        } else {
            WaitState::Unconfirmed
        }
    }
}

/// What a signup did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// A new entry, with its private status token.
    New(String),
    /// An unconfirmed entry whose confirmation mail is due again, with its new token.
    Resent(String),
    /// The address was on the list already (nothing changes).
    Known,
}

/// Adds `email` once. With `confirmed` (no e-mail configured) the entry waits at once;
/// otherwise its token goes out in a confirmation mail (again for an unconfirmed entry whose
/// last mail is older than `resend_after_ms`).
pub async fn signup(
    db: &Db,
    email: &str,
    locale: &str,
    confirmed: bool,
    resend_after_ms: i64,
) -> DbResult<Joined> {
    let token = crate::secrets::token();
    let now = now_ms();
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO waitlist (email, locale, token_hash, confirmed_at, confirm_sent_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (email) DO NOTHING RETURNING id",
    )
    .bind(email)
    .bind(locale)
    .bind(sha256_hex(&token))
    .bind(confirmed.then_some(now))
    .bind(now)
    .fetch_optional(&db.pool)
    .await?;
    if inserted.is_some() {
        return Ok(Joined::New(token));
    }
    if confirmed {
        return Ok(Joined::Known);
    }
    // Already there: a new link only for an unconfirmed entry, and not more than once per period.
    let resent = sqlx::query(
        "UPDATE waitlist SET token_hash = $1, confirm_sent_at = $2 \
         WHERE email = $3 AND confirmed_at IS NULL AND confirm_sent_at < $4",
    )
    .bind(sha256_hex(&token))
    .bind(now)
    .bind(email)
    .bind(now - resend_after_ms)
    .execute(&db.pool)
    .await?;
    Ok(match resent.rows_affected() {
        0 => Joined::Known,
        _ => Joined::Resent(token),
    })
}

/// What a confirmation link did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// The entry now waits in line.
    Confirmed,
    /// It was confirmed before: nothing changes (the link confirms once).
    Already,
    /// The link was sent longer ago than it stays valid; signing up again sends a new one.
    Expired,
    Unknown,
}

/// Confirms the address behind `token` if its link was sent within `valid_ms`.
pub async fn confirm(db: &Db, token: &str, valid_ms: i64) -> DbResult<Confirmation> {
    let hash = sha256_hex(token);
    let now = now_ms();
    let done = sqlx::query(
        "UPDATE waitlist SET confirmed_at = $1 WHERE token_hash = $2 AND confirmed_at IS NULL AND confirm_sent_at >= $3",
    )
    .bind(now)
    .bind(&hash)
    .bind(now - valid_ms)
    .execute(&db.pool)
    .await?;
    if done.rows_affected() > 0 {
        return Ok(Confirmation::Confirmed);
    }
    let row: Option<Option<i64>> =
        sqlx::query_scalar("SELECT confirmed_at FROM waitlist WHERE token_hash = $1")
            .bind(&hash)
            .fetch_optional(&db.pool)
            .await?;
    Ok(match row {
        None => Confirmation::Unknown,
        Some(Some(_)) => Confirmation::Already,
        Some(None) => Confirmation::Expired,
    })
}

/// The status behind `token`, or None when the token is unknown.
pub async fn status(db: &Db, token: &str) -> DbResult<Option<Status>> {
    let entry = sqlx::query_as::<_, Entry>(
        "SELECT id, email, locale, confirmed_at, invited_at, registered_at, created_at FROM waitlist WHERE token_hash = $1",
    )
    .bind(sha256_hex(token))
    .fetch_optional(&db.pool)
    .await?;
    let Some(entry) = entry else { return Ok(None) };
    let state = entry.state();
    let ahead = if state == WaitState::Waiting {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM waitlist WHERE confirmed_at IS NOT NULL AND invited_at IS NULL AND id < $1",
        )
        .bind(entry.id)
        .fetch_one(&db.pool)
        .await?;
        Some(n)
    } else {
        None
    };
    Ok(Some(Status {
        state,
        position: ahead.map(|a| a + 1),
        ahead,
        joined_at: entry.created_at,
    }))
}

pub async fn list(db: &Db) -> DbResult<Vec<Entry>> {
    Ok(sqlx::query_as::<_, Entry>(
        "SELECT id, email, locale, confirmed_at, invited_at, registered_at, created_at FROM waitlist ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await?)
}

/// Counts of entries by state (for the admin page).
pub async fn waiting_count(db: &Db) -> DbResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM waitlist WHERE confirmed_at IS NOT NULL AND invited_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await?)
}

/// One admitted entry.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub email: String,
    pub locale: String,
    pub code: String,
}

/// Which entries to admit.
#[derive(Debug, Clone, Copy)]
pub enum Pick {
    /// The oldest confirmed ones, this many.
    Oldest(i64),
    /// This one, if it is confirmed and not invited yet.
    Entry(i64),
}

/// Admits confirmed entries (`pick`): for each, mints a single-use code, marks the entry invited
/// and queues the invitation made by `mail` — all in one transaction, so a code is never minted
/// without its e-mail or the other way round. Safe with several replicas (rows are locked).
pub async fn admit(
    db: &Db,
    pick: Pick,
    spec: &InviteSpec,
    mail: impl Fn(&str, &str, &str) -> Option<NewMail>,
) -> DbResult<Vec<Admitted>> {
    let mut tx = db.begin().await?;
    let lock = if db.backend == Backend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let (which, n) = match pick {
        Pick::Oldest(count) => ("ORDER BY id LIMIT $1", count),
        Pick::Entry(id) => ("AND id = $1", id),
    };
    let sql = format!(
        "SELECT id, email, locale FROM waitlist WHERE confirmed_at IS NOT NULL AND invited_at IS NULL {which}{lock}"
    );
    let rows: Vec<(i64, String, String)> = sqlx::query_as(&sql).bind(n).fetch_all(&mut *tx).await?;
    let mut admitted = Vec::with_capacity(rows.len());
    for (id, email, locale) in rows {
        let (invite_id, code) = mint(&mut tx, spec).await?;
        sqlx::query("UPDATE waitlist SET invited_at = $1, invite_id = $2 WHERE id = $3")
            .bind(now_ms())
            .bind(invite_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if let Some(m) = mail(&email, &locale, &code) {
            enqueue(&mut tx, &m).await?;
        }
        admitted.push(Admitted {
            email,
            locale,
            code,
        });
    }
    tx.commit().await?;
    Ok(admitted)
}

/// Removes an entry (its address can sign up again).
pub async fn remove(db: &Db, id: i64) -> DbResult<bool> {
    let r = sqlx::query("DELETE FROM waitlist WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// Marks the entry of `email` registered (inside the registration transaction).
pub async fn mark_registered(conn: &mut sqlx::AnyConnection, email: &str) -> DbResult<()> {
    sqlx::query(
        "UPDATE waitlist SET registered_at = $1 WHERE email = $2 AND registered_at IS NULL",
    )
    .bind(now_ms())
    .bind(email)
    .execute(conn)
    .await?;
    Ok(())
}
