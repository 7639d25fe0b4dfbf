//! E-mail: the texts (English and Chinese) of the waitlist confirmation, the invitation and the
//! password reset, and the background sender that delivers the outbox over SMTP with retries.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::{Config, SmtpConfig, SmtpSecurity};
use crate::db::outbox::{self, NewMail};
use crate::db::Db;

fn zh(locale: &str) -> bool {
    locale == "zh"
}

/// The double opt-in mail: a private link that confirms the address and shows the status.
pub fn confirm_mail(cfg: &Config, to: &str, locale: &str, token: &str) -> NewMail {
    let base = cfg.public_url();
    let confirm = format!("{base}/waitlist/confirm?token={token}");
    let status = format!("{base}/waitlist/status?token={token}");
    let (subject, body) = if zh(locale) {
        (
            "请确认你的 moss 候补名单登记".to_string(),
            format!("你好！\n\n请打开以下链接确认你的邮箱，确认后即进入候补队列：\n{confirm}\n\n随时可以在这里查看你的排队位置：\n{status}\n\n如果不是你本人登记的，请忽略此邮件。\n"),
        )
    } else {
        (
            "Please confirm your place on the moss waitlist".to_string(),
            format!("Hello!\n\nPlease confirm your e-mail address to join the waitlist:\n{confirm}\n\nYou can see your place in line at any time here:\n{status}\n\nIf you did not sign up, just ignore this e-mail.\n"),
        )
    };
    NewMail {
        kind: "waitlist_confirm",
        to: to.to_string(),
        subject,
        body,
    }
}

/// The invitation: the code and a link that fills it in.
pub fn invite_mail(cfg: &Config, to: &str, locale: &str, code: &str) -> NewMail {
    let link = format!("{}/register?code={code}", cfg.public_url());
    let (subject, body) = if zh(locale) {
        (
            "你的 moss 邀请码".to_string(),
            format!("你好！\n\n轮到你了。你的单次邀请码是：\n\n    {code}\n\n打开以下链接即可注册（邀请码已自动填好）：\n{link}\n"),
        )
    } else {
        (
            "Your moss invitation".to_string(),
            format!("Hello!\n\nIt is your turn. Your single-use invite code is:\n\n    {code}\n\nRegister here (the code is filled in for you):\n{link}\n"),
        )
    };
    NewMail {
        kind: "invite",
        to: to.to_string(),
        subject,
        body,
    }
}

/// The password-reset mail.
pub fn reset_mail(cfg: &Config, to: &str, locale: &str, token: &str) -> NewMail {
    let link = format!("{}/reset?token={token}", cfg.public_url());
    let minutes = cfg.accounts.reset_link_minutes;
    let (subject, body) = if zh(locale) {
        (
            "重置你的 moss 密码".to_string(),
            format!("你好！\n\n打开以下链接设置新密码（{minutes} 分钟内有效，只能使用一次）：\n{link}\n\n设置新密码后，所有已登录的会话都会退出。如果不是你本人操作，请忽略此邮件。\n"),
        )
    } else {
        (
            "Reset your moss password".to_string(),
            format!("Hello!\n\nSet a new password here (the link works once, for {minutes} minutes):\n{link}\n\nSetting a new password signs you out everywhere. If you did not ask for this, ignore this e-mail.\n"),
        )
    };
    NewMail {
        kind: "password_reset",
        to: to.to_string(),
        subject,
        body,
    }
}

fn transport(smtp: &SmtpConfig) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let builder = match smtp.security {
        SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host)?,
        SmtpSecurity::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)?,
        SmtpSecurity::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
    };
    let mut builder = builder
        .port(smtp.port)
        .timeout(Some(Duration::from_secs(20)));
    if !smtp.username.is_empty() {
        builder = builder.credentials(Credentials::new(
            smtp.username.clone(),
            smtp.password.clone(),
        ));
    }
    Ok(builder.build())
}

async fn send_one(
    t: &AsyncSmtpTransport<Tokio1Executor>,
    from: &str,
    m: &outbox::Mail,
) -> anyhow::Result<()> {
    let message = Message::builder()
        .from(from.parse()?)
        .to(m.to_email.parse()?)
        .subject(&m.subject)
        .header(ContentType::TEXT_PLAIN)
        .body(m.body.clone())?;
    t.send(message).await?;
    Ok(())
}

/// Delivers due mails once; returns how many were sent.
pub async fn deliver_due(db: &Db, smtp: &SmtpConfig) -> anyhow::Result<usize> {
    let t = transport(smtp)?;
    let mails = outbox::claim_due(db, 20, 120_000).await?;
    let mut sent = 0;
    for m in mails {
        match send_one(&t, &smtp.from, &m).await {
            Ok(()) => {
                outbox::mark_sent(db, m.id).await?;
                sent += 1;
            }
            Err(e) => {
                tracing::warn!(mail = m.id, kind = %m.kind, attempt = m.attempts + 1, "sending mail failed: {e}");
                let backoff = smtp.retry_secs * 1000 * (1 << m.attempts.min(6));
                outbox::mark_failed(db, m.id, &e.to_string(), backoff, smtp.max_attempts).await?;
            }
        }
    }
    Ok(sent)
}

/// Runs the sender until `shutdown` fires.
pub async fn run_sender(
    db: Db,
    smtp: SmtpConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let poll = Duration::from_secs(smtp.poll_secs.max(1));
    loop {
        if let Err(e) = deliver_due(&db, &smtp).await {
            tracing::warn!("mail sender: {e:#}");
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.changed() => return,
        }
    }
}
