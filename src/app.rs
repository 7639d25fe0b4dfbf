//! `build_router(state)` and `serve(listener, …)`: every layer is added here (the layers
//! themselves are in `http::layers`).

use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::http::layers::{self, BodyRules};
use crate::http::{self, AppState};

/// The whole application.
pub fn build_router(state: AppState) -> Router {
    let max_body = state.config.server.max_body_bytes;
    let body = BodyRules {
        max_bytes: max_body,
        deadline: Duration::from_secs(state.config.server.body_timeout_secs),
    };
    // Requests other than answer streams must finish within the configured time (503 otherwise).
    let timeout = tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(state.config.server.request_timeout_secs),
    );
    let l = &state.config.limits;
    let key = state.clients.clone();
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
        .merge(http::account::router())
        .merge(http::waitlist::status_router())
        .merge(http::conversations::router())
        .merge(http::keys::router())
        .merge(http::openai::models_router())
        .merge(http::admin::router())
        .merge(http::pages::router())
        .fallback(layers::not_found)
        .layer(timeout)
        .layer(crate::limits::layer("api", api));
    // The paths that start an answer take their generation slot in the handler, once the whole
    // request has been read and checked (`http::chat::take_slot`).
    let answers = Router::new()
        .merge(http::openai::router())
        .merge(http::chat::router())
        .layer(crate::limits::layer("generate", generate));
    Router::new()
        .merge(
            http::accounts::auth_router()
                .merge(http::account::password_router())
                .layer(timeout)
                .layer(crate::limits::layer("auth", auth)),
        )
        .merge(
            http::waitlist::router()
                .layer(timeout)
                .layer(crate::limits::layer("waitlist", waitlist)),
        )
        .merge(answers)
        .merge(http::ops::router())
        .merge(general)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            http::auth::refuse_cross_site,
        ))
        .layer(middleware::from_fn_with_state(body, layers::read_body))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(
            max_body,
            layers::refuse_oversized,
        ))
        .layer(middleware::from_fn(layers::contract_errors))
        .layer(middleware::from_fn_with_state(
            state.secure_cookies(),
            layers::security_headers,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            layers::record_metrics,
        ))
        // 5xx answers are logged where they are made (AppError); a flood of shed 503s is not news.
        .layer(TraceLayer::new_for_http().on_failure(()))
        .with_state(state)
}

/// The paths that start an answer, as their routes are named.
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
    } else if one_segment(
        path.strip_prefix("/api/messages/")
            .and_then(|p| p.strip_suffix("/edit")),
    ) {
        Some("/api/messages/{id}/edit")
    } else {
        None
    }
}

/// The shed answer at its cheapest: while every generation slot is taken, a request to start an
/// answer is answered here, before the router and its middleware stack (and before its body is
/// read) — the same response the handler would give (503 overloaded, Retry-After, security
/// headers, metrics), for a fraction of the work, exactly when the service is busiest. (Under a flood on 2 cores the
/// middleware stack was most of the cost of each shed answer.)
fn shed_early<B>(state: &AppState, req: &axum::http::Request<B>) -> Option<Response> {
    if req.method() != axum::http::Method::POST || !state.answers.admission.is_full() {
        return None;
    }
    let route = generation_route(req.uri().path())?;
    let start = std::time::Instant::now();
    let mut resp = state.overloaded().into_response();
    state
        .answers
        .tally
        .outcome(crate::tally::Outcome::Overloaded);
    layers::add_security_headers(resp.headers_mut(), false, state.secure_cookies());
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
    let admission = state.answers.admission.clone();
    tokio::spawn(housekeeping(state.db.clone(), state.session_idle_ms()));
    crate::autoadmit::spawn(state.db.clone(), state.config.clone());
    let d = &state.config.dashboard;
    crate::dashboard::spawn_writer(
        state.db.clone(),
        state.answers.clone(),
        crate::secrets::token(),
        Duration::from_secs(d.write_secs),
        d.keep_days,
    );
    let header_timeout = Duration::from_secs(state.config.server.header_timeout_secs);
    let max_head = state.config.server.max_header_bytes;
    let early = state.clone();
    let router = build_router(state);
    // HTTP/1.1 with a header-read timeout: a client that trickles its request headers, or keeps
    // an idle connection open, is cut off after `server.header_timeout_secs`.
    // The read buffer bounds the request head: a larger one is answered 431.
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_head)
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

/// Every hour: ends expired sessions and forgets old sign-in failures, so neither table grows
/// without bound (a flood of failed sign-ins from many addresses leaves rows behind).
async fn housekeeping(db: crate::db::Db, idle_ms: i64) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let day_ago = crate::db::now_ms() - 86_400_000;
        if let Err(e) = crate::db::accounts::purge_sessions(&db, idle_ms).await {
            tracing::warn!("purging sessions failed: {e}");
        }
        if let Err(e) = crate::db::accounts::purge_login_failures(&db, day_ago).await {
            tracing::warn!("purging sign-in failures failed: {e}");
        }
    }
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
