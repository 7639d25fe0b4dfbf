//! Password-reset requests, handled after the answer has gone out. `POST /api/password/forgot`
//! only hands the address to this queue and answers `202`, so the answer takes the same time
//! whether or not an account exists (looking the account up, making a link and queueing a mail
//! took ~6 ms more for a known address, which told who has an account). A few links per account
//! per hour at most; a new link ends the earlier ones.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::db::{accounts, now_ms, Db, DbResult};

/// Requests waiting for the worker, at most; past it they are dropped (and logged), since the
/// answer has already been given. Each client address is also held to the `auth` token bucket.
const QUEUE: usize = 256;

/// The reset queue (cheap to clone).
#[derive(Clone)]
pub struct ResetMailer {
    tx: mpsc::Sender<String>,
}

/// What became of one request (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// A link was made and its mail queued.
    Sent,
    NoAccount,
    /// The account had its mails for this hour.
    Throttled,
    /// No SMTP server is configured: no link can reach the owner.
    NoMail,
}

impl ResetMailer {
    /// Starts the worker on the current runtime.
    pub fn start(db: Db, config: Arc<Config>) -> Self {
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        tokio::spawn(async move {
            while let Some(email) = rx.recv().await {
                match handle(&db, &config, &email).await {
                    Ok(outcome) => tracing::debug!(?outcome, "password reset request"),
                    Err(e) => tracing::warn!("a password reset request failed: {e}"),
                }
            }
        });
        Self { tx }
    }

    /// Queues a request for the (normalised) address; never waits.
    pub fn request(&self, email: String) {
        if self.tx.try_send(email).is_err() {
            metrics::counter!("moss_shed_total", "reason" => "reset_queue").increment(1);
            tracing::warn!("password reset queue full: a request was dropped");
        }
    }
}

/// Makes a link for the account of `email` and queues its mail, unless there is no account, no
/// mail server, or the account had `reset_mails_per_hour` links in the last hour.
pub async fn handle(db: &Db, config: &Config, email: &str) -> DbResult<Handled> {
    let Some(user) = accounts::user_by_email(db, email).await? else {
        return Ok(Handled::NoAccount);
    };
    if !config.smtp.enabled() {
        tracing::warn!("password reset asked for, but no SMTP server is configured");
        return Ok(Handled::NoMail);
    }
    let a = &config.accounts;
    if accounts::resets_since(db, user.id, now_ms() - 3_600_000).await? >= a.reset_mails_per_hour {
        return Ok(Handled::Throttled);
    }
    // The link and its mail in one transaction: never one without the other.
    let mut tx = db.begin().await?;
    let token = accounts::create_reset(&mut tx, user.id, a.reset_link_minutes * 60_000).await?;
    let mail = crate::mail::reset_mail(config, email, &user.locale, &token);
    crate::db::outbox::enqueue(&mut tx, &mail).await?;
    tx.commit().await?;
    Ok(Handled::Sent)
}
