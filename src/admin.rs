//! Operator actions shared by `moss admin …` and the admin API.

use crate::config::Config;
use crate::db::invites::InviteSpec;
use crate::db::waitlist::{self, Admitted};
use crate::db::{Db, DbResult};

/// Admits the `count` oldest confirmed waitlist entries: one single-use code each, and (when
/// e-mail is configured) the invitation queued in the same transaction.
pub async fn admit(
    db: &Db,
    config: &Config,
    count: i64,
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
    waitlist::admit(db, count, &spec, |email, locale, code| {
        mail.then(|| crate::mail::invite_mail(config, email, locale, code))
    })
    .await
}
