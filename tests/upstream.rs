//! `engine.backend = "openai"`: moss in front of another moss (built-in engine, tiny model) as
//! its OpenAI-compatible upstream, reached through a TCP relay the test can cut ("the upstream
//! stops") and restore ("it starts again"). The downstream runs on SQLite and on PostgreSQL.

mod common;

use std::time::Duration;

use common::proxy::DbProxy as Relay;
use common::server::{parse_sse, Backend, Options, TestApp, UpstreamOptions};
use serde_json::{json, Value};

/// Metrics are process-wide: the tests of this file take turns so their counters are their own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The upstream: a moss with the local engine, slowed so an answer can be cut short.
async fn upstream_moss() -> (TestApp, String) {
    upstream_moss_with(None).await
}

/// `upstream_moss` with its configuration changed by `configure`.
async fn upstream_moss_with(configure: Option<fn(&mut moss::config::Config)>) -> (TestApp, String) {
    let up = TestApp::start(
        Backend::Sqlite,
        Options {
            token_delay_ms: 25,
            configure,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = up.user("operator@example.com").await;
    let key = up.api_key(&c).await;
    (up, key)
}

fn through(urls: Vec<String>, api_key: &str, response_timeout_secs: u64) -> Options {
    Options {
        upstream: Some(UpstreamOptions {
            urls,
            api_key: api_key.into(),
            response_timeout_secs,
        }),
        ..Default::default()
    }
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let r = app.client().get(app.url("/readyz")).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: {text}"));
    (status, body)
}

/// The admin's live view of a server's backend (this server only: the process-wide Prometheus
/// counters also count what other tests in this process do).
async fn backend_load(app: &TestApp, admin: &reqwest::Client) -> Value {
    let stats: Value = admin
        .get(app.url("/api/admin/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut load = stats["backend"].clone();
    load["admitted_answers"] = stats["admitted_answers"].clone();
    load
}

/// Requests each upstream URL could not take (`skipped`) or refused, summed over the URLs.
async fn upstream_failures(app: &TestApp, admin: &reqwest::Client, kind: &str) -> u64 {
    let load = backend_load(app, admin).await;
    load["upstream"]
        .as_array()
        .expect("an upstream backend")
        .iter()
        .map(|t| t[kind].as_u64().unwrap())
        .sum()
}

fn answer_text(events: &[(String, Value)]) -> String {
    events
        .iter()
        .filter(|(e, _)| e == "token")
        .map(|(_, d)| d["text"].as_str().unwrap())
        .collect()
}

const LONG: u32 = 80;

async fn answers_come_from_the_upstream(backend: Backend) {
    let _turn = SERIAL.lock().await;
    let (up, key) = upstream_moss().await;
    let relay = Relay::start(up.base.trim_start_matches("http://").parse().unwrap()).await;
    let Some(down) = TestApp::start(
        backend,
        through(vec![format!("http://{}/v1", relay.addr)], &key, 5),
    )
    .await
    else {
        return;
    };
    let (status, ready) = readyz(&down).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["inference"]["backend"], "openai");
    assert_eq!(ready["inference"]["upstream"][0]["up"], true, "{ready}");

    // A streamed browser answer arrives through the upstream, token by token, and is stored.
    let alice = down.user("alice@example.com").await;
    let conv = down.conversation(&alice).await;
    let ask = json!({"content": "hello", "temperature": 0, "max_tokens": LONG});
    let (status, events) = down.chat(&alice, conv, ask.clone()).await;
    assert_eq!(status, 200, "{events:?}");
    let done = &events.last().unwrap().1;
    assert_eq!(events.last().unwrap().0, "done", "{events:?}");
    assert_eq!(
        done["finish_reason"], "length",
        "greedy answer runs to max_tokens"
    );
    assert_eq!(
        done["usage"]["completion_tokens"], LONG,
        "token counts come from the upstream"
    );
    assert!(done["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let tokens = events.iter().filter(|(e, _)| e == "token").count();
    assert!(tokens > 10, "streamed in pieces: {tokens}");
    let text = answer_text(&events);
    let stored = down.messages(&alice, conv).await;
    assert_eq!(stored.last().unwrap()["content"], text.as_str());
    assert_eq!(stored.last().unwrap()["role"], "assistant");

    // It is the upstream's answer: asking the upstream directly as the downstream does (the
    // downstream's system prompt as a system message, which the upstream adds after its own)
    // gives the same greedy text.
    let system = down.config.engine.system_prompt.clone();
    let direct: Value = reqwest::Client::new()
        .post(up.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "tiny", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": LONG}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(direct["choices"][0]["message"]["content"], text.as_str());

    // The downstream's own OpenAI-compatible API goes through the upstream too.
    let r = alice
        .post(down.url("/api/keys"))
        .json(&json!({"name": "cli"}))
        .send()
        .await
        .unwrap();
    let own_key = r.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let api: Value = reqwest::Client::new()
        .post(down.url("/v1/chat/completions"))
        .bearer_auth(&own_key)
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": LONG}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(api["model"], "tiny");

    // Stop mid-answer: the upstream connection is closed and the upstream stops.
    let up_admin = up.admin("ops@example.com").await;
    let generated = |l: Value| l["tokens_generated"].as_u64().unwrap();
    let before = generated(backend_load(&up, &up_admin).await);
    let conv2 = down.conversation(&alice).await;
    let url = down.url(&format!("/api/conversations/{conv2}/messages"));
    let mut r = alice.post(url).json(&ask).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut seen = String::new();
    while !seen.contains("event: token") {
        let chunk = r.chunk().await.unwrap().expect("stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let stop = alice
        .post(down.url(&format!("/api/conversations/{conv2}/stop")))
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 204);
    let ended = r.text().await.unwrap();
    assert!(ended.contains("\"finish_reason\":\"cancelled\""), "{ended}");
    let mut load = Value::Null;
    for _ in 0..100 {
        load = backend_load(&up, &up_admin).await;
        if load["admitted_answers"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        load["admitted_answers"], 0,
        "the upstream let go of the answer"
    );
    let spent = generated(load) - before;
    assert!(
        spent < LONG as u64,
        "the upstream stopped early ({spent} of {LONG} tokens)"
    );
    // Stored before the stream ended.
    let last = down.messages(&alice, conv2).await.last().cloned().unwrap();
    assert_eq!(
        last["finish_reason"], "cancelled",
        "partial answer kept: {last}"
    );

    // The upstream stops: the overloaded answer, at once, and /readyz says so.
    relay.cut();
    let conv3 = down.conversation(&alice).await;
    let r = alice
        .post(down.url(&format!("/api/conversations/{conv3}/messages")))
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .ends_with("GMT"));
    assert_eq!(r.headers()["x-should-retry"], "false");
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "overloaded", "{err}");
    assert!(
        down.messages(&alice, conv3).await.is_empty(),
        "the question nothing answered is taken back"
    );
    let (status, ready) = readyz(&down).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["inference"]["upstream"][0]["up"], false);
    // A regenerate refused for the same reason keeps the answer it would have replaced.
    let old = down.messages(&alice, conv).await.last().cloned().unwrap();
    let r = alice
        .post(down.url(&format!("/api/messages/{}/regenerate", old["id"])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        down.messages(&alice, conv).await.last().unwrap()["id"],
        old["id"]
    );

    // It starts again: answers resume without restarting the downstream.
    relay.restore().await;
    let mut status = 0;
    for _ in 0..50 {
        status = readyz(&down).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "/readyz recovers");
    let (status, events) = down.chat(&alice, conv3, ask.clone()).await;
    assert_eq!(status, 200, "{events:?}");
    assert_eq!(answer_text(&events), text);
    // Regenerate through the upstream replaces the old answer.
    let r = alice
        .post(down.url(&format!("/api/messages/{}/regenerate", old["id"])))
        .json(&json!({"temperature": 0, "max_tokens": LONG}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = parse_sse(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap().0, "done", "{events:?}");
    let after = down.messages(&alice, conv).await;
    assert_eq!(after.len(), 2, "question and the new answer: {after:?}");
    assert_ne!(after[1]["id"], old["id"]);
    assert_eq!(after[1]["content"], text.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_come_from_the_upstream_sqlite() {
    answers_come_from_the_upstream(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_come_from_the_upstream_postgres() {
    answers_come_from_the_upstream(Backend::Postgres).await;
}

/// The upstream dies mid-answer (its connection is cut), then hangs mid-answer (nothing more
/// arrives): each time the partial answer is kept, the stream ends with an error, and the
/// account's answer slot is free again — nothing waits forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_dies_or_hangs_mid_answer() {
    let _turn = SERIAL.lock().await;
    // An upstream that takes several answers of one key at once: one that is still letting go
    // of a cut-off answer must not refuse the next as `busy`.
    let (up, key) = upstream_moss_with(Some(|c| c.limits.per_user_answers = 4)).await;
    let relay = Relay::start(up.base.trim_start_matches("http://").parse().unwrap()).await;
    let mut opts = through(vec![format!("http://{}/v1", relay.addr)], &key, 5);
    opts.configure = Some(|c| c.engine.upstream.idle_timeout_secs = 1);
    let down = TestApp::start(Backend::Sqlite, opts).await.unwrap();
    let alice = down.user("alice@example.com").await;
    let ask = json!({"content": "hello", "temperature": 0, "max_tokens": LONG});
    for failure in ["dies", "hangs"] {
        let conv = down.conversation(&alice).await;
        let mut r = down.answer_in_progress(&alice, conv, LONG).await;
        match failure {
            "dies" => relay.cut(),
            _ => relay.pause(),
        }
        let mut rest = String::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), r.chunk())
            .await
            .expect("the stream ends")
            .unwrap()
        {
            rest.push_str(&String::from_utf8_lossy(&chunk));
        }
        let events = parse_sse(&rest);
        let (name, err) = events.last().unwrap();
        assert_eq!(name, "error", "{failure}: {rest}");
        assert_eq!(err["code"], "generation_failed", "{failure}");
        let last = down.messages(&alice, conv).await.last().cloned().unwrap();
        assert_eq!(last["role"], "assistant", "{failure}: partial answer kept");
        assert_eq!(last["finish_reason"], "error", "{failure}");
        assert!(!last["content"].as_str().unwrap().is_empty(), "{failure}");
        // The slot went with the answer: the account's next request is answered.
        relay.restore().await;
        let conv2 = down.conversation(&alice).await;
        let r = alice
            .post(down.url(&format!("/api/conversations/{conv2}/messages")))
            .json(&ask)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{failure}: the slot was freed");
        let events = parse_sse(&r.text().await.unwrap());
        assert_eq!(events.last().unwrap().0, "done", "{failure}: {events:?}");
    }
}

/// An HTTP server that plays a failing upstream: `/v1/chat/completions` answers `status`, or
/// never answers at all when `status` is 0; `/v1/models` answers 200.
async fn failing_upstream(status: u16) -> String {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route("/v1/models", get(|| async { "{\"data\":[]}" }))
        .route(
            "/v1/chat/completions",
            post(move || async move {
                if status == 0 {
                    std::future::pending::<()>().await;
                }
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    "{\"error\":{\"message\":\"busy\"}}",
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

/// A port nothing listens on.
async fn closed_port() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/v1")
}

async fn failing_upstreams_are_skipped(backend: Backend) {
    let _turn = SERIAL.lock().await;
    let (up, key) = upstream_moss().await;
    let good = format!("{}/v1", up.base);
    let urls = vec![
        closed_port().await,
        failing_upstream(429).await,
        failing_upstream(503).await,
        failing_upstream(500).await,
        good.clone(),
    ];
    // A cool-down longer than the test: "tried once" must not depend on how fast five answers
    // are made.
    let mut opts = through(urls, &key, 5);
    opts.configure = Some(|c| c.engine.upstream.failure_cooldown_secs = 600);
    let Some(down) = TestApp::start(backend, opts).await else {
        return;
    };
    let c = down.user("bob@example.com").await;
    let admin = down.admin("ops@example.com").await;
    assert_eq!(upstream_failures(&down, &admin, "skipped").await, 0);
    // Every answer arrives although four of five upstreams fail: each failure is tried once,
    // then left alone for the cool-down.
    for _ in 0..5 {
        let conv = down.conversation(&c).await;
        let (status, events) = down
            .chat(&c, conv, json!({"content": "hi", "max_tokens": 3}))
            .await;
        assert_eq!(status, 200, "{events:?}");
        assert_eq!(events.last().unwrap().0, "done", "{events:?}");
    }
    let load = backend_load(&down, &admin).await;
    let skipped: Vec<u64> = load["upstream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["skipped"].as_u64().unwrap())
        .collect();
    assert_eq!(
        skipped,
        vec![1, 1, 1, 1, 0],
        "each failing upstream was tried once"
    );
    let (status, ready) = readyz(&down).await;
    assert_eq!(status, 200, "one upstream up is enough: {ready}");
    let up_flags: Vec<bool> = ready["inference"]["upstream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["up"].as_bool().unwrap())
        .collect();
    assert_eq!(up_flags, vec![false, true, true, true, true]);

    // An upstream that refuses the request itself (400): 503 unavailable, and the URL stays in
    // rotation (a bad request says nothing about the server).
    let down = TestApp::start(backend, through(vec![failing_upstream(400).await], &key, 5))
        .await
        .unwrap();
    let c = down.user("dave@example.com").await;
    let admin = down.admin("ops@example.com").await;
    for _ in 0..2 {
        let conv = down.conversation(&c).await;
        let (status, events) = down
            .chat(&c, conv, json!({"content": "hi", "max_tokens": 3}))
            .await;
        assert_eq!(status, 503, "{events:?}");
        assert_eq!(events[0].1["error"]["code"], "unavailable", "{events:?}");
    }
    assert_eq!(
        upstream_failures(&down, &admin, "refused").await,
        2,
        "tried both times"
    );

    // Only failing upstreams: 429, 503 and a silent one all become moss's overloaded answer.
    for (urls, timeout) in [
        (vec![failing_upstream(429).await], 5),
        (vec![failing_upstream(503).await], 5),
        (vec![failing_upstream(0).await], 1),
    ] {
        let down = TestApp::start(backend, through(urls.clone(), &key, timeout))
            .await
            .unwrap();
        let c = down.user("carol@example.com").await;
        let conv = down.conversation(&c).await;
        let (status, events) = down
            .chat(&c, conv, json!({"content": "hi", "max_tokens": 3}))
            .await;
        assert_eq!(status, 503, "{urls:?}: {events:?}");
        assert_eq!(events[0].1["error"]["code"], "overloaded", "{events:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_upstreams_are_skipped_sqlite() {
    failing_upstreams_are_skipped(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_upstreams_are_skipped_postgres() {
    failing_upstreams_are_skipped(Backend::Postgres).await;
}

/// `moss serve` in upstream mode loads no model (none is in its model directory, and it fetches
/// none) and says through /readyz whether the upstream answers.
#[test]
fn serve_needs_no_model_in_upstream_mode() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dead = rt.block_on(closed_port());
    let config = dir.path().join("moss.toml");
    std::fs::write(
        &config,
        format!("[engine]\nbackend = \"openai\"\n[engine.upstream]\nurls = [\"{dead}\"]\nmodel = \"m\"\n"),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_moss"))
        .args(["serve", "--addr", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("MOSS_DATABASE__DATA_DIR", dir.path().join("data"))
        .env("MOSS_MODEL_DIR", dir.path().join("no-models"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let base = first.rsplit(' ').next().unwrap().to_string();
    assert!(first.starts_with("moss is listening"), "{first}");
    let (health, ready) = rt.block_on(async {
        let c = reqwest::Client::new();
        let health = c
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status();
        let r = c.get(format!("{base}/readyz")).send().await.unwrap();
        (health, (r.status(), r.json::<Value>().await.unwrap()))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(health, 200);
    assert_eq!(ready.0, 503, "{}", ready.1);
    assert_eq!(ready.1["database"], true);
    assert_eq!(ready.1["inference"]["upstream"][0]["up"], false);
    assert!(
        !dir.path().join("no-models").exists(),
        "no model was fetched"
    );
}
