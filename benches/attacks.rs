//! Launch night's cheap attacks, replayed against the real release binary on loopback (tiny
//! model, SQLite, the default limits), each bounded in count and time, with the figures printed:
//!
//!     bench/attacks.sh            (builds, then runs this)
//!
//! 1. Slow bodies: 50 connections from 5 addresses that send a request's headers and one byte of
//!    its body, then nothing, on a path that starts an answer; a normal user asks meanwhile.
//! 2. Sign-in flood: 1,000 sign-ins for unknown addresses over 200 connections from 50 loopback
//!    addresses; memory and threads of the server, answer times, a real user's sign-in meanwhile.
//! 3. Reset timing: `POST /api/password/forgot` for a known and an unknown address, alternated.
//! 4. Lock-out: one address guesses the owner's password (8 tries, inside its token bucket); the
//!    owner signs in from another.
//! 5. Small tricks: a 400 KB request head, a form body, an `https://` origin over http.
//!
//! Loopback has every 127.x.y.z address, so clients bind their own to look like many machines.
//! `MOSS_BIN=path/to/moss` attacks another build (e.g. an older release, for a before/after).

use std::io::BufRead;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn client(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().expect("an address"))
        .pool_max_idle_per_host(16)
        .build()
        .expect("a client")
}

fn median(v: &mut [f64]) -> f64 {
    percentile(v, 0.5)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

struct Server {
    child: std::process::Child,
    base: String,
    bin: std::path::PathBuf,
    db_url: String,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// Registers `email` from `ip` with a code from the admin CLI; returns its session cookie.
    async fn account(&self, ip: &str, email: &str) -> anyhow::Result<String> {
        let out = std::process::Command::new(&self.bin)
            .args(["--database-url", &self.db_url, "admin", "invite", "create"])
            .output()?;
        let code = String::from_utf8(out.stdout)?.trim().to_string();
        let r = client(ip)
            .post(format!("{}/api/register", self.base))
            .json(&json!({"invite_code": code, "email": email, "password": "a good long password"}))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 201, "register {email}: {}", r.status());
        Ok(r.headers()["set-cookie"]
            .to_str()?
            .split(';')
            .next()
            .unwrap_or_default()
            .to_string())
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = match reqwest::get(format!("{}/metrics", self.base)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// A loopback port nothing listens on.
fn closed_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start() -> anyhow::Result<(Server, tempfile::TempDir)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // MOSS_BIN: another build to attack (an older release, for a before/after in one run).
    let bin = std::env::var_os("MOSS_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/moss"));
    anyhow::ensure!(bin.is_file(), "build first: cargo build --release");
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny.gguf");
    moss::engine::tiny::write_tiny_model(
        &model,
        &moss::engine::tiny::TinySpec::new(moss::engine::Arch::Qwen2),
    )?;
    // (`?mode=rwc` for older builds, which did not create a missing file.)
    let db_url = format!("sqlite://{}?mode=rwc", dir.path().join("moss.db").display());
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
        .env("RUST_LOG", "error")
        // Mail on (to a port where nothing listens: mails are queued, their sending fails
        // quietly), so that a reset for a known address has work to do.
        .env("MOSS_SMTP__HOST", "127.0.0.1")
        .env("MOSS_SMTP__PORT", closed_port()?.to_string())
        .env("MOSS_SMTP__SECURITY", "none")
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
    Ok((
        Server {
            child,
            base,
            bin,
            db_url,
        },
        dir,
    ))
}

/// 1. Slow bodies on the answer paths, and a normal user's answer meanwhile.
async fn slow_bodies(s: &Server) -> anyhow::Result<()> {
    let cookie = s.account("127.0.1.1", "slow@example.com").await?;
    let c = client("127.0.1.1");
    let conv: Value = c
        .post(format!("{}/api/conversations", s.base))
        .header("cookie", &cookie)
        .send()
        .await?
        .json()
        .await?;
    let conv = conv["id"].as_i64().unwrap_or(0);
    let mut open = Vec::new();
    for i in 0..50 {
        // From five addresses, ten each: inside each address's `generate` token bucket.
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(format!("127.0.1.{}:0", 10 + i / 10).parse()?)?;
        let mut sock = sock.connect(s.addr().parse()?).await?;
        let head = format!(
            "POST /api/conversations/{conv}/messages HTTP/1.1\r\nHost: {}\r\nCookie: {cookie}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
            s.addr()
        );
        sock.write_all(head.as_bytes()).await?;
        open.push(sock);
    }
    let opened = Instant::now();
    let admitted = s.metric("moss_admitted_answers").await;
    let other = s.account("127.0.1.2", "other@example.com").await?;
    let oc = client("127.0.1.2");
    let conv2: Value = oc
        .post(format!("{}/api/conversations", s.base))
        .header("cookie", &other)
        .send()
        .await?
        .json()
        .await?;
    let t = Instant::now();
    let r = oc
        .post(format!(
            "{}/api/conversations/{}/messages",
            s.base, conv2["id"]
        ))
        .header("cookie", &other)
        .json(&json!({"content": "hello", "max_tokens": 8}))
        .send()
        .await?;
    let status = r.status();
    let answered = r.text().await?.contains("event: done");
    let answer_ms = t.elapsed().as_secs_f64() * 1000.0;
    // Each is waited for at most 30 s from the start.
    let mut timed_out = 0;
    for mut sock in open {
        let mut got = Vec::new();
        let left = Duration::from_secs(30).saturating_sub(opened.elapsed());
        let _ = tokio::time::timeout(left, sock.read_to_end(&mut got)).await;
        if got.starts_with(b"HTTP/1.1 408") {
            timed_out += 1;
        }
    }
    println!("== slow bodies: 50 connections from 5 addresses, headers and 1 byte of a 100-byte body each");
    println!("  answers admitted while they were open: {admitted}");
    println!(
        "  another user's answer meanwhile: {status}, {}, {answer_ms:.0} ms",
        if answered { "answered" } else { "NOT answered" }
    );
    println!(
        "  slow connections answered 408 and closed within 30 s: {timed_out} of 50 ({:.1} s)",
        opened.elapsed().as_secs_f64()
    );
    Ok(())
}

/// 2. The sign-in flood, with the server's memory and threads sampled throughout.
async fn sign_in_flood(s: &Server) -> anyhow::Result<()> {
    s.account("127.0.3.1", "real@example.com").await?;
    let pid = s.pid();
    let (rss0, threads0) = (proc_status(pid, "VmRSS:"), proc_status(pid, "Threads:"));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss0));
    let peak_threads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(threads0));
    let (p, pt) = (peak.clone(), peak_threads.clone());
    let sampler = tokio::spawn(async move {
        loop {
            p.fetch_max(
                proc_status(pid, "VmRSS:"),
                std::sync::atomic::Ordering::Relaxed,
            );
            pt.fetch_max(
                proc_status(pid, "Threads:"),
                std::sync::atomic::Ordering::Relaxed,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let clients: Vec<reqwest::Client> = (1..=50).map(|i| client(&format!("127.0.2.{i}"))).collect();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..200 {
        let (c, next, base) = (clients[conn % 50].clone(), next.clone(), s.base.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= 1000 {
                    return out;
                }
                let t = Instant::now();
                let r = c
                    .post(format!("{base}/api/login"))
                    .json(&json!({"email": format!("nobody{i}@example.com"), "password": "guess guess"}))
                    .send()
                    .await;
                let key = match r {
                    Ok(r) => r.status().as_u16().to_string(),
                    Err(e) => format!("error: {e}"),
                };
                out.push((key, t.elapsed().as_secs_f64()));
            }
        });
    }
    // The real user signs in once the flood is under way.
    while next.load(std::sync::atomic::Ordering::Relaxed) < 300 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let real = client("127.0.3.1")
        .post(format!("{}/api/login", s.base))
        .json(&json!({"email": "real@example.com", "password": "a good long password"}))
        .send()
        .await?
        .status();
    let real_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut by_status: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    while let Some(done) = tasks.join_next().await {
        for (k, secs) in done? {
            by_status.entry(k).or_default().push(secs);
        }
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sampler.abort();
    let (rss1, threads1) = (proc_status(pid, "VmRSS:"), proc_status(pid, "Threads:"));
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "== sign-in flood: 1000 sign-ins, 200 connections, 50 addresses, {:.1} s",
        elapsed.as_secs_f64()
    );
    for (status, secs) in by_status.iter_mut() {
        println!(
            "  {status:>6}: {:>5}  p50 {:>6.0} ms  max {:>6.0} ms",
            secs.len(),
            median(secs) * 1000.0,
            percentile(secs, 1.0) * 1000.0
        );
    }
    println!(
        "  RSS {} MiB -> peak {} MiB (+{} MiB) -> {} MiB after; threads {threads0} -> peak {} -> {threads1}",
        rss0 / 1024,
        peak / 1024,
        peak.saturating_sub(rss0) / 1024,
        rss1 / 1024,
        peak_threads.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("  a real user's sign-in during the flood: {real} in {real_ms:.0} ms");
    Ok(())
}

/// Step 3: `forgot` for a known and an unknown address, alternated; each from its own address so
/// the auth bucket (10 a minute) does not shape the figures.
async fn reset_timing(s: &Server) -> anyhow::Result<()> {
    s.account("127.0.4.1", "known@example.com").await?;
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..400 {
        let c = client(&format!("127.0.5.{}", 1 + i / 8));
        let email = if i % 2 == 0 {
            "known@example.com"
        } else {
            "unknown@example.com"
        };
        let t = Instant::now();
        let r = c
            .post(format!("{}/api/password/forgot", s.base))
            .json(&json!({ "email": email }))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 202, "forgot: {}", r.status());
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        // The first of each address opens its connection: left out of both sides.
        if i % 8 >= 2 {
            if i % 2 == 0 {
                known.push(ms)
            } else {
                unknown.push(ms)
            }
        }
    }
    println!("== reset timing: 150 requests each, alternated");
    for (name, v) in [("known", &mut known), ("unknown", &mut unknown)] {
        println!(
            "  {name:>8}: median {:.3} ms  p10 {:.3}  p90 {:.3}  min {:.3}  max {:.3}",
            median(v),
            percentile(v, 0.1),
            percentile(v, 0.9),
            percentile(v, 0.0),
            percentile(v, 1.0)
        );
    }
    println!(
        "  median ratio known/unknown: {:.3}",
        median(&mut known) / median(&mut unknown)
    );
    Ok(())
}

/// 4. Someone guesses the owner's password from one address; the owner signs in from another.
async fn lock_out(s: &Server) -> anyhow::Result<()> {
    s.account("127.0.6.1", "owner@example.com").await?;
    let guesser = client("127.0.6.2");
    // Eight, inside the address's token bucket (10), so the answers below are the block's.
    let mut refused = 0;
    for _ in 0..8 {
        let r = guesser
            .post(format!("{}/api/login", s.base))
            .json(&json!({"email": "owner@example.com", "password": "guess guess"}))
            .send()
            .await?;
        refused += usize::from(r.status() == 401);
    }
    // Failures are recorded just after their answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let login = |ip: &str| {
        client(ip)
            .post(format!("{}/api/login", s.base))
            .json(&json!({"email": "owner@example.com", "password": "a good long password"}))
            .send()
    };
    let guesser_right = login("127.0.6.2").await?.status();
    let owner = login("127.0.6.1").await?.status();
    println!("== lock-out: 8 wrong passwords from one address ({refused} answered 401)");
    println!("  the right password from that address: {guesser_right} (blocked there)");
    println!("  the owner from their own address: {owner}");
    Ok(())
}

/// 5. Small tricks.
async fn small_tricks(s: &Server) -> anyhow::Result<()> {
    let mut sock = tokio::net::TcpStream::connect(s.addr()).await?;
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(400_000)
    );
    let _ = sock.write_all(head.as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut got)).await;
    let big = String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("closed")
        .to_string();
    let c = client("127.0.7.1");
    let form = c
        .post(format!("{}/api/login", s.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("email=a%40b.c&password=x")
        .send()
        .await?
        .status();
    let origin = c
        .post(format!("{}/api/login", s.base))
        .header("origin", s.base.replacen("http://", "https://", 1))
        .json(&json!({"email": "a@b.c", "password": "x"}))
        .send()
        .await?
        .status();
    println!("== small tricks");
    println!("  a 400 KB request head: {big}");
    println!("  a form body to /api/login: {form}");
    println!("  an https:// origin on the http host: {origin}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (mut server, _dir) = start()?;
    let result = async {
        slow_bodies(&server).await?;
        sign_in_flood(&server).await?;
        reset_timing(&server).await?;
        lock_out(&server).await?;
        small_tricks(&server).await
    }
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status();
    let _ = server.child.wait();
    result
}
