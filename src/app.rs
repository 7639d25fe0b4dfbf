//! `build_router(state)` and `serve(listener, …)`: every layer is added here.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;

use crate::http::error::error_body;
use crate::http::{self, AppState};

/// The whole application.
pub fn build_router(state: AppState) -> Router {
    let max_body = state.config.server.max_body_bytes;
    // Requests other than answer streams must finish within the configured time (503 otherwise).
    let timeout = tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(state.config.server.request_timeout_secs),
    );
    let l = &state.config.limits;
    let trusted = l
        .trusted_proxies
        .iter()
        .filter_map(|p| {
            crate::limits::Net::parse(p)
                .map_err(|e| tracing::error!("{e}"))
                .ok()
        })
        .collect();
    let key = crate::limits::ClientKey {
        trusted: std::sync::Arc::new(trusted),
    };
    let (auth, waitlist, generate, api) = (
        crate::limits::config(l.auth, &key),
        crate::limits::config(l.waitlist, &key),
        crate::limits::config(l.generate, &key),
        crate::limits::config(l.api, &key),
    );
    crate::limits::spawn_cleanup(vec![
        auth.clone(),
        waitlist.clone(),
        generate.clone(),
        api.clone(),
    ]);
    // Each group of paths draws on its own bucket; health checks and metrics on none.
    let general = Router::new()
        .merge(http::accounts::router())
        .merge(http::waitlist::status_router())
        .merge(http::conversations::router())
        .merge(http::keys::router())
        .merge(http::openai::models_router())
        .merge(http::admin::router())
        .merge(http::pages::router())
        .fallback(not_found)
        .layer(timeout)
        .layer(crate::limits::layer("api", api));
    Router::new()
        .merge(
            http::accounts::auth_router()
                .layer(timeout)
                .layer(crate::limits::layer("auth", auth)),
        )
        .merge(
            http::waitlist::router()
                .layer(timeout)
                .layer(crate::limits::layer("waitlist", waitlist)),
        )
        .merge(
            http::openai::router()
                .route_layer(middleware::from_fn_with_state(state.clone(), reserve_slot))
                .layer(crate::limits::layer("generate", generate.clone())),
        )
        .merge(
            http::chat::router()
                .route_layer(middleware::from_fn_with_state(state.clone(), reserve_slot))
                .layer(crate::limits::layer("generate", generate)),
        )
        .merge(http::ops::router())
        .merge(general)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            http::auth::refuse_cross_site,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(middleware::from_fn_with_state(max_body, refuse_oversized))
        .layer(middleware::from_fn(contract_errors))
        .layer(middleware::from_fn(security_headers))
        .layer(middleware::from_fn(record_metrics))
        // 5xx answers are logged where they are made (AppError); a flood of shed 503s is not news.
        .layer(TraceLayer::new_for_http().on_failure(()))
        .with_state(state)
}

async fn not_found(req: Request) -> Response {
    if wants_json(req.uri().path()) {
        http::AppError::NotFound.into_response()
    } else {
        http::pages::page(
            StatusCode::NOT_FOUND,
            "message.html",
            minijinja::context! { title => "Not found", title_zh => "页面不存在", text => "There is no page here.", text_zh => "这里没有页面。" },
        )
    }
}

fn wants_json(path: &str) -> bool {
    path.starts_with("/api/") || path.starts_with("/v1/") || matches!(path, "/readyz" | "/healthz")
}

/// The first thing a request for an answer does is take a generation slot, before any other work
/// (no session lookup, no database): when every slot is taken the shed answer is immediate, exactly
/// when the service is busiest. The handler claims the slot for the account (or drops it).
async fn reserve_slot(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    match state.admission.try_slot() {
        Ok(slot) => {
            req.extensions_mut()
                .insert(crate::admission::SlotCell::new(slot));
            next.run(req).await
        }
        Err(_) => state.overloaded().into_response(),
    }
}

