//! Load test: starts the real release binary on loopback with a tiny model, floods it, and reports.
//!
//!     bench/load.sh [sqlite|postgres]      (builds, then runs this)
//!
//! 1. Chat flood: N chat requests over C connections from many accounts against a capacity of
//!    `--running` + `--waiting` answers; every response must be 200, 429 or 503, with no
//!    connection errors; p99 latency of the 503 answers; RSS growth; a normal chat afterwards.
//! 2. Waitlist flood: M signups over 200 connections with D distinct addresses: exactly D rows.
//!
//! All traffic comes from 127.0.0.1, so the per-client token buckets are widened for the run
//! (otherwise one address would be rate-limited long before admission is reached).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Mutex;

struct Args {
    db: String,
    requests: usize,
    connections: usize,
    signups: usize,
    addresses: usize,
    users: usize,
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

type Conn = hyper::client::conn::http1::SendRequest<http_body_util::Full<axum::body::Bytes>>;

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Conn> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request and reads the whole answer (a stream to its end); returns the status.
async fn exchange(
    c: &mut Conn,
    req: hyper::Request<http_body_util::Full<axum::body::Bytes>>,
) -> anyhow::Result<u16> {
    use http_body_util::BodyExt;
    c.ready().await?;
    let resp = c.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let raw: Vec<String> = std::env::args().collect();
    let args = Args {
        db: raw
            .iter()
            .position(|a| a == "--db")
            .and_then(|i| raw.get(i + 1))
            .cloned()
            .unwrap_or_else(|| "sqlite".into()),
        requests: arg(&raw, "--requests", 20_000),
        connections: arg(&raw, "--connections", 500),
        signups: arg(&raw, "--signups", 10_000),
        addresses: arg(&raw, "--addresses", 2_000),
        users: arg(&raw, "--users", 200),
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join("target/release/moss");
    anyhow::ensure!(bin.is_file(), "build first: cargo build --release");
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny.gguf");
    moss::engine::tiny::write_tiny_model(
        &model,
        &moss::engine::tiny::TinySpec::new(moss::engine::Arch::Qwen2),
    )?;
    let db_url = match args.db.as_str() {
        "postgres" => {
            let admin = std::env::var("MOSS_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
            use sqlx::Connection;
            let name = format!("moss_load_{}", std::process::id());
            let mut conn = sqlx::PgConnection::connect(&admin).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(&mut conn)
                .await?;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await?;
            format!(
                "{}/{name}",
                admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin)
            )
        }
        _ => format!("sqlite://{}?mode=rwc", dir.path().join("moss.db").display()),
    };
    let wide = "1000000";
    let mut child = std::process::Command::new(&bin)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--database-url",
            &db_url,
            "--model",
        ])
        .arg(&model)
        .env("MOSS_ENGINE__DEVICE", "cpu")
        .env("MOSS_ENGINE__SYSTEM_PROMPT", "You are moss.")
        .env("MOSS_ENGINE__MAX_TOKENS", "16")
        .env("MOSS_LIMITS__MAX_RUNNING", "2")
        .env("MOSS_LIMITS__MAX_WAITING", "8")
        .env("MOSS_LIMITS__DAILY_USER_TOKENS", "0")
        .env("MOSS_DATABASE__MAX_CONNECTIONS", "16")
        .env(
            "MOSS_DATABASE__MIN_CONNECTIONS",
            // every connection warm, as configured by default (min = max)
            std::env::var("MOSS_LOAD_MIN_CONNECTIONS").unwrap_or_else(|_| "16".into()),
        )
        .envs(
            ["AUTH", "WAITLIST", "GENERATE", "API"]
                .iter()
                .flat_map(|b| {
                    [
                        (format!("MOSS_LIMITS__{b}__PER_MINUTE"), wide.to_string()),
                        (format!("MOSS_LIMITS__{b}__BURST"), wide.to_string()),
                    ]
                }),
        )
        .env(
            "RUST_LOG",
            std::env::var("MOSS_LOAD_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let base = lines
        .next()
        .transpose()?
        .unwrap_or_default()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let _ = lines.next();
    let pid = child.id();

    // Accounts with a conversation each (codes minted by the admin CLI, as an operator would).
    let out = std::process::Command::new(&bin)
        .args([
            "--database-url",
            &db_url,
            "admin",
            "invite",
            "create",
            "--count",
            &args.users.to_string(),
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "moss admin invite create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let codes: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(String::from)
        .collect();
    anyhow::ensure!(!codes.is_empty(), "no invite codes were minted");
    // Each account's session cookie and conversation.
    let mut sessions: Vec<(String, i64)> = Vec::new();
    let plain = reqwest::Client::new();
    for (i, code) in codes.iter().enumerate() {
        let r = plain.post(format!("{base}/api/register")).json(&json!({"invite_code": code, "email": format!("load{i}@example.com"), "password": "load test password"})).send().await?;
        anyhow::ensure!(r.status() == 201, "register: {}", r.status());
        let cookie = r
            .headers()
            .get(reqwest::header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(String::from)
            .ok_or_else(|| anyhow::anyhow!("register set no cookie"))?;
        let conv: Value = plain
            .post(format!("{base}/api/conversations"))
            .header(reqwest::header::COOKIE, &cookie)
            .send()
            .await?
            .json()
            .await?;
        sessions.push((cookie, conv["id"].as_i64().unwrap_or(0)));
    }
    let sessions = Arc::new(sessions);
    let rss_before = rss_kib(pid);

    // 1. Chat flood. The client side is kept as light as wrk's: every connection is one HTTP/1.1
    // connection of its own (hyper's client connection, no pool, no cookie jar) sending a
    // request built once, so that on a 2-core machine the generator takes as little CPU from the
    // server as it can. Each connection is opened first (one /healthz, not counted), then all
    // start together: the figures are the service's, not the cost of 500 TCP handshakes.
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse()?;
    let results: Arc<Mutex<BTreeMap<String, Vec<f64>>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ready = Arc::new(tokio::sync::Barrier::new(args.connections + 1));
    let mut tasks = Vec::new();
    for task in 0..args.connections {
        let (sessions, results, next, ready) = (
            sessions.clone(),
            results.clone(),
            next.clone(),
            ready.clone(),
        );
        let total = args.requests;
        tasks.push(tokio::spawn(async move {
            let (cookie, conv) = &sessions[task % sessions.len()];
            let request = move || {
                hyper::Request::post(format!("/api/conversations/{conv}/messages"))
                    .header(hyper::header::HOST, addr.to_string())
                    .header(hyper::header::COOKIE, cookie.as_str())
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(http_body_util::Full::new(axum::body::Bytes::from_static(
                        br#"{"content":"hello","max_tokens":8}"#,
                    )))
                    .expect("a valid request")
            };
            let mut conn = connect(addr).await;
            if let Ok(c) = conn.as_mut() {
                let health = hyper::Request::get("/healthz")
                    .header(hyper::header::HOST, addr.to_string())
                    .body(http_body_util::Full::new(axum::body::Bytes::new()))
                    .expect("a valid request");
                let _ = exchange(c, health).await;
            }
            // Each task keeps its own figures (merged at the end): no lock shared by 500 tasks
            // inside the timed loop.
            let mut mine: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            ready.wait().await;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                // A connection the server closed is opened again (and that counts as an error).
                let key = match conn.as_mut() {
                    Ok(c) => match exchange(c, request()).await {
                        Ok(status) => status.to_string(),
                        Err(e) => {
                            conn = connect(addr).await;
                            format!("error: {e}")
                        }
                    },
                    Err(e) => {
                        let key = format!("error: {e}");
                        conn = connect(addr).await;
                        key
                    }
                };
                mine.entry(key)
                    .or_default()
                    .push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let mut all = results.lock().await;
            for (k, v) in mine {
                all.entry(k).or_default().extend(v);
            }
        }));
    }
    // MOSS_LOAD_PROFILE="perf record -a -o /tmp/flood.data -- sleep 2": a command started as the
    // flood starts (to profile the flood alone, not the set-up).
    let profiler = match std::env::var("MOSS_LOAD_PROFILE") {
        Ok(cmd) if !cmd.is_empty() => {
            let p = std::process::Command::new("sh")
                .args(["-c", &cmd])
                .spawn()?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            Some(p)
        }
        _ => None,
    };
    ready.wait().await;
    let start = Instant::now();
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed();
    if let Some(mut p) = profiler {
        p.wait()?;
    }
    let rss_after = rss_kib(pid);
    let mut results = results.lock().await.clone();
    println!(
        "== chat flood on {}: {} requests, {} connections, capacity 2 running + 8 waiting, {:.1} s",
        args.db,
        args.requests,
        args.connections,
        elapsed.as_secs_f64()
    );
    for (status, lat) in results.iter_mut() {
        println!(
            "  {status:>6}: {:>6}  p50 {:>8.1} ms  p99 {:>8.1} ms",
            lat.len(),
            percentile(lat, 0.5),
            percentile(lat, 0.99)
        );
    }
    let bad: usize = results
        .iter()
        .filter(|(s, _)| !matches!(s.as_str(), "200" | "429" | "503"))
        .map(|(_, v)| v.len())
        .sum();
    println!("  other statuses or connection errors: {bad}");
    println!(
        "  RSS {} MiB -> {} MiB (+{} MiB)",
        rss_before / 1024,
        rss_after / 1024,
        rss_after.saturating_sub(rss_before) / 1024
    );
    let (cookie, conv) = &sessions[0];
    let t = Instant::now();
    let r = plain
        .post(format!("{base}/api/conversations/{conv}/messages"))
        .header(reqwest::header::COOKIE, cookie)
        .json(&json!({"content": "hello", "max_tokens": 4}))
        .send()
        .await?;
    let status = r.status();
    let body = r.text().await?;
    println!(
        "  a normal chat afterwards: {} in {:.0} ms, {}",
        status,
        t.elapsed().as_secs_f64() * 1000.0,
        if body.contains("event: done") {
            "answered"
        } else {
            "NOT answered"
        }
    );

    // 2. Waitlist flood.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(200)
        .build()?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let statuses: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (client, next, statuses, base) =
            (client.clone(), next.clone(), statuses.clone(), base.clone());
        let (total, distinct) = (args.signups, args.addresses);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let r = client
                    .post(format!("{base}/api/waitlist"))
                    .json(&json!({"email": format!("person{}@example.com", i % distinct)}))
                    .send()
                    .await;
                let key = match r {
                    Ok(r) => r.status().as_u16().to_string(),
                    Err(e) => format!("error: {e}"),
                };
                *statuses.lock().await.entry(key).or_default() += 1;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed();
    let out = std::process::Command::new(&bin)
        .args(["--database-url", &db_url, "admin", "waitlist", "list"])
        .output()?;
    let rows = String::from_utf8(out.stdout)?.lines().count();
    println!(
        "== waitlist flood on {}: {} signups, 200 connections, {} addresses, {:.1} s",
        args.db,
        args.signups,
        args.addresses,
        elapsed.as_secs_f64()
    );
    println!("  statuses: {:?}", statuses.lock().await);
    println!("  rows: {rows} (expected {})", args.addresses);

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await;
    Ok(())
}
