//! One error type for every handler. Its variants say what the client should hear; the body is
//! the documented `{"error": {"code", "message", "message_zh"}}`. 5xx are logged, never detailed.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("unauthenticated")]
    Unauthenticated,
    /// A missing, unknown or revoked API key (401).
    #[error("invalid api key")]
    InvalidApiKey,
    #[error("forbidden")]
    Forbidden,
    #[error("cross-site request refused")]
    CrossSite,
    #[error("not found")]
    NotFound,
    #[error("invalid email")]
    InvalidEmail,
    #[error("invalid invite")]
    InvalidInvite,
    #[error("email taken")]
    EmailTaken,
    #[error("weak password")]
    WeakPassword { min: usize },
    #[error("password too long")]
    PasswordTooLong,
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("invalid token")]
    InvalidToken,
    /// A field has the wrong shape (422), with English and Chinese texts.
    #[error("invalid {}", field.name())]
    Invalid {
        field: Field,
        message: String,
        message_zh: String,
    },
    /// The body is not the JSON this path takes (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("payload too large")]
    PayloadTooLarge,
    /// The message (or the conversation with it) is longer than allowed (422).
    #[error("prompt too long")]
    PromptTooLong { max_chars: usize },
    /// Too many refused requests lately (429).
    #[error("cooldown")]
    Cooldown { retry_after_secs: u64 },
    /// The generation queue is full or the daily budget spent (503, try again tomorrow morning);
    /// `retry_at` is the HTTP-date of the reopening.
    #[error("overloaded")]
    Overloaded { retry_at: String },
    /// The account has an answer in progress already (429, Retry-After: 1).
    #[error("busy")]
    Busy,
    /// The account's daily tokens are spent (429, Retry-After until the reset).
    #[error("quota exceeded")]
    QuotaExceeded { retry_after_secs: u64 },
    /// Every password-hashing thread stayed busy for the whole wait, or this client already has
    /// its share of checks in progress (503, Retry-After: 2).
    #[error("password checks are busy")]
    PasswordChecksBusy,
    /// The body did not arrive within `server.body_timeout_secs` (408; the connection is closed).
    #[error("request timeout")]
    RequestTimeout,
    /// A text field holds control or bidirectional-formatting characters (422).
    #[error("invalid characters in {field}")]
    InvalidCharacters { field: &'static str },
    /// The database did not answer in time (503).
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(m) => AppError::Unavailable(m),
            other => AppError::Internal(other.to_string()),
        }
    }
}

impl From<anyhow::Error> for AppError {
    fn from(e: anyhow::Error) -> Self {
        AppError::Internal(format!("{e:#}"))
    }
}

impl From<JsonRejection> for AppError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => AppError::UnsupportedMediaType,
            r if r.status() == StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge,
            JsonRejection::JsonDataError(e) => AppError::Invalid {
                field: Field::Body,
                message: e.body_text(),
                message_zh: "请求内容的字段缺失或类型不对。".into(),
            },
            other => AppError::BadRequest(other.body_text()),
        }
    }
}

/// The field a 422 is about; each has its error code (`invalid_<field>`), the API's less common
/// parameters share `invalid_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Body,
    Title,
    Rating,
    Comment,
    Count,
    Uses,
    ExpiresInDays,
    Name,
    Note,
    DisplayName,
    Content,
    Temperature,
    MaxTokens,
    Message,
    Locale,
    /// The search words.
    Query,
    /// An API parameter without a code of its own (`messages`, `top_p`, `stop`, `n`).
    Request(&'static str),
}

impl Field {
    /// How the field is called in the request.
    pub fn name(self) -> &'static str {
        match self {
            Field::Body => "body",
            Field::Title => "title",
            Field::Rating => "rating",
            Field::Comment => "comment",
            Field::Count => "count",
            Field::Uses => "uses",
            Field::ExpiresInDays => "expires_in_days",
            Field::Name => "name",
            Field::Note => "note",
            Field::DisplayName => "display_name",
            Field::Content => "content",
            Field::Temperature => "temperature",
            Field::MaxTokens => "max_tokens",
            Field::Message => "message",
            Field::Locale => "locale",
            Field::Query => "q",
            Field::Request(name) => name,
        }
    }

    /// The error code a client matches on.
    pub fn code(self) -> &'static str {
        match self {
            Field::Body => "invalid_body",
            Field::Title => "invalid_title",
            Field::Rating => "invalid_rating",
            Field::Comment => "invalid_comment",
            Field::Count => "invalid_count",
            Field::Name => "invalid_name",
            Field::DisplayName => "invalid_display_name",
            Field::Content => "invalid_content",
            Field::Temperature => "invalid_temperature",
            Field::MaxTokens => "invalid_max_tokens",
            Field::Message => "invalid_message",
            Field::Locale => "invalid_locale",
            Field::Query => "invalid_query",
            Field::Uses | Field::ExpiresInDays | Field::Note | Field::Request(_) => {
                "invalid_request"
            }
        }
    }
}

