//! The HTTP layer: one module per resource, each with its own `router()`. Handlers are thin:
//! extract, call into `db` / `engine`, map to a response.

pub mod account;
pub mod accounts;
pub mod admin;
pub mod auth;
pub mod chat;
pub mod conversations;
pub mod error;
pub mod keys;
pub mod layers;
pub mod openai;
pub mod ops;
pub mod pages;
pub mod waitlist;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts};
use axum::http::request::Parts;
use serde::Deserialize;

use crate::config::Config;
use crate::db::Db;
pub use error::{AppError, AppResult, Field};

/// Everything a handler may need, behind one `Arc`: every middleware layer and extractor clones
/// the state for every request, and one reference count is cheaper than one per handle (the load
/// test's profile showed cloning and dropping the handles among the shed path's largest costs).
#[derive(Clone)]
pub struct AppState(Arc<Handles>);

impl std::ops::Deref for AppState {
    type Target = Handles;
    fn deref(&self) -> &Handles {
        &self.0
    }
}

/// The handles themselves.
pub struct Handles {
    pub db: Db,
    pub config: Arc<Config>,
    /// The answer path: backend, refusal policy, admission, and the shutdown signal.
    pub answers: crate::answer::Answers,
    /// How clients are told apart (peer address, or a trusted proxy's X-Forwarded-For hop).
    pub clients: crate::limits::ClientKey,
    /// Password hashing, bounded in threads, wait and per client.
    pub hasher: crate::passwords::Hasher,
    /// Password-reset requests, handled after the answer has gone out.
    pub resets: crate::recovery::ResetMailer,
    /// `/readyz`'s last probe, shared by callers within a second.
    pub readiness: ops::ReadinessCache,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl AppState {
    /// Builds the state: refusal rules from config, admission slots, password hashing, the
    /// reset queue, the metrics recorder. `stopping` tells running answers to stop (shutdown).
    pub fn new(
        db: Db,
        config: Arc<Config>,
        backend: crate::answer::Backend,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let policy = crate::policy::Policy::load(&config.refusals.rules_file)?;
        let l = &config.limits;
        let admission =
            crate::admission::Admission::new(l.max_running + l.max_waiting, l.per_user_answers);
        let clients = crate::limits::ClientKey::from_config(&l.trusted_proxies)?;
        let a = &config.accounts;
        let hasher = crate::passwords::Hasher::start(crate::passwords::HasherSettings {
            threads: a.hash_threads,
            wait: std::time::Duration::from_millis(a.hash_wait_ms),
            per_client: a.hashes_per_client,
        })?;
        let resets = crate::recovery::ResetMailer::start(db.clone(), config.clone());
        let answers = crate::answer::Answers::new(crate::answer::Inner {
            live: Default::default(),
            pace: Default::default(),
            tally: Default::default(),
            db: db.clone(),
            config: config.clone(),
            backend,
            policy,
            admission,
            stopping,
        });
        Ok(Self(Arc::new(Handles {
            db,
            config,
            answers,
            clients,
            hasher,
            resets,
            readiness: ops::ReadinessCache::default(),
            metrics: crate::metrics::handle(),
        })))
    }

    /// The overloaded answer: Retry-After is the configured reopening time, tomorrow morning.
    pub fn overloaded(&self) -> AppError {
        let l = &self.config.limits;
        let at = crate::admission::next_reopening(
            std::time::SystemTime::now(),
            l.reopen_hour,
            l.utc_offset_hours,
        );
        AppError::Overloaded {
            retry_at: httpdate::fmt_http_date(at),
        }
    }

    /// An answer that could not start, as the client hears it (browser and API alike; the API
    /// reshapes the body, not the status or headers).
    pub fn answer_error(&self, e: crate::answer::AnswerError) -> AppError {
        use crate::answer::params::Field as P;
        use crate::answer::AnswerError as E;
        match e {
            E::Invalid {
                field,
                message,
                message_zh,
            } => AppError::Invalid {
                field: match field {
                    P::Content => Field::Content,
                    P::Temperature => Field::Temperature,
                    P::MaxTokens => Field::MaxTokens,
                    P::Message => Field::Message,
                    other => Field::Request(other.name()),
                },
                message,
                message_zh,
            },
            E::PromptTooLong { max_chars } => AppError::PromptTooLong {
                max_chars: max_chars.unwrap_or(0),
            },
            E::NotFound => AppError::NotFound,
            E::Cooldown { retry_after_secs } => AppError::Cooldown { retry_after_secs },
            E::Busy => AppError::Busy,
            E::Overloaded => self.overloaded(),
            E::QuotaExceeded { retry_after_secs } => AppError::QuotaExceeded { retry_after_secs },
            E::Unavailable(m) => AppError::Unavailable(m),
            E::Internal(m) => AppError::Internal(m),
        }
    }

    pub fn secure_cookies(&self) -> bool {
        self.config.public_url().starts_with("https://")
    }

    pub fn session_idle_ms(&self) -> i64 {
        self.config.accounts.session_idle_hours as i64 * 3_600_000
    }

    pub fn mail_enabled(&self) -> bool {
        self.config.smtp.enabled()
    }
}

/// A JSON request body whose rejections speak the contract's error format. Text with NUL
/// characters is refused (PostgreSQL cannot store them, and no one types them).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, AppError> {
        let axum::Json(value) = axum::Json::<serde_json::Value>::from_request(req, state).await?;
        reject_nul(&value)?;
        serde_json::from_value(value)
            .map(JsonBody)
            .map_err(|e| AppError::Invalid {
                field: Field::Body,
                message: format!("Failed to deserialize the JSON body into the target type: {e}"),
                message_zh: "请求内容的字段缺失或类型不对。".into(),
            })
    }
}

