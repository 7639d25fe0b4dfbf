//! `moss admin …`: operator commands against the configured database (SQLite or PostgreSQL).

use std::io::Write;

use clap::Subcommand;

use crate::config::Config;
use crate::db::accounts::AccountRole;
use crate::db::invites::{self, InviteSpec};
use crate::db::{accounts, feedback, waitlist};

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Invite codes.
    #[command(subcommand)]
    Invite(InviteCommand),
    /// The waitlist.
    #[command(subcommand)]
    Waitlist(WaitlistCommand),
    /// Accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Ratings for model improvement.
    #[command(subcommand)]
    Feedback(FeedbackCommand),
}

#[derive(Debug, Subcommand)]
pub enum InviteCommand {
    /// Mint codes; prints them one per line and nothing else.
    Create {
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Uses per code (default: invites.default_uses).
        #[arg(long)]
        uses: Option<i64>,
        /// Lifetime such as 7d, 12h or 30m.
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// List codes (prefix, state, uses, expiry, note).
    List,
    /// Revoke a code.
    Revoke { code: String },
}

#[derive(Debug, Subcommand)]
pub enum WaitlistCommand {
    /// List entries with their state.
    List,
    /// Admit the oldest confirmed entries: prints `email<TAB>code` lines and queues the e-mails.
    Admit {
        #[arg(long)]
        count: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    List,
    /// Make an account an admin or a user.
    SetRole {
        email: String,
        /// `admin` or `user`.
        role: String,
    },
    /// Print a single-use password-reset link to hand to the user (no e-mail needed).
    ResetLink {
        email: String,
    },
    /// Delete an account and its data (consent history is kept, anonymised).
    Delete {
        email: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum FeedbackCommand {
    /// JSON Lines of rated answers from users who consented then and still do.
    Export {
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// Parses `7d`, `12h`, `30m` or `45s` into milliseconds.
pub fn parse_duration_ms(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("bad duration `{s}` (use e.g. 7d, 12h, 30m)"))?;
    let unit_ms = match unit {
        "d" => 86_400_000,
        "h" => 3_600_000,
        "m" => 60_000,
        "s" => 1_000,
        _ => anyhow::bail!("bad duration `{s}` (use e.g. 7d, 12h, 30m)"),
    };
    anyhow::ensure!(n > 0, "the duration must be positive");
    Ok(n * unit_ms)
}

fn time(ms: Option<i64>) -> String {
    ms.map(|m| (m / 1000).to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn run(config: Config, cmd: AdminCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let db = super::serve::open_db(&config).await?;
        let mut out = std::io::stdout().lock();
        match cmd {
            AdminCommand::Invite(InviteCommand::Create {
                count,
                uses,
                expires_in,
                note,
            }) => {
                anyhow::ensure!(
                    (1..=10_000).contains(&count),
                    "--count must be between 1 and 10000"
                );
                let uses = uses.unwrap_or(config.invites.default_uses);
                anyhow::ensure!(uses >= 1, "--uses must be at least 1");
                let expires_in_ms = expires_in.as_deref().map(parse_duration_ms).transpose()?;
                let spec = InviteSpec {
                    max_uses: uses,
                    expires_in_ms,
                    note,
                    ..InviteSpec::default()
                };
                for code in invites::mint_many(&db, count, &spec).await? {
                    writeln!(out, "{code}")?;
                }
            }
            AdminCommand::Invite(InviteCommand::List) => {
                for i in invites::list(&db).await? {
                    writeln!(
                        out,
                        "{}…\t{}\t{}/{}\t{}\t{}\t{}",
                        i.code_prefix,
                        i.state(),
                        i.uses,
                        i.max_uses,
                        time(i.expires_at),
                        i.role,
                        i.note
                    )?;
                }
            }
            AdminCommand::Invite(InviteCommand::Revoke { code }) => {
                anyhow::ensure!(
                    invites::revoke(&db, &code).await?,
                    "no such active invite code"
                );
            }
            AdminCommand::Waitlist(WaitlistCommand::List) => {
                for e in waitlist::list(&db).await? {
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}",
                        e.email,
                        e.state(),
                        e.locale,
                        e.created_at / 1000
                    )?;
                }
            }
            AdminCommand::Waitlist(WaitlistCommand::Admit { count }) => {
                anyhow::ensure!(count >= 1, "--count must be at least 1");
                let admitted = crate::admin::admit(
                    &db,
                    &config,
                    crate::db::waitlist::Pick::Oldest(count),
                    None,
                )
                .await?;
                for a in &admitted {
                    writeln!(out, "{}\t{}", a.email, a.code)?;
                }
                if config.smtp.enabled() {
                    eprintln!(
                        "{} invitation(s) queued; the running server's mail sender delivers them",
                        admitted.len()
                    );
                } else {
                    eprintln!("no SMTP server configured: hand these codes out yourself");
                }
            }
            AdminCommand::User(UserCommand::List) => {
                for u in accounts::list_users(&db).await? {
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}",
                        u.email,
                        u.role,
                        u.display_name,
                        u.created_at / 1000
                    )?;
                }
            }
            AdminCommand::User(UserCommand::ResetLink { email }) => {
                let user = accounts::user_by_email(&db, &email.trim().to_lowercase())
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("unknown email {email}"))?;
                let url = crate::admin::reset_link(&db, &config, user.id).await?;
                writeln!(out, "{url}")?;
            }
            AdminCommand::User(UserCommand::SetRole { email, role }) => {
                anyhow::ensure!(
                    accounts::set_role(
                        &db,
                        &email.trim().to_lowercase(),
                        role.parse::<AccountRole>()
                            .map_err(|_| anyhow::anyhow!("role must be admin or user"))?
                    )
                    .await?,
                    "unknown email {email}"
                );
            }
            AdminCommand::User(UserCommand::Delete { email }) => {
                anyhow::ensure!(
                    accounts::delete_user(&db, &email.trim().to_lowercase()).await?,
                    "unknown email {email}"
                );
            }
            AdminCommand::Feedback(FeedbackCommand::Export { out: path }) => {
                let records = feedback::export_feedback(&db).await?;
                let mut text = String::new();
                for r in &records {
                    text.push_str(&serde_json::to_string(r)?);
                    text.push('\n');
                }
                match path {
                    Some(p) => std::fs::write(&p, text)
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?,
                    None => out.write_all(text.as_bytes())?,
                }
                eprintln!("{} record(s) exported", records.len());
            }
        }
        Ok(())
    })
}
