//! The HTTP layer: one module per resource, each with its own `router()`. Handlers are thin:
//! extract, call into `db` / `engine`, map to a response.

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod chat;
pub mod conversations;
pub mod error;
pub mod keys;
pub mod openai;
pub mod ops;
pub mod pages;
pub mod waitlist;

use std::sync::Arc;

use axum::extract::FromRequest;
use serde::Deserialize;

use crate::config::Config;
use crate::db::Db;
use crate::inference::Inference;
pub use error::{AppError, AppResult};

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
    pub engine: Inference,
    pub policy: Arc<crate::policy::Policy>,
    pub admission: crate::admission::Admission,
    /// Tells running answers to stop and store what they have (set at shutdown).
    pub stopping: tokio::sync::watch::Receiver<bool>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl AppState {
    /// Builds the state: refusal rules from config, admission slots, the metrics recorder.
    pub fn new(
        db: Db,
        config: Arc<Config>,
        engine: Inference,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let policy = Arc::new(crate::policy::Policy::load(&config.refusals.rules_file)?);
        let l = &config.limits;
        let admission =
            crate::admission::Admission::new(l.max_running + l.max_waiting, l.per_user_answers);
        Ok(Self(Arc::new(Handles {
            db,
            config,
            engine,
            policy,
            admission,
            stopping,
            metrics: crate::metrics::handle(),
        })))
    }

    pub fn chat_deps(&self) -> crate::chat::ChatDeps {
        crate::chat::ChatDeps {
            db: self.db.clone(),
            config: self.config.clone(),
            engine: self.engine.clone(),
            policy: self.policy.clone(),
            stopping: self.stopping.clone(),
        }
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
                field: "body",
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
            "body",
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
                "body",
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
    if email.len() > 254 || !email_address::EmailAddress::is_valid(&email) || !email.contains('.') {
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

/// Runs argon2 off the async runtime.
pub async fn hash_password(password: String) -> AppResult<String> {
    tokio::task::spawn_blocking(move || crate::secrets::hash_password(&password))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(AppError::from)
}

pub async fn verify_password(password: String, hash: String) -> AppResult<bool> {
    tokio::task::spawn_blocking(move || crate::secrets::verify_password(&password, &hash))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))
}

/// `{"email": …}` bodies.
#[derive(Debug, Deserialize)]
pub struct EmailBody {
    pub email: String,
}

/// A text field of at most `max` characters after trimming.
pub fn bounded_text(field: &'static str, value: &str, max: usize) -> AppResult<String> {
    let v = value.trim();
    if v.chars().count() > max {
        return Err(AppError::invalid(
            field,
            format!("{field} may have at most {max} characters"),
            format!("{field} 最多 {max} 个字符"),
        ));
    }
    Ok(v.to_string())
}
