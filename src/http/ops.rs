//! Liveness and readiness for load balancers and orchestrators.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `/readyz`'s last answer. Load balancers call it often and it is never rate-limited, so
/// callers within `READY_FOR` of a probe share it (one probe at a time; the others wait for it)
/// instead of each pinging the database and the upstreams.
#[derive(Default)]
pub struct ReadinessCache(
    tokio::sync::Mutex<Option<(std::time::Instant, bool, Value)>>,
    std::sync::atomic::AtomicU64,
);

const READY_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Ready when the database answers and answers can be made: a local model is loaded before the
/// server starts listening; in upstream mode at least one upstream must answer.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let mut last = state.readiness.0.lock().await;
    let (ready, detail) = match &*last {
        Some((at, ready, detail)) if at.elapsed() < READY_FOR => (*ready, detail.clone()),
        _ => {
            let (ready, detail) = probe(&state).await;
            *last = Some((std::time::Instant::now(), ready, detail.clone()));
            (ready, detail)
        }
    };
    drop(last);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(detail))
}

async fn probe(state: &AppState) -> (bool, Value) {
    // Numbered, so that callers can tell a shared answer from a fresh one.
    let n = state
        .readiness
        .1
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    let wait = std::time::Duration::from_secs(3);
    let (db, inference) = tokio::join!(
        async {
            tokio::time::timeout(wait, state.db.ping())
                .await
                .unwrap_or(false)
        },
        state.answers.backend.readiness()
    );
    let detail = json!({"database": db, "model": state.answers.backend.model_id(), "inference": inference.detail, "probe": n});
    (db && inference.ready, detail)
}

/// Prometheus text format.
async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    metrics::gauge!("moss_engine_queue_depth").set(state.answers.backend.load() as f64);
    metrics::gauge!("moss_admitted_answers").set(state.answers.admission.in_use() as f64);
    let stats = state.answers.backend.stats();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    metrics::counter!("moss_draft_tokens_total").absolute(count(&stats.draft_tokens));
    metrics::counter!("moss_draft_accepted_tokens_total").absolute(count(&stats.draft_accepted));
    if let Some(m) = state.answers.backend.gpu_memory() {
        metrics::gauge!("moss_gpu_memory_used_bytes").set((m.total - m.free) as f64);
        metrics::gauge!("moss_gpu_memory_total_bytes").set(m.total as f64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}
