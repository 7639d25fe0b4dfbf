//! The only place that knows SQL. One `Db` over sqlx's `Any` driver: the backend (SQLite or
//! PostgreSQL) is chosen once from the URL; queries are portable (`$n` placeholders, `RETURNING`,
//! Unix-millisecond BIGINT times, 0/1 flags); only migrations are written per backend.

pub mod accounts;
pub mod branches;
pub mod chats;
pub mod consent;
pub mod feedback;
pub mod invites;
pub mod keys;
pub mod outbox;
pub mod profile;
pub mod rollups;
pub mod search;
pub mod usage;
pub mod waitlist;

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor, Transaction};

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database failure, as callers need to tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A unique constraint refused the write.
    #[error("already exists")]
    Conflict,
    /// The database did not answer in time or is gone (pool timeout, connection refused).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => DbError::Conflict,
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => DbError::Unavailable(e.to_string()),
            _ => DbError::Other(e.to_string()),
        }
    }
}

pub type DbResult<T> = Result<T, DbError>;

/// A text that is none of a column's known values (a decode error when read back).
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is none of the known values")]
pub struct UnknownValue(pub String);

/// Pool settings (from config).
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    /// Kept open even when idle (opening one under load is the expensive moment).
    pub min_connections: u32,
    pub acquire_timeout: Duration,
    pub statement_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 8,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

/// A cheap, cloneable database handle.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A column list with each column qualified by a table alias (`a, b` → `m.a, m.b`), for joins.
pub(crate) fn prefixed(cols: &str, alias: &str) -> String {
    cols.split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Db {
    /// Connects to `url` (`sqlite://FILE` or `postgres://…`) and applies the backend's settings.
    pub async fn connect(url: &str, settings: &PoolSettings) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            anyhow::bail!("unsupported database URL (use sqlite://FILE or postgres://...)");
        };
        // A SQLite file that does not exist yet is created (sqlx opens read-write only, unless
        // the URL asks otherwise with its own `mode=`).
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") && !url.contains(":memory:") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let statement_ms = settings.statement_timeout.as_millis();
        let pool = AnyPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(settings.min_connections.min(settings.max_connections))
            .acquire_timeout(settings.acquire_timeout)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    let setup: Vec<String> = match backend {
                        // synchronous=FULL: NORMAL can lose commits on power loss.
                        Backend::Sqlite => vec![
                            "PRAGMA journal_mode = WAL".into(),
                            "PRAGMA synchronous = FULL".into(),
                            "PRAGMA foreign_keys = ON".into(),
                            "PRAGMA busy_timeout = 8000".into(),
                        ],
                        Backend::Postgres => {
                            vec![format!("SET statement_timeout = {statement_ms}")]
                        }
                    };
                    for stmt in setup {
                        conn.execute(sqlx::raw_sql(&stmt)).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open database: {e}"))?;
        Ok(Self { pool, backend })
    }

    /// Applies pending migrations (safe when several replicas start at once: sqlx takes a lock).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| anyhow::anyhow!("migrations failed: {e}"))
    }

    /// A write transaction. On SQLite it starts with `BEGIN IMMEDIATE`, so a transaction that
    /// reads before it writes waits for the lock instead of failing with SQLITE_BUSY.
    pub async fn begin(&self) -> DbResult<Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await.is_ok()
    }
}
