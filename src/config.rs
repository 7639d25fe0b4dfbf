//! One configuration tree: embedded defaults (config/default.toml), then an optional file, then
//! `MOSS_*` environment variables. Unknown keys are an error; loading never writes files.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::engine::SamplingParams;

/// The defaults, compiled into the binary so `moss` runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub engine: EngineConfig,
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub accounts: AccountsConfig,
    pub invites: InvitesConfig,
    pub waitlist: WaitlistConfig,
    pub smtp: SmtpConfig,
    pub consent: ConsentConfig,
    pub chat: ChatConfig,
    pub refusals: RefusalsConfig,
    pub limits: LimitsConfig,
    pub dashboard: DashboardConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    pub write_secs: u64,
    pub keep_days: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_running: usize,
    pub max_waiting: usize,
    pub max_queue_wait_secs: u64,
    pub per_user_answers: usize,
    pub reopen_hour: u32,
    pub utc_offset_hours: i32,
    pub daily_user_tokens: i64,
    pub daily_service_tokens: i64,
    pub trusted_proxies: Vec<String>,
    pub auth: Bucket,
    pub waitlist: Bucket,
    pub generate: Bucket,
    pub api: Bucket,
}

/// A token bucket: `per_minute` refill, `burst` capacity.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub per_minute: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    pub max_message_chars: usize,
    pub max_tokens_limit: usize,
    pub title_chars: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusalsConfig {
    pub rules_file: String,
    pub cooldown_after: i64,
    pub window_minutes: i64,
    pub cooldown_minutes: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub addr: String,
    pub public_url: String,
    pub max_body_bytes: usize,
    pub request_timeout_secs: u64,
    pub header_timeout_secs: u64,
    pub body_timeout_secs: u64,
    pub max_header_bytes: usize,
    pub shutdown_grace_secs: u64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    pub data_dir: PathBuf,
    pub max_connections: u32,
    pub min_connections: u32,
    pub acquire_timeout_secs: u64,
    pub statement_timeout_secs: u64,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsConfig {
    pub session_idle_hours: u64,
    pub session_absolute_days: u64,
    pub min_password_chars: usize,
    pub free_login_failures: i64,
    pub max_login_block_secs: i64,
    pub reset_link_minutes: i64,
    pub reset_mails_per_hour: i64,
    pub hash_threads: usize,
    pub hash_wait_ms: u64,
    pub hashes_per_client: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvitesConfig {
    pub default_uses: i64,
    pub waitlist_code_days: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitlistConfig {
    pub resend_confirmation_minutes: i64,
    pub confirm_link_hours: i64,
    pub auto: AutoAdmitConfig,
}

/// Admission at the pace the service shows it can take (off by default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoAdmitConfig {
    pub enabled: bool,
    pub every_secs: u64,
    pub per_interval: i64,
    pub lookback_minutes: i64,
    pub max_shed_percent: f64,
    pub max_wait_secs: f64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: String,
    pub password: String,
    pub from: String,
    pub poll_secs: u64,
    pub retry_secs: i64,
    pub max_attempts: i64,
}

/// How the mail server's connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// TLS from the first byte (port 465).
    Tls,
    /// A plain connection upgraded with STARTTLS (port 587).
    Starttls,
    /// No encryption (a local relay or a test sink).
    None,
}

/// Where answers are generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The GGUF model in this process.
    Local,
    /// An OpenAI-compatible server (`engine.upstream`).
    Openai,
}

/// Which code computes the local model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImplementationKind {
    /// moss's own decoder and kernels.
    Moss,
    /// candle-transformers' model code (for comparison).
    Candle,
}

