//! Operator actions shared by `moss admin …` and the admin API.

use crate::config::Config;
use crate::db::invites::InviteSpec;
use crate::db::waitlist::{self, Admitted, Pick};
use crate::db::{Db, DbResult};

/// Admits confirmed waitlist entries (the oldest N, or one): one single-use code each, and (when
/// e-mail is configured) the invitation queued in the same transaction.
pub async fn admit(
    db: &Db,
    config: &Config,
    pick: Pick,
    admin: Option<i64>,
) -> DbResult<Vec<Admitted>> {
    let days = config.invites.waitlist_code_days;
    let spec = InviteSpec {
        max_uses: 1,
        expires_in_ms: (days > 0).then_some(days * 86_400_000),
        note: "waitlist".into(),
        role: crate::db::accounts::AccountRole::User,
        created_by: admin,
    };
    let mail = config.smtp.enabled();
    waitlist::admit(db, pick, &spec, |email, locale, code| {
        mail.then(|| crate::mail::invite_mail(config, email, locale, code))
    })
    .await
}

/// A single-use password-reset link for `user_id`, for an operator to hand over (when the user
/// cannot get mail); the user's earlier links end.
pub async fn reset_link(db: &Db, config: &Config, user_id: i64) -> DbResult<String> {
    let ttl = config.accounts.reset_link_minutes * 60_000;
    let token = crate::db::profile::operator_reset(db, user_id, ttl).await?;
    Ok(format!("{}/reset?token={token}", config.public_url()))
}