impl AppError {
    pub fn invalid(
        field: Field,
        message: impl Into<String>,
        message_zh: impl Into<String>,
    ) -> Self {
        AppError::Invalid {
            field,
            message: message.into(),
            message_zh: message_zh.into(),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, String, String) {
        use AppError::*;
        let s = |x: &str| x.to_string();
        match self {
            Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated", s("Please sign in."), s("请先登录。")),
            InvalidApiKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                s("The API key is missing, unknown or revoked."),
                s("API 密钥缺失、无效或已撤销。"),
            ),
            Forbidden => (StatusCode::FORBIDDEN, "forbidden", s("You may not do this."), s("你没有权限执行此操作。")),
            CrossSite => (
                StatusCode::FORBIDDEN,
                "forbidden",
                s("Cross-site requests are not accepted."),
                s("不接受跨站请求。"),
            ),
            NotFound => (StatusCode::NOT_FOUND, "not_found", s("Not found."), s("未找到。")),
            InvalidEmail => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_email",
                s("Please enter a valid e-mail address."),
                s("请输入有效的电子邮件地址。"),
            ),
            InvalidInvite => (
                StatusCode::BAD_REQUEST,
                "invalid_invite",
                s("This invite code is not valid (unknown, used up, expired or revoked)."),
                s("此邀请码无效（不存在、已用完、已过期或已撤销）。"),
            ),
            EmailTaken => (
                StatusCode::CONFLICT,
                "email_taken",
                s("An account with this e-mail address already exists: sign in, or reset the password. The invite code has been used up by this attempt."),
                s("该电子邮件地址已注册：请直接登录或重置密码。本次尝试已用掉该邀请码。"),
            ),
            WeakPassword { min } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "weak_password",
                format!("The password needs at least {min} characters."),
                format!("密码至少需要 {min} 个字符。"),
            ),
            PasswordTooLong => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "password_too_long",
                s("The password may have at most 1024 characters."),
                s("密码最多 1024 个字符。"),
            ),
            InvalidCredentials => (
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                s("Wrong e-mail or password, or too many failed attempts: check them, or wait a few minutes."),
                s("邮箱或密码错误，或失败次数过多：请检查后重试，或等几分钟。"),
            ),
            InvalidToken => (
                StatusCode::BAD_REQUEST,
                "invalid_token",
                s("This link is not valid any more (unknown, used or expired)."),
                s("此链接已失效（不存在、已使用或已过期）。"),
            ),
            Invalid {
                field,
                message,
                message_zh,
            } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                field.code(),
                message.clone(),
                message_zh.clone(),
            ),
            BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m.clone(), s("请求格式错误。")),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                s("Send JSON with Content-Type: application/json."),
                s("请以 application/json 格式发送。"),
            ),
            PromptTooLong { max_chars } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "prompt_too_long",
                if *max_chars > 0 { format!("The message may have at most {max_chars} characters.") } else { s("The message is too long for the model's context window.") },
                if *max_chars > 0 { format!("消息最多 {max_chars} 个字符。") } else { s("消息太长，超出了模型的上下文长度。") },
            ),
            Cooldown { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "cooldown",
                s("Several of your recent requests were refused. Please wait a few minutes before asking again."),
                s("你最近的多个请求被拒绝，请稍等几分钟再提问。"),
            ),
            Busy => (
                StatusCode::TOO_MANY_REQUESTS,
                "busy",
                s("You already have an answer in progress. Please wait for it to finish."),
                s("你已有一个回答正在生成，请等它完成。"),
            ),
            QuotaExceeded { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                s("You have used today's quota. It resets at midnight."),
                s("你今天的额度已用完，将在午夜重置。"),
            ),
            Overloaded { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                s("The server is overloaded, please try again tomorrow morning."),
                s("服务器流量过载，请明天上午重试"),
            ),
            PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                s("The request is too large."),
                s("请求内容过大。"),
            ),
            PasswordChecksBusy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                s("Too many sign-ins at this moment, please try again in a few seconds."),
                s("当前登录请求过多，请几秒后重试。"),
            ),
            RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                s("The request body did not arrive in time."),
                s("请求内容未能及时送达。"),
            ),
            InvalidCharacters { field } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_characters",
                format!("{field} must not contain control or text-direction characters."),
                format!("{field} 不能包含控制字符或文字方向字符。"),
            ),
            Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                s("The service is temporarily unavailable, please try again shortly."),
                s("服务暂时不可用，请稍后重试。"),
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                s("Something went wrong on our side."),
                s("服务器内部错误。"),
            ),
        }
    }
}

/// The contract's error body.
pub fn error_body(status: StatusCode, code: &str, message: &str, message_zh: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message, "message_zh": message_zh}});
    (status, axum::Json(body)).into_response()
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        self.respond(error_body)
    }
}

impl AppError {
    /// The response for this error with its body in the shape `body` writes (the contract's, or
    /// OpenAI's for /v1): logging, metrics and headers (Retry-After, x-should-retry) are shared.
    pub fn respond(self, body: impl FnOnce(StatusCode, &str, &str, &str) -> Response) -> Response {
        let (status, code, message, message_zh) = self.parts();
        match &self {
            AppError::Overloaded { .. } => {
                metrics::counter!("moss_shed_total", "reason" => "overloaded").increment(1)
            }
            AppError::Busy => metrics::counter!("moss_shed_total", "reason" => "busy").increment(1),
            AppError::QuotaExceeded { .. } => {
                metrics::counter!("moss_shed_total", "reason" => "quota").increment(1)
            }
            AppError::Internal(detail) => tracing::error!(%detail, "internal error"),
            AppError::Unavailable(detail) => tracing::warn!(%detail, "database unavailable"),
            _ => {}
        }
        let mut resp = body(status, code, &message, &message_zh);
        let h = resp.headers_mut();
        match &self {
            AppError::Cooldown { retry_after_secs } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            AppError::Overloaded { retry_at } => {
                if let Ok(v) = HeaderValue::from_str(retry_at) {
                    h.insert(header::RETRY_AFTER, v);
                }
                h.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            AppError::Busy => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            AppError::PasswordChecksBusy => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            AppError::RequestTimeout => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            AppError::QuotaExceeded { retry_after_secs } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from((*retry_after_secs).max(1)),
                );
            }
            _ if status == StatusCode::SERVICE_UNAVAILABLE => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        resp
    }
}

pub type AppResult<T> = Result<T, AppError>;
