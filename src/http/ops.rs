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

/// Ready when the database answers and answers can be made: a local model is loaded before the
/// server starts listening; in upstream mode at least one upstream must answer.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let wait = std::time::Duration::from_secs(3);
    let (db, inference) = tokio::join!(
        async {
            tokio::time::timeout(wait, state.db.ping())
                .await
                .unwrap_or(false)
        },
        state.engine.readiness()
    );
    let status = if db && inference.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({"database": db, "model": state.engine.model_id(), "inference": inference.detail}),
        ),
    )
}

/// Prometheus text format.
async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    metrics::gauge!("moss_engine_queue_depth").set(state.engine.load() as f64);
    metrics::gauge!("moss_admitted_answers").set(state.admission.in_use() as f64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}
