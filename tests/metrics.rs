//! Prometheus counters count what happened, exactly. Metrics are process-wide, so these checks
//! live in a test binary of their own with a single test: nothing else in the process can move a
//! counter between a "before" and an "after".

mod common;

use common::server::{Backend, Options, TestApp};
use serde_json::json;

const CHAT_ROUTE: &str = "route=\"/api/conversations/{id}/messages\",method=\"POST\"";

fn requests(status: u16) -> String {
    format!("moss_http_requests_total{{{CHAT_ROUTE},status=\"{status}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_count_what_this_process_did() {
    // A 429 from the sign-in bucket is counted once, under its bucket.
    let app = TestApp::start(
        Backend::Sqlite,
        Options {
            tight_limits: true,
            ..Options::default()
        },
    )
    .await
    .expect("SQLite always runs");
    let limited = "moss_rate_limited_total{bucket=\"auth\"}";
    assert_eq!(app.metric(limited).await, 0.0);
    let c = app.client();
    let login = json!({"email": "x@example.com", "password": "wrong password"});
    for _ in 0..app.config.limits.auth.burst {
        let r = c
            .post(app.url("/api/login"))
            .json(&login)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = c
        .post(app.url("/api/login"))
        .json(&login)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(app.metric(limited).await, 1.0);
    drop(app);

    // One running answer and one waiting at most; answers are slow enough to overlap.
    let app = TestApp::start(
        Backend::Sqlite,
        Options {
            token_delay_ms: 40,
            configure: Some(|c| {
                c.limits.max_running = 1;
                c.limits.max_waiting = 1;
            }),
            ..Options::default()
        },
    )
    .await
    .expect("SQLite always runs");
    let m = app.client().get(app.url("/metrics")).send().await.unwrap();
    assert!(m.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));

    // An answer: its tokens and its request, counted once each.
    let tokens = "moss_tokens_generated_total";
    let (tokens_before, ok_before) = (app.metric(tokens).await, app.metric(&requests(200)).await);
    let a = app.user("a@example.com").await;
    let conv = app.conversation(&a).await;
    let (status, events) = app
        .chat(&a, conv, json!({"content": "hello", "max_tokens": 3}))
        .await;
    assert_eq!(status, 200, "{events:?}");
    let done = &events.last().unwrap().1;
    let made = done["usage"]["completion_tokens"].as_f64().unwrap();
    assert!(made >= 1.0, "{done}");
    assert_eq!(app.metric(tokens).await - tokens_before, made);
    assert_eq!(app.metric(&requests(200)).await - ok_before, 1.0);
    let text = app
        .client()
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "moss_http_request_duration_seconds_bucket",
        "moss_engine_queue_depth",
        "moss_generations_running",
        "moss_time_to_first_token_seconds_bucket",
        "moss_draft_tokens_total",
        "moss_draft_accepted_tokens_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }

    // One answer runs, one waits, the third is shed: one shed, one 503, nothing more.
    let shed = "moss_shed_total{reason=\"overloaded\"}";
    assert_eq!(app.metric(shed).await, 0.0);
    let unavailable_before = app.metric(&requests(503)).await;
    let (b, c) = (
        app.user("b@example.com").await,
        app.user("c@example.com").await,
    );
    let (_held, r) = app.fill_the_line(&a, &b, &c).await;
    assert_eq!(r.status(), 503);
    assert_eq!(app.metric(shed).await, 1.0);
    assert_eq!(app.metric(&requests(503)).await - unavailable_before, 1.0);
}
