//! A real moss server for HTTP tests: the real router on a real socket (port 0), a tiny GGUF
//! model, and a fresh database — a SQLite file, or a new PostgreSQL database when
//! MOSS_TEST_POSTGRES_URL is set — plus, on request, a real SMTP sink.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moss::config::Config;
use moss::db::accounts::AccountRole;
use moss::db::Db;
use moss::engine::Arch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// An SMTP server (Python's aiosmtpd) that writes each message to a directory.
pub struct SmtpSink {
    child: std::process::Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl SmtpSink {
    pub fn start(dir: PathBuf) -> Self {
        use std::io::BufRead;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp_sink.py");
        // scripts/test names the Python of its virtual environment (with aiosmtpd).
        let python = std::env::var("MOSS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut child = std::process::Command::new(&python)
            .arg(script)
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{python} with aiosmtpd (scripts/test sets it up): {e}"));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("smtp sink did not start: {line:?}"));
        Self { child, port, dir }
    }

    /// Every message delivered so far (raw text), oldest first.
    pub fn messages(&self) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    /// Waits (up to 20 s) until a message to `to` containing `needle` arrives; returns it decoded.
    pub async fn wait_for(&self, to: &str, needle: &str) -> String {
        for _ in 0..200 {
            for m in self.messages() {
                let decoded = decode_mail(&m);
                if m.lines().next().is_some_and(|l| l.contains(to)) && decoded.contains(needle) {
                    return decoded;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no mail to {to} containing {needle:?}; got {:?}",
            self.messages()
        );
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Undoes quoted-printable / base64 bodies well enough to find links and codes in them.
pub fn decode_mail(raw: &str) -> String {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .or_else(|| raw.split_once("\n\n"))
        .unwrap_or((raw, ""));
    let lower = head.to_lowercase();
    let body = if lower.contains("content-transfer-encoding: base64") {
        let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        String::from_utf8_lossy(&base64_decode(&compact)).into_owned()
    } else if lower.contains("quoted-printable") {
        quoted_printable(body)
    } else {
        body.to_string()
    };
    format!("{head}\n\n{body}")
}

fn base64_decode(s: &str) -> Vec<u8> {
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let Some(v) = table.iter().position(|t| *t == c) else {
            continue;
        };
        buf = (buf << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

fn quoted_printable(s: &str) -> String {
    let joined = s.replace("=\r\n", "").replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&joined[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    pub base: String,
    pub db: Db,
    pub config: Arc<Config>,
    pub backend: Backend,
    pub smtp: Option<SmtpSink>,
    pub dir: tempfile::TempDir,
    pub database_url: String,
    pub proxy: Option<super::proxy::DbProxy>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Options for `TestApp::start`.
#[derive(Default, Clone)]
pub struct Options {
    pub smtp: bool,
    /// Slow the tiny model down (milliseconds per token) for stop/disconnect/queue tests.
    pub token_delay_ms: u64,
    /// Keep the configured (tight) rate limits instead of effectively unlimited ones.
    pub tight_limits: bool,
    /// Last changes to the configuration before the server starts.
    pub configure: Option<fn(&mut Config)>,
    /// PostgreSQL only: reach the database through a relay the test can cut (`TestApp::proxy`).
    pub db_proxy: bool,
    /// Answer through upstream OpenAI-compatible servers instead of a local tiny model.
    pub upstream: Option<UpstreamOptions>,
    /// A tiny model with a 2,048-token context (prompts that describe functions are long in
    /// its byte-sized vocabulary).
    pub long_context: bool,
}

/// `engine.backend = "openai"` for a test server.
#[derive(Clone)]
pub struct UpstreamOptions {
    pub urls: Vec<String>,
    pub api_key: String,
    pub response_timeout_secs: u64,
}

fn postgres_admin_url() -> Option<String> {
    std::env::var("MOSS_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// A fresh, empty PostgreSQL database; returns its URL.
async fn fresh_postgres(admin_url: &str) -> String {
    use sqlx::Connection;
    let name = format!("moss_t_{}", &moss::secrets::token()[..16]);
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("connect to MOSS_TEST_POSTGRES_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .unwrap_or(admin_url);
    format!("{base}/{name}")
}

impl TestApp {
    /// Starts a server on `backend`; None for PostgreSQL when MOSS_TEST_POSTGRES_URL is unset
    /// (CI sets it, and with MOSS_REQUIRE_POSTGRES=1 a missing URL fails instead).
    pub async fn start(backend: Backend, opts: Options) -> Option<TestApp> {
        Self::start_on(backend, opts, None).await
    }

    /// A fresh PostgreSQL database for several servers to share (None when not configured).
    pub async fn shared_postgres() -> Option<String> {
        match postgres_admin_url() {
            Some(url) => Some(fresh_postgres(&url).await),
            None => {
                assert!(
                    std::env::var("MOSS_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                    "MOSS_TEST_POSTGRES_URL is not set"
                );
                super::skipped("PostgreSQL: MOSS_TEST_POSTGRES_URL is not set");
                None
            }
        }
    }

    /// Like `start`, on an existing database when `database_url` is given (replicas).
    pub async fn start_on(
        backend: Backend,
        opts: Options,
        database_url: Option<String>,
    ) -> Option<TestApp> {
        let dir = tempfile::tempdir().unwrap();
        let database_url = match (backend, database_url) {
            (_, Some(url)) => url,
            (Backend::Sqlite, None) => {
                format!("sqlite://{}?mode=rwc", dir.path().join("moss.db").display())
            }
            (Backend::Postgres, None) => match postgres_admin_url() {
                Some(url) => fresh_postgres(&url).await,
                None => {
                    assert!(
                        std::env::var("MOSS_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                        "MOSS_TEST_POSTGRES_URL is not set"
                    );
                    super::skipped("PostgreSQL: MOSS_TEST_POSTGRES_URL is not set");
                    return None;
                }
            },
        };
        let mut proxy = None;
        let database_url = if opts.db_proxy && backend == Backend::Postgres {
            let url = url::Url::parse(&database_url).unwrap();
            let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
                .parse()
                .unwrap();
            let p = super::proxy::DbProxy::start(target).await;
            let mut via = url.clone();
            via.set_port(Some(p.addr.port())).unwrap();
            proxy = Some(p);
            via.to_string()
        } else {
            database_url
        };
        let smtp = opts.smtp.then(|| SmtpSink::start(dir.path().join("mail")));
        let mut config = Config::load(None).unwrap();
        config.database.url = database_url.clone();
        // The tiny model has a 512-token context and a byte-sized vocabulary: keep the system prompt short.
        config.engine.system_prompt = "You are moss, a helpful assistant.".into();
        // Every test client is 127.0.0.1: rate limits have tests of their own (Options::tight_limits).
        if !opts.tight_limits {
            let wide = moss::config::Bucket {
                per_minute: 1_000_000,
                burst: 1_000_000,
            };
            config.limits.auth = wide;
            config.limits.waitlist = wide;
            config.limits.generate = wide;
            config.limits.api = wide;
        }
        if let Some(s) = &smtp {
            config.smtp.host = "127.0.0.1".into();
            config.smtp.port = s.port;
            config.smtp.security = moss::config::SmtpSecurity::None;
            config.smtp.poll_secs = 1;
        }
        if let Some(u) = &opts.upstream {
            let c = &mut config.engine.upstream;
            config.engine.backend = moss::config::BackendKind::Openai;
            c.urls = u.urls.clone();
            c.model = "tiny".into();
            c.api_key = u.api_key.clone();
            c.connect_timeout_secs = 1;
            c.response_timeout_secs = u.response_timeout_secs;
            c.idle_timeout_secs = 10;
            c.failure_cooldown_secs = 1;
        }
        if let Some(f) = opts.configure {
            f(&mut config);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        config.server.addr = addr.to_string();
        let db = moss::cli::serve::open_db(&config)
            .await
            .expect("database opens and migrates");
        let engine: moss::answer::Backend = if opts.upstream.is_some() {
            moss::answer::Backend::Upstream(
                moss::upstream::Upstream::new(&config.engine.upstream).unwrap(),
            )
        } else {
            let context = match opts.long_context {
                true => 2048,
                false => moss::engine::tiny::TinySpec::new(Arch::Qwen2).context,
            };
            let model = super::tiny_model_with(dir.path(), Arch::Qwen2, context);
            let mut e = moss::engine::EngineOptions::new(&model);
            e.device = "cpu".into();
            e.token_delay = Duration::from_millis(opts.token_delay_ms);
            e.max_batch = config.engine.max_batch.min(config.limits.max_running);
            moss::engine::EngineHandle::start(e)
                .expect("engine starts")
                .into()
        };
        let config = Arc::new(config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // The production entry point: mail sender, state, server.
        tokio::spawn(moss::cli::serve::launch(
            db.clone(),
            config.clone(),
            engine,
            listener,
            async {
                let _ = rx.await;
            },
            Duration::from_secs(1),
        ));
        Some(TestApp {
            base: format!("http://{addr}"),
            db,
            config,
            backend,
            smtp,
            dir,
            database_url,
            proxy,
            shutdown: Some(tx),
        })
    }

    /// Sends a chat message and reads the whole event stream.
    pub async fn chat(
        &self,
        c: &reqwest::Client,
        conversation: i64,
        body: serde_json::Value,
    ) -> (u16, Vec<(String, serde_json::Value)>) {
        let r = c
            .post(self.url(&format!("/api/conversations/{conversation}/messages")))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status != 200 {
            return (
                status,
                vec![("http_error".into(), r.json().await.unwrap_or_default())],
            );
        }
        (status, parse_sse(&r.text().await.unwrap()))
    }

    /// Starts an answer in `conversation` and returns the open response once its first token has
    /// arrived (the answer keeps running until the response is dropped).
    pub async fn answer_in_progress(
        &self,
        c: &reqwest::Client,
        conversation: i64,
        max_tokens: u32,
    ) -> reqwest::Response {
        let url = self.url(&format!("/api/conversations/{conversation}/messages"));
        let mut r = c
            .post(url)
            .json(&serde_json::json!({"content": "hello", "max_tokens": max_tokens}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut seen = String::new();
        while !seen.contains("event: token") {
            let chunk = r
                .chunk()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("stream ended: {seen}"));
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        r
    }

    /// With room for one running answer and one waiting (`limits.max_running = 1`,
    /// `max_waiting = 1`): starts an answer for `running` and one for `waiting` (returning once
    /// it has heard that it waits), then sends a third question for `third` — the request the
    /// full line turns away. Returns the two open streams (the answers go on while they are
    /// held) and the third response.
    pub async fn fill_the_line(
        &self,
        running: &reqwest::Client,
        waiting: &reqwest::Client,
        third: &reqwest::Client,
    ) -> ([reqwest::Response; 2], reqwest::Response) {
        let conv = self.conversation(running).await;
        let first = self.answer_in_progress(running, conv, 300).await;
        let conv = self.conversation(waiting).await;
        let mut second = waiting
            .post(self.url(&format!("/api/conversations/{conv}/messages")))
            .json(&serde_json::json!({"content": "hi", "max_tokens": 5}))
            .send()
            .await
            .unwrap();
        let chunk = second.chunk().await.unwrap().unwrap();
        let chunk = String::from_utf8_lossy(&chunk).to_string();
        assert!(chunk.contains("event: queued"), "{chunk}");
        let conv = self.conversation(third).await;
        let r = third
            .post(self.url(&format!("/api/conversations/{conv}/messages")))
            .json(&serde_json::json!({"content": "hi"}))
            .send()
            .await
            .unwrap();
        ([first, second], r)
    }

    /// The status of a GET from a new, signed-out client.
    pub async fn status(&self, path: &str) -> reqwest::StatusCode {
        self.client()
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .status()
    }

    pub async fn conversation(&self, c: &reqwest::Client) -> i64 {
        let v: serde_json::Value = c
            .post(self.url("/api/conversations"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["id"].as_i64().unwrap()
    }

    /// Sends `body` as JSON with `method` to `path`; the status and the JSON answer (Null when
    /// there is none).
    pub async fn send_json(
        &self,
        c: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = c
            .request(method, self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    /// GET `path` as client `c` and read the JSON body.
    pub async fn get_json(&self, c: &reqwest::Client, path: &str) -> serde_json::Value {
        c.get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The messages of a conversation, as its owner sees them.
    pub async fn messages(&self, c: &reqwest::Client, conv: i64) -> Vec<serde_json::Value> {
        let v = self
            .get_json(c, &format!("/api/conversations/{conv}"))
            .await;
        v["messages"].as_array().unwrap().clone()
    }

    /// One sample from `/metrics` (0 when absent). Metrics are process-wide.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A client with its own cookie jar, on its own loopback address (`127.x.y.z`): rate limits,
    /// password checks and sign-in failures count per address.
    pub fn client_from(&self, ip: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .cookie_store(true)
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    }

    /// A client with its own cookie jar (one browser).
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .cookie_store(true)
            .build()
            .unwrap()
    }

    /// A new API key of the signed-in client `c` (the full `moss_…` key, shown once).
    pub async fn api_key(&self, c: &reqwest::Client) -> String {
        let r = c
            .post(self.url("/api/keys"))
            .json(&serde_json::json!({"name": "test key"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<serde_json::Value>().await.unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Mints invite codes straight in the database.
    pub async fn invite(&self, spec: moss::db::invites::InviteSpec) -> String {
        moss::db::invites::mint_many(&self.db, 1, &spec)
            .await
            .unwrap()
            .remove(0)
    }

    /// Registers a new account with a fresh code; returns its signed-in client.
    pub async fn user(&self, email: &str) -> reqwest::Client {
        self.user_with_role(email, AccountRole::User).await
    }

    pub async fn admin(&self, email: &str) -> reqwest::Client {
        self.user_with_role(email, AccountRole::Admin).await
    }

    async fn user_with_role(&self, email: &str, role: AccountRole) -> reqwest::Client {
        let code = self
            .invite(moss::db::invites::InviteSpec {
                role,
                ..Default::default()
            })
            .await;
        let c = self.client();
        let r = c
            .post(self.url("/api/register"))
            .json(&serde_json::json!({"invite_code": code, "email": email, "password": "a good long password"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        c
    }
}

/// Defines `mod NAME { sqlite(), postgres() }` tests that run `NAME(app)` on each backend.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        both_backends!($name, common::server::Options::default());
    };
    ($name:ident, $opts:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let app = common::server::TestApp::start(common::server::Backend::Sqlite, $opts)
                    .await
                    .unwrap();
                super::$name(app).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(app) =
                    common::server::TestApp::start(common::server::Backend::Postgres, $opts).await
                {
                    super::$name(app).await;
                }
            }
        }
    };
}

/// Parses a server-sent-events body into (event, data) pairs.
pub fn parse_sse(text: &str) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut name = String::from("message");
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if !data.is_empty() {
            out.push((
                name,
                serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data)),
            ));
        }
    }
    out
}
