//! `moss serve`: open the database (migrating it), load the model, start the mail sender, listen.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::ModelArgs;
use crate::answer::Backend;
use crate::config::{BackendKind, Config};
use crate::db::invites::{self, InviteSpec};
use crate::db::{accounts, Db, PoolSettings};
use crate::http::AppState;
use crate::upstream::Upstream;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (default: server.addr from config).
    #[arg(long)]
    pub addr: Option<String>,
}

/// Connects to the configured database and applies migrations.
pub async fn open_db(config: &Config) -> anyhow::Result<Db> {
    let d = &config.database;
    let settings = PoolSettings {
        max_connections: d.max_connections,
        min_connections: d.min_connections,
        acquire_timeout: Duration::from_secs(d.acquire_timeout_secs),
        statement_timeout: Duration::from_secs(d.statement_timeout_secs),
    };
    let db = Db::connect(&config.database_url()?, &settings).await?;
    db.migrate().await?;
    let indexed = crate::db::search::index_earlier(&db).await?;
    if indexed > 0 {
        tracing::info!("indexed {indexed} earlier messages for search");
    }
    Ok(db)
}

/// On an empty database, mints one admin invite and returns its registration URL.
pub async fn first_admin_invite(db: &Db, config: &Config) -> anyhow::Result<Option<String>> {
    if accounts::count_users(db).await? > 0 {
        return Ok(None);
    }
    let spec = InviteSpec {
        note: "first admin (printed by moss serve)".into(),
        role: crate::db::accounts::AccountRole::Admin,
        expires_in_ms: Some(7 * 86_400_000),
        ..InviteSpec::default()
    };
    let code = invites::mint_many(db, 1, &spec).await?.remove(0);
    Ok(Some(format!(
        "{}/register?code={code}",
        config.public_url()
    )))
}

/// The local engine (loading, and on first use fetching, the model), or the upstream client.
pub fn backend(config: &Config, model: &ModelArgs) -> anyhow::Result<Backend> {
    if config.engine.backend == BackendKind::Openai {
        let u = &config.engine.upstream;
        tracing::info!(
            "answers come from {} (model {}); no model is loaded here",
            u.urls.join(", "),
            u.model
        );
        return Ok(Backend::Upstream(Upstream::new(u)?));
    }
    let engine = super::start_engine(config, model)?;
    // The vocabulary as bytes (log-probabilities, response formats) is built in the background,
    // so that the first request that needs it does not wait for it.
    let info = engine.info.clone();
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        match info.vocabulary.prepare() {
            Ok(()) => tracing::debug!(
                secs = started.elapsed().as_secs_f64(),
                "grammar vocabulary ready"
            ),
            Err(e) => tracing::warn!("response formats and tool choices cannot be enforced: {e}"),
        }
    });
    Ok(engine.into())
}

pub fn run(mut config: Config, args: ServeArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.addr {
        config.server.addr = addr;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let db = open_db(&config).await?;
        let engine = backend(&config, &args.model)?;
        let listener = tokio::net::TcpListener::bind(&config.server.addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.addr))?;
        let local = listener.local_addr()?;
        if config.server.public_url.is_empty() {
            config.server.addr = local.to_string();
        }
        let invite = first_admin_invite(&db, &config).await?;
        let grace = Duration::from_secs(config.server.shutdown_grace_secs);
        let config = Arc::new(config);
        println!("moss is listening on {}", config.public_url());
        if let Some(url) = invite {
            println!("First admin invite (register with it to become the administrator): {url}");
        }
        launch(
            db,
            config,
            engine,
            listener,
            crate::app::shutdown_signal(),
            grace,
        )
        .await?;
        Ok(())
    })
}

/// The service on an open database, backend and listener: the mail sender (with SMTP), the
/// application state, and the server until `shutdown` resolves (then `grace` for open answers).
/// `moss serve` and the tests start the service through this one function.
pub async fn launch(
    db: Db,
    config: Arc<Config>,
    backend: Backend,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> anyhow::Result<()> {
    let (stop_mail, mail_stopped) = tokio::sync::watch::channel(false);
    if config.smtp.enabled() {
        tokio::spawn(crate::mail::run_sender(
            db.clone(),
            config.smtp.clone(),
            mail_stopped,
        ));
    }
    let (stop_answers, stopping) = tokio::sync::watch::channel(false);
    let state = AppState::new(db, config, backend, stopping)?;
    let served = crate::app::serve(listener, state, shutdown, grace, stop_answers).await;
    let _ = stop_mail.send(true);
    served
}
