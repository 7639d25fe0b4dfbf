//! The middleware every request passes through, outermost first in `app::build_router`: metrics,
//! security headers, the contract's error bodies, the body-size limit, reading the whole body
//! (with a deadline, JSON only), and the cross-site write check (`auth::refuse_cross_site`).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::error::error_body;
use super::{AppError, AppState};

pub async fn not_found(req: Request) -> Response {
    if wants_json(req.uri().path()) {
        AppError::NotFound.into_response()
    } else {
        super::pages::page(
            StatusCode::NOT_FOUND,
            "message.html",
            minijinja::context! { title => "Not found", title_zh => "页面不存在", text => "There is no page here.", text_zh => "这里没有页面。" },
        )
    }
}

/// Paths whose errors are JSON (the contract's body); other paths are pages.
pub fn wants_json(path: &str) -> bool {
    path.starts_with("/api/") || path.starts_with("/v1/") || matches!(path, "/readyz" | "/healthz")
}

/// Requests by route and status, and their latency.
pub async fn record_metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| {
            if req.uri().path().starts_with("/static/") {
                "/static/{*path}".into()
            } else {
                "unmatched".into()
            }
        });
    let method = req.method().to_string();
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    if let Some(outcome) = resp.extensions().get::<crate::tally::Outcome>() {
        state.answers.tally.outcome(*outcome);
    }
    let status = resp.status().as_u16().to_string();
    metrics::counter!("moss_http_requests_total", "route" => route.clone(), "method" => method, "status" => status).increment(1);
    metrics::histogram!("moss_http_request_duration_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// Answers made by layers or by axum itself (405, 413, a failed extractor) speak the contract's
/// JSON error format on API paths too.
pub async fn contract_errors(req: Request, next: Next) -> Response {
    let api = wants_json(req.uri().path());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !api
        && is_json
        && (status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE)
    {
        return busy_page(resp).await;
    }
    if !api || status.as_u16() < 400 || is_json {
        return resp;
    }
    let (code, message, message_zh) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "This method is not allowed here.",
            "此路径不支持该请求方法。",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "The request is too large.",
            "请求内容过大。",
        ),
        StatusCode::NOT_FOUND => ("not_found", "Not found.", "未找到。"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "Send JSON with Content-Type: application/json.",
            "请以 application/json 格式发送。",
        ),
        s if s.is_server_error() => (
            "internal",
            "Something went wrong on our side.",
            "服务器内部错误。",
        ),
        _ => ("bad_request", "The request is not valid.", "请求无效。"),
    };
    let mut fixed = error_body(status, code, message, message_zh);
    for (k, v) in resp.headers() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(k.clone(), v.clone());
        }
    }
    fixed
}

/// Bodies announced larger than the limit are read and thrown away (up to a bound) before the 413
/// goes out: closing a socket with unread data makes the client see a reset instead of the answer.
pub async fn refuse_oversized(
    axum::extract::State(max): axum::extract::State<usize>,
    req: Request,
    next: Next,
) -> Response {
    const DRAIN_CAP: usize = 8 << 20;
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    match announced {
        Some(n) if n > max => {
            if n <= DRAIN_CAP {
                let body = req.into_body();
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    axum::body::to_bytes(body, DRAIN_CAP),
                )
                .await;
            }
            AppError::PayloadTooLarge.into_response()
        }
        _ => next.run(req).await,
    }
}

/// How much body a request may send, and how long it may take once the headers are in.
#[derive(Debug, Clone, Copy)]
pub struct BodyRules {
    pub max_bytes: usize,
    pub deadline: Duration,
}

/// Reads the whole request body before anything else happens to the request: a body still on
/// its way holds no generation slot, no password check and no database connection, only its own
/// socket, and only for `deadline` (then `408` and the connection is closed). A body that is not
/// empty must be JSON (`415` otherwise): no route takes forms or plain text, which a foreign page
/// could send without asking.
pub async fn read_body(State(rules): State<BodyRules>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(rules.deadline, collect(body, rules.max_bytes)).await {
        Err(_) => return AppError::RequestTimeout.into_response(),
        Ok(Err(e)) => return e.into_response(),
        Ok(Ok(bytes)) => bytes,
    };
    if !bytes.is_empty() && !is_json(&parts.headers) {
        return AppError::UnsupportedMediaType.into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn collect(body: Body, max: usize) -> Result<Bytes, AppError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| AppError::BadRequest("the request body broke off".into()))?;
        if buf.len() + chunk.len() > max {
            return Err(AppError::PayloadTooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// `application/json` or any `…+json`, parameters (charset) allowed.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .is_some_and(|t| {
            t == "application/json" || (t.starts_with("application/") && t.ends_with("+json"))
        })
}

/// A browser navigating to a page while the service is over capacity gets a small page with the
/// same words as the JSON error (and the same status and Retry-After).
async fn busy_page(resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let text = v["error"]["message"]
        .as_str()
        .unwrap_or("Please try again later.")
        .to_string();
    let text_zh = v["error"]["message_zh"]
        .as_str()
        .unwrap_or("请稍后重试。")
        .to_string();
    let mut page = super::pages::page(
        parts.status,
        "message.html",
        minijinja::context! { title => "Please try again later", title_zh => "请稍后再试", text, text_zh },
    );
    if let Some(retry) = parts.headers.get(header::RETRY_AFTER) {
        page.headers_mut()
            .insert(header::RETRY_AFTER, retry.clone());
    }
    page
}

/// A strict CSP (no inline script, no foreign images), nosniff, no referrer
/// (links carry private tokens), no framing, no caching of anything but static files, and HSTS
/// when the service is reached over https (`server.public_url`).
pub async fn security_headers(State(https): State<bool>, req: Request, next: Next) -> Response {
    let is_static = req.uri().path().starts_with("/static/");
    let mut resp = next.run(req).await;
    add_security_headers(resp.headers_mut(), is_static, https);
    resp
}

pub fn add_security_headers(h: &mut HeaderMap, is_static: bool, https: bool) {
    let csp = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
               object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if https {
        // Two years; subdomains are the operator's to decide, so they are not included.
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=63072000"),
        );
    }
    if !is_static {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}