/// `invalid_request` when any string in `v` holds a NUL character.
pub fn reject_nul(v: &serde_json::Value) -> AppResult<()> {
    fn has_nul(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(a) => a.iter().any(has_nul),
            serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    if has_nul(v) {
        return Err(AppError::invalid(
            Field::Body,
            "text must not contain NUL characters",
            "文本中不能包含 NUL 字符。",
        ));
    }
    Ok(())
}

/// A JSON body that may be absent (an empty body means `T::default()`).
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = AppError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, AppError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|r| {
                if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    AppError::PayloadTooLarge
                } else {
                    AppError::BadRequest(r.body_text())
                }
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        let invalid = |e: serde_json::Error| {
            AppError::invalid(
                Field::Body,
                format!("invalid JSON body: {e}"),
                "请求内容不是有效的 JSON。",
            )
        };
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(invalid)?;
        reject_nul(&value)?;
        serde_json::from_value(value)
            .map(OptionalJson)
            .map_err(invalid)
    }
}

/// Trims and lower-cases an e-mail address and checks it; `invalid_email` otherwise.
pub fn normalize_email(input: &str) -> AppResult<String> {
    let email = input.trim().to_lowercase();
    if email.len() > 254
        || email
            .chars()
            .any(|c| c.is_control() || is_hidden(c) || c.is_whitespace())
        || !email_address::EmailAddress::is_valid(&email)
        || !email.contains('.')
    {
        return Err(AppError::InvalidEmail);
    }
    Ok(email)
}

/// `zh` for any Chinese locale, else `en`.
pub fn normalize_locale(input: Option<&str>) -> &'static str {
    match input {
        Some(l) if l.trim().to_lowercase().starts_with("zh") => "zh",
        _ => "en",
    }
}

/// Checks a new password's length (in characters).
pub fn check_password(state: &AppState, password: &str) -> AppResult<()> {
    let n = password.chars().count();
    let min = state.config.accounts.min_password_chars;
    if n < min {
        return Err(AppError::WeakPassword { min });
    }
    if n > 1024 {
        return Err(AppError::PasswordTooLong);
    }
    Ok(())
}

/// Hashes a new password on the hashing threads (503 when they stay busy).
pub async fn hash_password(
    state: &AppState,
    client: IpAddr,
    password: String,
) -> AppResult<String> {
    state
        .hasher
        .hash(client, password)
        .await
        .map_err(|_| AppError::PasswordChecksBusy)
}

/// Checks a password on the hashing threads; `hash: None` (no such account) costs the same.
pub async fn verify_password(
    state: &AppState,
    client: IpAddr,
    password: String,
    hash: Option<String>,
) -> AppResult<bool> {
    state
        .hasher
        .verify(client, password, hash)
        .await
        .map_err(|_| AppError::PasswordChecksBusy)
}

/// The client's address as the rate limits key it: the peer, or the right-most X-Forwarded-For
/// hop that a configured trusted proxy added (IPv6 by /64).
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        let forwarded = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        Ok(ClientAddr(state.clients.client_ip(peer, forwarded)))
    }
}

/// `{"email": …}` bodies.
#[derive(Debug, Deserialize)]
pub struct EmailBody {
    pub email: String,
}

/// A one-line text field (a name, a title, a note) of at most `max` characters after trimming,
/// without control characters or invisible text-direction marks.
pub fn bounded_text(field: Field, value: &str, max: usize) -> AppResult<String> {
    checked_text(field, value, max, false)
}

/// Like `bounded_text`, for text that may span lines (a comment): newlines and tabs are kept.
pub fn bounded_multiline(field: Field, value: &str, max: usize) -> AppResult<String> {
    checked_text(field, value, max, true)
}

fn checked_text(field: Field, value: &str, max: usize, lines: bool) -> AppResult<String> {
    let v = value.trim();
    if v.chars().count() > max {
        return Err(AppError::invalid(
            field,
            format!("{} may have at most {max} characters", field.name()),
            format!("{} 最多 {max} 个字符", field.name()),
        ));
    }
    if v.chars()
        .any(|c| is_hidden(c) || (c.is_control() && !(lines && matches!(c, '\n' | '\r' | '\t'))))
    {
        return Err(AppError::InvalidCharacters {
            field: field.name(),
        });
    }
    Ok(v.to_string())
}

/// Characters that change how the text around them is shown without being seen: the
/// bidirectional embeddings, overrides, isolates and marks (which can make `gpj.exe` read
/// `exe.jpg` in a list), zero-width spaces, word joiners and the byte-order mark. (Zero-width
/// joiners and non-joiners stay: emoji sequences and several scripts need them.)
pub fn is_hidden(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// `text` without control characters and hidden marks, for names made from free text (a
/// conversation's title from its first message).
pub fn visible(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .filter(|c| !is_hidden(*c))
        .collect()
}