/// Requests by route and status, and their latency.
async fn record_metrics(req: Request, next: Next) -> Response {
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
    let status = resp.status().as_u16().to_string();
    metrics::counter!("moss_http_requests_total", "route" => route.clone(), "method" => method, "status" => status).increment(1);
    metrics::histogram!("moss_http_request_duration_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// Answers made by layers or by axum itself (405, 413, a failed extractor) speak the contract's
/// JSON error format on API paths too.
async fn contract_errors(req: Request, next: Next) -> Response {
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
async fn refuse_oversized(
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
            http::AppError::PayloadTooLarge.into_response()
        }
        _ => next.run(req).await,
    }
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
    let mut page = http::pages::page(
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

/// SECURITY.md 9: a strict CSP (no inline script, no foreign images), nosniff, no referrer (links
/// carry private tokens), no framing, and no caching of anything but static files.
async fn security_headers(req: Request, next: Next) -> Response {
    let is_static = req.uri().path().starts_with("/static/");
    let mut resp = next.run(req).await;
    add_security_headers(resp.headers_mut(), is_static);
    resp
}

fn add_security_headers(h: &mut axum::http::HeaderMap, is_static: bool) {
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
    if !is_static {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

/// The paths that start an answer (each behind `reserve_slot`), as their routes are named.
fn generation_route(path: &str) -> Option<&'static str> {
    let one_segment = |p: Option<&str>| p.is_some_and(|id| !id.is_empty() && !id.contains('/'));
    if path == "/v1/chat/completions" {
        Some("/v1/chat/completions")
    } else if one_segment(
        path.strip_prefix("/api/conversations/")
            .and_then(|p| p.strip_suffix("/messages")),
    ) {
        Some("/api/conversations/{id}/messages")
    } else if one_segment(
        path.strip_prefix("/api/messages/")
            .and_then(|p| p.strip_suffix("/regenerate")),
    ) {
        Some("/api/messages/{id}/regenerate")
    } else {
        None
    }
}

/// The shed answer at its cheapest: while every generation slot is taken, a request to start an
/// answer is answered here, before the router and its middleware stack — the same response
/// `reserve_slot` would give (503 overloaded, Retry-After, security headers, metrics), for a
/// fraction of the work, exactly when the service is busiest. (Under a flood on 2 cores the
/// middleware stack was most of the cost of each shed answer.)
fn shed_early<B>(state: &AppState, req: &axum::http::Request<B>) -> Option<Response> {
    if req.method() != axum::http::Method::POST || !state.admission.is_full() {
        return None;
    }
    let route = generation_route(req.uri().path())?;
    let start = std::time::Instant::now();
    let mut resp = state.overloaded().into_response();
    add_security_headers(resp.headers_mut(), false);
    metrics::counter!("moss_http_requests_total", "route" => route, "method" => "POST", "status" => "503").increment(1);
    metrics::histogram!("moss_http_request_duration_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    Some(resp)
}

/// Serves until `shutdown` resolves. Then no new connection is accepted; open requests get
/// `grace` to finish; after that, running answers are told to stop (each stores what it has as
/// `cancelled`), and the process waits a little for those writes before returning.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
    stop_answers: tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let admission = state.admission.clone();
    let header_timeout = Duration::from_secs(state.config.server.header_timeout_secs);
    let early = state.clone();
    let router = build_router(state);
    // HTTP/1.1 with a header-read timeout: a client that trickles its request headers, or keeps
    // an idle connection open, is cut off after `server.header_timeout_secs` (SECURITY.md 12).
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (router, early) = (router.clone(), early.clone());
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let shed = shed_early(&early, &req);
            let router = router.clone();
            async move {
                if let Some(resp) = shed {
                    return Ok(resp);
                }
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(router, req).await
            }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener); // stop accepting: new connections are refused
    let connections = graceful.shutdown();
    tokio::pin!(connections);
    let timed_out = tokio::time::timeout(grace, &mut connections).await.is_err();
    // Past the grace period, or with connections gone but an answer whose client left still
    // being stored: running answers are told to stop and store what they have.
    if timed_out || !admission.drained(Duration::from_secs(5)).await {
        tracing::warn!("stopping running answers");
        let _ = stop_answers.send(true);
        if !admission.drained(Duration::from_secs(5)).await {
            tracing::warn!("some answers did not finish storing in time");
        }
    }
    if timed_out {
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut connections).await;
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