impl SmtpConfig {
    pub fn enabled(&self) -> bool {
        !self.host.is_empty()
    }
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentConfig {
    pub text_version: String,
    pub text_en: String,
    pub text_zh: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// `local` (the GGUF model in this process) or `openai` (an OpenAI-compatible server).
    pub backend: BackendKind,
    pub model: String,
    pub implementation: ImplementationKind,
    pub max_batch: usize,
    pub kv_cache_mb: usize,
    pub lookup_max_batch: usize,
    pub lookup_max_draft: usize,
    pub nice: i32,
    pub device: String,
    pub max_context: usize,
    pub queue_capacity: usize,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub system_prompt: String,
    pub token_delay_ms: u64,
    pub sampling: SamplingConfig,
    pub upstream: UpstreamConfig,
}

/// `engine.backend = "openai"`: where answers are generated instead of a local model.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub urls: Vec<String>,
    pub model: String,
    pub api_key: String,
    pub connect_timeout_secs: u64,
    pub response_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub failure_cooldown_secs: u64,
    pub max_prompt_chars: usize,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("urls", &self.urls)
            .field("model", &self.model)
            .field("api_key", &"***")
            .field("response_timeout_secs", &self.response_timeout_secs)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl SamplingConfig {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: (self.top_p > 0.0 && self.top_p < 1.0).then_some(self.top_p),
            top_k: (self.top_k > 0).then_some(self.top_k),
            repetition_penalty: self.repetition_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: (self.seed != 0).then_some(self.seed),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.is_file() {
                anyhow::bail!("config file {} does not exist", path.display());
            }
            fig = fig.merge(Toml::file(path));
        }
        // Only nested keys (`MOSS_SECTION__KEY`) are configuration; plain `MOSS_*` variables such as
        // MOSS_MODEL_DIR belong to scripts and tests.
        fig = fig.merge(
            Env::prefixed("MOSS_")
                .split("__")
                .filter(|k| k.as_str().contains('.')),
        );
        let cfg: Config = fig
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let e = &self.engine;
        anyhow::ensure!(
            e.max_context >= 16,
            "engine.max_context must be at least 16"
        );
        anyhow::ensure!(
            e.queue_capacity >= 1,
            "engine.queue_capacity must be at least 1"
        );
        anyhow::ensure!(e.max_tokens >= 1, "engine.max_tokens must be at least 1");
        anyhow::ensure!(e.max_batch >= 1, "engine.max_batch must be at least 1");
        anyhow::ensure!((0..=19).contains(&e.nice), "engine.nice must be in 0..=19");
        anyhow::ensure!(
            e.kv_cache_mb >= 16,
            "engine.kv_cache_mb must be at least 16"
        );
        anyhow::ensure!(
            (1..=64).contains(&e.lookup_max_draft),
            "engine.lookup_max_draft must be in 1..=64"
        );
        match e.backend {
            BackendKind::Local => {}
            BackendKind::Openai => {
                let u = &e.upstream;
                anyhow::ensure!(
                    !u.urls.is_empty(),
                    "engine.upstream.urls must list at least one URL when engine.backend = \"openai\""
                );
                for url in &u.urls {
                    anyhow::ensure!(
                        (url.starts_with("http://") || url.starts_with("https://"))
                            && reqwest::Url::parse(url).is_ok(),
                        "engine.upstream.urls: `{url}` is not an http(s) URL"
                    );
                }
                anyhow::ensure!(
                    !u.model.is_empty(),
                    "engine.upstream.model must name the upstream's model"
                );
                anyhow::ensure!(
                    u.connect_timeout_secs >= 1
                        && u.response_timeout_secs >= 1
                        && u.idle_timeout_secs >= 1,
                    "engine.upstream timeouts must be at least 1 second"
                );
                anyhow::ensure!(
                    u.max_prompt_chars >= 100,
                    "engine.upstream.max_prompt_chars must be at least 100"
                );
            }
        }
        // (min_connections above max_connections is capped at it.)
        anyhow::ensure!(
            self.database.max_connections >= 1,
            "database.max_connections must be at least 1"
        );
        let auto = &self.waitlist.auto;
        anyhow::ensure!(
            auto.every_secs >= 1 && auto.per_interval >= 1 && auto.lookback_minutes >= 1,
            "waitlist.auto.every_secs, per_interval and lookback_minutes must be at least 1"
        );
        anyhow::ensure!(
            self.dashboard.write_secs >= 1 && self.dashboard.keep_days >= 1,
            "dashboard.write_secs and dashboard.keep_days must be at least 1"
        );
        anyhow::ensure!(
            self.accounts.min_password_chars >= 8,
            "accounts.min_password_chars must be at least 8"
        );
        anyhow::ensure!(
            self.server.header_timeout_secs >= 1,
            "server.header_timeout_secs must be at least 1"
        );
        anyhow::ensure!(
            self.server.max_body_bytes >= 1024,
            "server.max_body_bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.server.body_timeout_secs >= 1,
            "server.body_timeout_secs must be at least 1"
        );
        // hyper's smallest read buffer.
        anyhow::ensure!(
            self.server.max_header_bytes >= 8192,
            "server.max_header_bytes must be at least 8192"
        );
        anyhow::ensure!(
            self.accounts.hashes_per_client >= 1 && self.accounts.hash_wait_ms >= 1,
            "accounts.hashes_per_client and accounts.hash_wait_ms must be at least 1"
        );
        anyhow::ensure!(
            self.waitlist.confirm_link_hours >= 1,
            "waitlist.confirm_link_hours must be at least 1"
        );
        let public = &self.server.public_url;
        anyhow::ensure!(
            public.is_empty()
                || ((public.starts_with("http://") || public.starts_with("https://"))
                    && reqwest::Url::parse(public).is_ok_and(|u| u.host_str().is_some())),
            "server.public_url must be empty or an http(s) URL, not `{public}`"
        );
        let s = &e.sampling;
        anyhow::ensure!(
            (0.0..=5.0).contains(&s.temperature),
            "engine.sampling.temperature must be in 0..=5"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&s.top_p),
            "engine.sampling.top_p must be in 0..=1"
        );
        anyhow::ensure!(
            s.repetition_penalty > 0.0,
            "engine.sampling.repetition_penalty must be positive"
        );
        Ok(())
    }

    /// The database URL: the configured one, else SQLite in `data_dir` (created if needed).
    pub fn database_url(&self) -> anyhow::Result<String> {
        if !self.database.url.is_empty() {
            return Ok(self.database.url.clone());
        }
        let dir = &self.database.data_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        Ok(format!(
            "sqlite://{}?mode=rwc",
            dir.join("moss.db").display()
        ))
    }

    /// The public base URL without a trailing slash.
    pub fn public_url(&self) -> String {
        if self.server.public_url.is_empty() {
            format!("http://{}", self.server.addr)
        } else {
            self.server.public_url.trim_end_matches('/').to_string()
        }
    }

    /// The model file: the configured path, else the default model in the cache.
    pub fn model_path(&self) -> Option<PathBuf> {
        (!self.engine.model.is_empty()).then(|| PathBuf::from(&self.engine.model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_validate() {
        let cfg: Config = Figment::from(Toml::string(DEFAULT_TOML)).extract().unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.engine.device, "auto");
        assert!(cfg.engine.system_prompt.contains("language"));
        assert!(!cfg.smtp.enabled());
    }

    #[test]
    fn secrets_are_hidden_in_debug() {
        let mut cfg: Config = Figment::from(Toml::string(DEFAULT_TOML)).extract().unwrap();
        cfg.smtp.password = "hunter2".into();
        cfg.database.url = "postgres://moss:s3cret@db/moss".into();
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("s3cret"), "{dbg}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let fig = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Toml::string("[engine]\nmodle = 'x'\n"));
        assert!(fig.extract::<Config>().is_err());
    }
}
