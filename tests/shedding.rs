//! Load shedding and faults: token buckets, busy, overloaded until tomorrow morning, queue wait,
//! daily quotas, the database going away and coming back, and SIGTERM mid-answer.

mod common;

use std::time::{Duration, SystemTime};

use common::server::{Options, TestApp};
use moss::config::Config;
use serde_json::{json, Value};

const SLOW: u64 = 40;

fn opts(configure: fn(&mut Config)) -> Options {
    Options {
        smtp: false,
        token_delay_ms: SLOW,
        tight_limits: false,
        configure: Some(configure),
        db_proxy: false,
        long_context: false,
        upstream: None,
    }
}

/// Starts an answer in a new conversation and returns once its first token has arrived.
async fn running_answer(app: &TestApp, c: &reqwest::Client, max_tokens: u32) -> reqwest::Response {
    let conv = app.conversation(c).await;
    app.answer_in_progress(c, conv, max_tokens).await
}

async fn error_of(r: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let (s, h) = (r.status().as_u16(), r.headers().clone());
    (s, h, r.json().await.unwrap())
}

async fn token_buckets_limit_each_client(app: TestApp) {
    let c = app.client();
    let login = json!({"email": "x@example.com", "password": "wrong password"});
    let burst = app.config.limits.auth.burst;
    for _ in 0..burst {
        assert_eq!(
            c.post(app.url("/api/login"))
                .json(&login)
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
    }
    // A forged X-Forwarded-For does not give the client a fresh bucket (no trusted proxy here).
    let r = c
        .post(app.url("/api/login"))
        .header("x-forwarded-for", "198.51.100.1")
        .json(&login)
        .send()
        .await
        .unwrap();
    let (status, headers, body) = error_of(r).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After is rounded up, never 0");
    assert!(body["error"]["message_zh"].as_str().is_some());
    // Other buckets are separate: the waitlist still answers.
    assert_eq!(
        c.post(app.url("/api/waitlist"))
            .json(&json!({"email": "w@example.com"}))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
}
both_backends!(
    token_buckets_limit_each_client,
    Options {
        tight_limits: true,
        ..Options::default()
    }
);

async fn pages_over_capacity_are_small_html_pages(app: TestApp) {
    let c = app.client();
    for _ in 0..2 {
        assert_eq!(c.get(app.url("/")).send().await.unwrap().status(), 200);
    }
    let r = c.get(app.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = r.text().await.unwrap();
    assert!(
        html.contains("Too many requests") && html.contains("请求过于频繁"),
        "{html}"
    );
}
both_backends!(
    pages_over_capacity_are_small_html_pages,
    Options {
        tight_limits: true,
        configure: Some(|c| c.limits.api = moss::config::Bucket {
            per_minute: 1,
            burst: 2
        }),
        ..Options::default()
    }
);

async fn one_answer_per_account_at_a_time(app: TestApp) {
    let c = app.user("busy@example.com").await;
    let _running = running_answer(&app, &c, 200).await;
    let conv = app.conversation(&c).await;
    let r = c
        .post(app.url(&format!("/api/conversations/{conv}/messages")))
        .json(&json!({"content": "and another"}))
        .send()
        .await
        .unwrap();
    let (status, headers, body) = error_of(r).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("busy"))
    );
    assert_eq!(headers["retry-after"], "1");
    // the refused question was not stored
    let msgs = app
        .get_json(&c, &format!("/api/conversations/{conv}"))
        .await;
    assert_eq!(msgs["messages"], json!([]));
}
both_backends!(one_answer_per_account_at_a_time, opts(|_| {}));

async fn a_full_queue_is_shed_at_once_until_tomorrow_morning(app: TestApp) {
    let (a, b, c) = (
        app.user("a@example.com").await,
        app.user("b@example.com").await,
        app.user("c@example.com").await,
    );
    // capacity: 1 running + 1 waiting; the third is shed at once, while the others still run
    let (_held, r) = app.fill_the_line(&a, &b, &c).await;
    let (status, headers, body) = error_of(r).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("overloaded"))
    );
    assert_eq!(
        body["error"]["message"],
        "The server is overloaded, please try again tomorrow morning."
    );
    assert_eq!(
        body["error"]["message_zh"],
        "服务器流量过载，请明天上午重试"
    );
    assert_eq!(headers["x-should-retry"], "false");
    let at = httpdate::parse_http_date(headers["retry-after"].to_str().unwrap())
        .expect("Retry-After is an HTTP-date");
    let wait = at.duration_since(SystemTime::now()).expect("in the future");
    assert!(wait <= Duration::from_secs(86_400), "{wait:?}");
    // The shed answer comes from the accept loop, before the router: it still carries the
    // security headers (its counting is checked in tests/metrics.rs).
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["cache-control"], "no-store");
    assert!(headers.contains_key("content-security-policy"));
    // Every path that starts an answer is shed the same way; other paths are not affected.
    for path in ["/api/messages/1/regenerate", "/v1/chat/completions"] {
        let r = c.post(app.url(path)).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 503, "{path}");
        assert_eq!(r.headers()["x-should-retry"], "false", "{path}");
    }
    let r = c
        .post(app.url("/api/conversations/x/y/messages"))
        .json(&json!({"content": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c.get(app.url("/api/conversations")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
both_backends!(
    a_full_queue_is_shed_at_once_until_tomorrow_morning,
    opts(|c| {
        c.limits.max_running = 1;
        c.limits.max_waiting = 1;
    })
);

async fn waiting_too_long_is_shed(app: TestApp) {
    let (a, b) = (
        app.user("a@example.com").await,
        app.user("b@example.com").await,
    );
    let _first = running_answer(&app, &a, 300).await;
    let conv = app.conversation(&b).await;
    let (status, events) = app
        .chat(&b, conv, json!({"content": "hi", "max_tokens": 5}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(events.first().unwrap().0, "queued");
    let last = events.last().unwrap();
    assert_eq!(
        (last.0.as_str(), last.1["code"].as_str()),
        ("error", Some("overloaded")),
        "{events:?}"
    );
    let msgs = app
        .get_json(&b, &format!("/api/conversations/{conv}"))
        .await;
    assert_eq!(
        msgs["messages"],
        json!([]),
        "the shed question is taken back"
    );
}
both_backends!(
    waiting_too_long_is_shed,
    opts(|c| {
        c.limits.max_queue_wait_secs = 1;
        c.limits.max_running = 1;
    })
);

async fn daily_quotas_are_counted_in_the_database(app: TestApp) {
    let a = app.user("q@example.com").await;
    let conv = app.conversation(&a).await;
    let (s, events) = app
        .chat(&a, conv, json!({"content": "hello", "max_tokens": 4}))
        .await;
    assert_eq!(s, 200, "{events:?}");
    // the first answer used more than the 20-token quota: the next is refused until midnight
    let r = a
        .post(app.url(&format!("/api/conversations/{conv}/messages")))
        .json(&json!({"content": "again"}))
        .send()
        .await
        .unwrap();
    let (status, headers, body) = error_of(r).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("quota_exceeded"))
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    // usage lives in the database (shared by replicas)
    let used: i64 = sqlx::query_scalar("SELECT tokens FROM usage_daily")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(used >= 20, "{used}");
    // the service budget: another account is shed as overloaded once the day's tokens are spent
    sqlx::query("UPDATE service_usage_daily SET tokens = 1000000")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let b = app.user("q2@example.com").await;
    let conv_b = app.conversation(&b).await;
    let r = b
        .post(app.url(&format!("/api/conversations/{conv_b}/messages")))
        .json(&json!({"content": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.2["error"]["code"], "overloaded");
}
both_backends!(
    daily_quotas_are_counted_in_the_database,
    Options {
        configure: Some(|c| {
            c.limits.daily_user_tokens = 20;
            c.limits.daily_service_tokens = 100_000;
        }),
        ..Options::default()
    }
);

/// PostgreSQL goes away and comes back: 503 JSON errors quickly, never a hang or a crash, and the
/// service recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_gives_503_and_recovers() {
    let options = Options {
        db_proxy: true,
        configure: Some(|c| c.database.acquire_timeout_secs = 1),
        ..Options::default()
    };
    let Some(app) = TestApp::start(common::server::Backend::Postgres, options).await else {
        return;
    };
    let c = app.user("o@example.com").await;
    let proxy = app.proxy.as_ref().unwrap();
    proxy.cut();
    for path in ["/api/conversations", "/api/me"] {
        let t = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(20), c.get(app.url(path)).send())
            .await
            .expect("no hang")
            .unwrap();
        let (status, headers, body) = error_of(r).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (503, Some("unavailable")),
            "{path}"
        );
        assert!(headers.contains_key("retry-after"));
        assert!(t.elapsed() < Duration::from_secs(15));
    }
    assert_eq!(app.status("/readyz").await, 503);
    assert_eq!(app.status("/healthz").await, 200);
    proxy.restore().await;
    let mut ok = false;
    for _ in 0..50 {
        if c.get(app.url("/api/conversations"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the service did not recover");
    // /readyz shares one probe a second: it turns within a second or two.
    let mut ready = false;
    for _ in 0..50 {
        ready = app.status("/readyz").await == 200;
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "/readyz did not recover");
}

/// The database goes away while an answer is being made and comes back: the answer is stored
/// exactly once (its store is retried), the stream ends with `done`, and the slot is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_cut_mid_answer_then_restored() {
    let options = Options {
        db_proxy: true,
        token_delay_ms: SLOW,
        configure: Some(|c| {
            c.database.acquire_timeout_secs = 1;
            // No connection is opened behind the test's back: the first one tried after the cut
            // is the answer's store.
            c.database.min_connections = 0;
            c.limits.max_running = 1;
            c.limits.max_waiting = 0;
        }),
        ..Options::default()
    };
    let Some(app) = TestApp::start(common::server::Backend::Postgres, options).await else {
        return;
    };
    let c = app.user("cut@example.com").await;
    let conv = app.conversation(&c).await;
    let mut r = app.answer_in_progress(&c, conv, 10).await;
    let proxy = app.proxy.as_ref().unwrap();
    proxy.cut();
    // The answer ends and tries to store itself against the missing database …
    tokio::time::timeout(Duration::from_secs(30), proxy.knocked_while_cut())
        .await
        .expect("the answer tried to store itself");
    proxy.restore().await;
    // … and is stored once the database is back; the stream ends with `done`.
    let mut rest = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), r.chunk())
        .await
        .expect("the stream ends")
        .unwrap()
    {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events = common::server::parse_sse(&rest);
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done", "{rest}");
    let id = done["message_id"].as_i64().unwrap();
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, role FROM messages WHERE conversation_id = $1 ORDER BY id")
            .bind(conv)
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            (rows[0].0, "user".to_string()),
            (id, "assistant".to_string())
        ],
        "the question and one answer"
    );
    // The only slot is free again.
    let (status, events) = app
        .chat(&c, conv, json!({"content": "again", "max_tokens": 3}))
        .await;
    assert_eq!(status, 200, "{events:?}");
    assert_eq!(events.last().unwrap().0, "done");
}

/// `moss serve` on a tiny model in `dir`, slowed to `delay_ms` a token: the child, its base URL
/// and a signed-in client (the first admin).
fn spawn_server(
    dir: &std::path::Path,
    grace_secs: u64,
    delay_ms: u64,
) -> (std::process::Child, String, String) {
    use std::io::BufRead;
    let model = common::tiny_model(dir, moss::engine::Arch::Qwen2);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_moss"))
        .args(["serve", "--addr", "127.0.0.1:0", "--model"])
        .arg(&model)
        .env("MOSS_DATABASE__DATA_DIR", dir.join("data"))
        .env("MOSS_ENGINE__DEVICE", "cpu")
        .env("MOSS_ENGINE__TOKEN_DELAY_MS", delay_ms.to_string())
        .env("MOSS_ENGINE__SYSTEM_PROMPT", "You are moss.")
        .env("MOSS_SERVER__SHUTDOWN_GRACE_SECS", grace_secs.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last_word = || {
        lines
            .next()
            .unwrap()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    let base = last_word();
    let invite = last_word();
    let code = invite.split("code=").nth(1).unwrap().to_string();
    (child, base, code)
}

/// Registers with `code` and starts an answer of `max_tokens`; returns the stream once its first
/// token has arrived, with what was read so far.
async fn start_answer(base: &str, code: &str, max_tokens: u32) -> (reqwest::Response, String) {
    let c = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let r = c
        .post(format!("{base}/api/register"))
        .json(&json!({"invite_code": code, "email": "t@example.com", "password": "long enough pw"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let conv: Value = c
        .post(format!("{base}/api/conversations"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conv = conv["id"].as_i64().unwrap();
    let mut r = c
        .post(format!("{base}/api/conversations/{conv}/messages"))
        .json(&json!({"content": "hello", "max_tokens": max_tokens, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("event: token") {
        seen.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
    }
    (r, seen)
}

async fn read_rest(mut r: reqwest::Response, mut seen: String) -> Vec<(String, Value)> {
    while let Ok(Some(chunk)) = r.chunk().await {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    common::server::parse_sse(&seen)
}

fn sigterm(child: &std::process::Child) {
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

/// The stored answers of the server's SQLite database in `dir`: (finish_reason, content).
fn stored_answers(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Vec<(String, String)> {
    rt.block_on(async {
        let url = format!("sqlite://{}", dir.join("data/moss.db").display());
        let db = moss::db::Db::connect(&url, &Default::default())
            .await
            .unwrap();
        sqlx::query_as("SELECT finish_reason, content FROM messages WHERE role = 'assistant'")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    })
}

/// SIGTERM while an answer streams: the process stops accepting, gives the answer the grace period,
/// stores what it has, and exits 0.
#[test]
fn sigterm_mid_answer_keeps_the_partial_answer_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, code) = spawn_server(dir.path(), 1, 50);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (r, seen) = start_answer(&base, &code, 400).await;
        sigterm(&child);
        // the stream ends with the stored partial answer
        let events = read_rest(r, seen).await;
        let done = events
            .iter()
            .find(|(n, _)| n == "done")
            .unwrap_or_else(|| panic!("no done event: {events:?}"));
        assert_eq!(done.1["finish_reason"], "cancelled");
    });
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    // the partial answer is in the database
    let answers = stored_answers(&rt, dir.path());
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].0, "cancelled");
    assert!(!answers[0].1.is_empty());
}

/// SIGTERM while an answer streams that ends within the grace period: no new connection is
/// accepted from the signal on, and the answer is finished and stored whole.
#[test]
fn sigterm_lets_an_answer_within_the_grace_period_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, code) = spawn_server(dir.path(), 30, 40);
    let addr = base.trim_start_matches("http://").to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let max_tokens = 40;
    rt.block_on(async {
        let (r, seen) = start_answer(&base, &code, max_tokens).await;
        sigterm(&child);
        // The listener closes while the answer still runs (about 1.5 s of it is left).
        let mut refused = false;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(&addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(refused, "new connections are refused after the signal");
        let events = read_rest(r, seen).await;
        let (name, done) = events.last().unwrap();
        assert_eq!(name, "done", "{events:?}");
        assert_eq!(done["finish_reason"], "length", "finished whole: {done}");
        assert_eq!(done["usage"]["completion_tokens"], max_tokens);
    });
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let answers = stored_answers(&rt, dir.path());
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].0, "length");
}

/// Request headers trickled in (slowloris) and idle keep-alive connections do not
/// hold a socket past `server.header_timeout_secs`.
async fn slow_headers_and_idle_connections_are_cut_off(app: TestApp) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: moss\r\nX-Slow: ")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut got))
        .await
        .expect("the server hangs up on unfinished headers")
        .ok();
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 408"),
        "no answer to half a request: {text}"
    );

    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: moss\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), idle.read_to_end(&mut got))
        .await
        .expect("the server closes an idle keep-alive connection")
        .ok();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("\"ok\""),
        "the request itself was answered: {text}"
    );
}
both_backends!(
    slow_headers_and_idle_connections_are_cut_off,
    opts(|c| c.server.header_timeout_secs = 1)
);
