//! Launch night's hostile crowd, one trick at a time: slow bodies, sign-in floods, probing for
//! accounts, reset-mail floods, forged origins, odd bodies and headers, invisible characters.
//! Each test fails when its defence is taken away.

mod common;

use std::time::Duration;

use common::server::{Backend, Options, TestApp};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sqlite(configure: fn(&mut moss::config::Config)) -> Options {
    Options {
        configure: Some(configure),
        ..Options::default()
    }
}

/// Registers `email` and returns its session cookie (`name=value`) for hand-written requests.
async fn session_cookie(app: &TestApp, email: &str) -> String {
    let code = app.invite(Default::default()).await;
    let r = reqwest::Client::new()
        .post(app.url("/api/register"))
        .json(&json!({"invite_code": code, "email": email, "password": "a good long password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let set = r.headers()["set-cookie"].to_str().unwrap();
    set.split(';').next().unwrap().to_string()
}

/// A signed-in client for `cookie`.
fn signed_in(cookie: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("cookie", cookie.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

fn host(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_string()
}

/// Reads what the server sends until it closes the connection (at most 20 s).
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
        .await
        .expect("the server closes the connection")
        .ok();
    String::from_utf8_lossy(&got).into_owned()
}

/// Requests that trickle their body hold only their own socket: no generation slot (capacity is
/// two here, four slow requests are open, and another user still gets an answer), and they are
/// answered 408 and closed after `server.body_timeout_secs`.
async fn slow_bodies_hold_no_slot(app: TestApp) {
    let cookie = session_cookie(&app, "slow@example.com").await;
    let slow_user = signed_in(&cookie);
    let conv = app.conversation(&slow_user).await;
    let key = app.api_key(&slow_user).await;
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(host(&app)).await.unwrap();
        let head = format!(
            "POST /api/conversations/{conv}/messages HTTP/1.1\r\nHost: {}\r\nCookie: {cookie}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
            host(&app)
        );
        s.write_all(head.as_bytes()).await.unwrap();
        slow.push(s);
    }
    // A chunked body that never ends, on the OpenAI-compatible path.
    let mut s = tokio::net::TcpStream::connect(host(&app)).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{{\"mes\r\n",
        host(&app)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    slow.push(s);
    // Another user's whole request, sent after them, is answered.
    let other = app.user("other@example.com").await;
    let conv2 = app.conversation(&other).await;
    let (status, events) = app
        .chat(&other, conv2, json!({"content": "hello", "max_tokens": 4}))
        .await;
    assert_eq!(status, 200, "{events:?}");
    assert_eq!(events.last().unwrap().0, "done", "{events:?}");
    for mut s in slow {
        let answer = read_until_closed(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
    }
    // Nothing stayed taken: the slow user's own complete request is answered too.
    let (status, events) = app
        .chat(
            &slow_user,
            conv,
            json!({"content": "hello", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_hold_no_slot_sqlite() {
    let app = TestApp::start(
        Backend::Sqlite,
        sqlite(|c| {
            c.limits.max_running = 1;
            c.limits.max_waiting = 1;
            c.server.body_timeout_secs = 2;
        }),
    )
    .await
    .unwrap();
    slow_bodies_hold_no_slot(app).await;
}

/// A sign-in flood from one address holds at most its share of the password checks: the rest are
/// answered `503 unavailable` at once (never queued without bound, never a 500), and a real user
/// on another address signs in during the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_flood_takes_only_its_share_of_password_checks() {
    let app = TestApp::start(
        Backend::Sqlite,
        sqlite(|c| {
            c.accounts.hash_threads = 1;
            c.accounts.hashes_per_client = 1;
            c.accounts.hash_wait_ms = 30_000;
        }),
    )
    .await
    .unwrap();
    app.user("real@example.com").await;
    let flood = app.client_from("127.0.0.3");
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..24 {
        let (c, url) = (flood.clone(), app.url("/api/login"));
        attempts.spawn(async move {
            let body =
                json!({"email": format!("nobody{i}@example.com"), "password": "guess guess"});
            let r = c.post(url).json(&body).send().await.unwrap();
            let retry = r.headers().get("retry-after").cloned();
            (r.status().as_u16(), retry, r.json::<Value>().await.unwrap())
        });
    }
    let real = app.client_from("127.0.0.2");
    let r = real
        .post(app.url("/api/login"))
        .json(&json!({"email": "real@example.com", "password": "a good long password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the real user signs in during the flood");
    let mut shed = 0;
    while let Some(a) = attempts.join_next().await {
        let (status, retry, body) = a.unwrap();
        match status {
            401 => assert_eq!(body["error"]["code"], "invalid_credentials"),
            503 => {
                assert_eq!(body["error"]["code"], "unavailable", "{body}");
                assert_eq!(retry.unwrap(), "2");
                shed += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(
        shed > 0,
        "one address held more than its share of password checks"
    );
}

/// `POST /api/password/forgot` answers before touching the database (the same answer in the same
/// time for any address): with the database gone it still says 202 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_reset_requests_are_answered_before_the_work() {
    let options = Options {
        db_proxy: true,
        configure: Some(|c| c.database.acquire_timeout_secs = 1),
        ..Options::default()
    };
    let Some(app) = TestApp::start(Backend::Postgres, options).await else {
        return;
    };
    app.user("known@example.com").await;
    app.proxy.as_ref().unwrap().cut();
    for email in ["known@example.com", "unknown@example.com"] {
        let r = app
            .client()
            .post(app.url("/api/password/forgot"))
            .json(&json!({ "email": email }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{email}");
        // The same answer for every address (whether mail goes out is the service's, not the
        // address's).
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"status": "accepted", "mail": app.config.smtp.enabled()})
        );
    }
}

/// Reset mails are held to a few per account per hour, only the newest link works, and using it
/// ends every API key along with every session.
async fn reset_mails_are_throttled_and_end_api_keys(app: TestApp) {
    let sink = app.smtp.as_ref().unwrap();
    let owner = app.user("owner@example.com").await;
    app.user("zz@example.com").await;
    let key = app.api_key(&owner).await;
    let forgot = |email: &'static str| {
        app.client()
            .post(app.url("/api/password/forgot"))
            .json(&json!({ "email": email }))
            .send()
    };
    for _ in 0..6 {
        assert_eq!(forgot("owner@example.com").await.unwrap().status(), 202);
    }
    // Requests are handled in order: once the marker's mail is out, all six have been handled.
    assert_eq!(forgot("zz@example.com").await.unwrap().status(), 202);
    sink.wait_for("zz@example.com", "/reset?token=").await;
    let per_hour = app.config.accounts.reset_mails_per_hour as usize;
    let outbox: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE to_email = 'owner@example.com'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(outbox as usize, per_hour, "reset mails per hour");
    let mut tokens = Vec::new();
    for m in sink.messages() {
        let m = common::server::decode_mail(&m);
        if m.lines()
            .next()
            .is_some_and(|l| l.contains("owner@example.com"))
        {
            let at = m.find("/reset?token=").unwrap() + "/reset?token=".len();
            tokens.push(m[at..at + 64].to_string());
        }
    }
    // (mail is delivered in the order it was queued)
    assert_eq!(tokens.len(), per_hour);
    let reset = |token: String| {
        app.client()
            .post(app.url("/api/password/reset"))
            .json(&json!({"token": token, "password": "a brand new password"}))
            .send()
    };
    for old in &tokens[..per_hour - 1] {
        assert_eq!(
            reset(old.clone()).await.unwrap().status(),
            400,
            "an older link"
        );
    }
    let models = |key: &str| {
        reqwest::Client::new()
            .get(app.url("/v1/models"))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(models(&key).await.unwrap().status(), 200);
    assert_eq!(
        reset(tokens[per_hour - 1].clone()).await.unwrap().status(),
        204
    );
    assert_eq!(
        models(&key).await.unwrap().status(),
        401,
        "keys end with a reset"
    );
}
both_backends!(
    reset_mails_are_throttled_and_end_api_keys,
    Options {
        smtp: true,
        ..Options::default()
    }
);

/// Every state-changing route refuses a browser request from elsewhere: another site, a sibling
/// subdomain (`same-site`), an opaque (`null`) or foreign origin, or this host under another
/// scheme or port. The list is checked against the routers' source, so a new route cannot be
/// left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_writes_are_refused_on_every_route() {
    let app = TestApp::start(Backend::Sqlite, Options::default())
        .await
        .unwrap();
    let routes = [
        ("POST", "/api/register"),
        ("POST", "/api/login"),
        ("POST", "/api/password/forgot"),
        ("POST", "/api/password/reset"),
        ("POST", "/api/logout"),
        ("PUT", "/api/consent"),
        ("POST", "/api/admin/waitlist/admit"),
        ("POST", "/api/admin/invites"),
        ("POST", "/api/admin/invites/{id}/revoke"),
        ("POST", "/api/admin/waitlist/{id}/admit"),
        ("DELETE", "/api/admin/waitlist/{id}"),
        ("POST", "/api/admin/users/{id}/role"),
        ("POST", "/api/admin/users/{id}/reset-link"),
        ("DELETE", "/api/admin/users/{id}"),
        ("PUT", "/api/me/password"),
        ("POST", "/api/me/delete"),
        ("PUT", "/api/me/profile"),
        ("POST", "/api/conversations/{id}/messages"),
        ("POST", "/api/messages/{id}/regenerate"),
        ("POST", "/api/conversations/{id}/stop"),
        ("POST", "/api/conversations/{id}/branch"),
        ("POST", "/api/messages/{id}/edit"),
        ("POST", "/api/conversations"),
        ("PATCH", "/api/conversations/{id}"),
        ("DELETE", "/api/conversations/{id}"),
        ("POST", "/api/messages/{id}/feedback"),
        ("POST", "/api/keys"),
        ("DELETE", "/api/keys/{id}"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/api/waitlist"),
    ];
    let mut declared = declared_writes();
    declared.sort();
    let mut listed: Vec<(String, String)> = routes
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    listed.sort();
    assert_eq!(
        listed, declared,
        "every state-changing route is in this test"
    );

    let cookie = session_cookie(&app, "victim@example.com").await;
    let ours = app.base.clone();
    let port = app.base.rsplit(':').next().unwrap().to_string();
    let bad: [(&str, String); 6] = [
        ("sec-fetch-site", "cross-site".into()),
        ("sec-fetch-site", "same-site".into()),
        ("origin", "null".into()),
        ("origin", "https://evil.example".into()),
        ("origin", ours.replacen("http://", "https://", 1)),
        (
            "origin",
            format!("http://127.0.0.1:{}", port.parse::<u16>().unwrap() + 1),
        ),
    ];
    let c = reqwest::Client::new();
    for (method, path) in routes {
        let path = path.replace("{id}", "1");
        let send = |name: &str, value: &str| {
            c.request(method.parse().unwrap(), app.url(&path))
                .header("cookie", &cookie)
                .header(name, value)
                .json(&json!({}))
                .send()
        };
        for (name, value) in &bad {
            let r = send(name, value).await.unwrap();
            assert_eq!(r.status(), 403, "{method} {path} with {name}: {value}");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "forbidden");
        }
        // The page's own requests pass the check (whatever the handler then says).
        let r = send("origin", &ours).await.unwrap();
        assert_ne!(r.status(), 403, "{method} {path} from our own origin");
        let r = send("sec-fetch-site", "same-origin").await.unwrap();
        assert_ne!(r.status(), 403, "{method} {path} same-origin");
    }
}

/// (method, path) of every POST, PUT, PATCH and DELETE route declared in `src/http/`.
fn declared_writes() -> Vec<(String, String)> {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http"));
    // Every .rs file under src/http, modules in folders too.
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(folder).unwrap() {
            let path = entry.unwrap().path();
            match path.is_dir() {
                true => folders.push(path),
                false => files.push(path),
            }
        }
    }
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        for (at, _) in text.match_indices(".route(") {
            // The call's text, up to its closing parenthesis.
            let rest = &text[at + ".route(".len()..];
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|(_, ch)| {
                    match ch {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .unwrap()
                .0;
            let call = &rest[..end];
            let path = call.split('"').nth(1).unwrap();
            for method in ["post", "put", "patch", "delete"] {
                let used = call.contains(&format!(" {method}("))
                    || call.contains(&format!(".{method}("))
                    || call.contains(&format!("({method}("));
                if used {
                    out.push((method.to_uppercase(), path.to_string()));
                }
            }
        }
    }
    out
}

/// Only JSON bodies are read: a form or plain text (which any page may send to another site
/// without asking) is answered 415 on every route that takes a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_must_be_json() {
    let app = TestApp::start(Backend::Sqlite, Options::default())
        .await
        .unwrap();
    let c = app.user("json@example.com").await;
    let key = app.api_key(&c).await;
    let conv = app.conversation(&c).await;
    let cases = [
        (
            "/api/login",
            "application/x-www-form-urlencoded",
            "email=a%40b.c&password=x",
        ),
        ("/api/conversations", "text/plain", "{\"title\": \"t\"}"),
        ("/api/keys", "text/plain", "{\"name\": \"n\"}"),
        ("/api/messages/1/regenerate", "text/plain", "{}"),
        (
            "/v1/chat/completions",
            "text/plain",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}",
        ),
        (
            "/api/waitlist",
            "multipart/form-data; boundary=x",
            "--x\r\n\r\n--x--",
        ),
    ];
    for (path, kind, body) in cases {
        let r = c
            .post(app.url(path))
            .bearer_auth(&key)
            .header("content-type", kind)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{path} with {kind}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unsupported_media_type");
    }
    // JSON with a charset, or `+json`, is JSON; an empty body needs no type.
    let r = c
        .post(app.url("/api/conversations"))
        .header("content-type", "application/json; charset=utf-8")
        .body("{\"title\": \"ok\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c.post(app.url("/api/conversations")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let (status, _) = app
        .chat(&c, conv, json!({"content": "hello", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200);
}

/// Names, titles, notes and addresses refuse the invisible characters that reorder text (a
/// right-to-left override makes `evil@moc.example` read differently in the admin page), and a
/// title made from a message drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_text_direction_characters_are_refused() {
    let app = TestApp::start(Backend::Sqlite, Options::default())
        .await
        .unwrap();
    let code = app.invite(Default::default()).await;
    let c = app.client();
    let r = c
        .post(app.url("/api/register"))
        .json(&json!({"invite_code": code, "email": "b@example.com", "password": "a good long password", "display_name": "admin\u{202E}nimda"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_characters"
    );
    for email in [
        "a\u{202E}b@example.com",
        "a\u{200B}b@example.com",
        "a\u{7}b@example.com",
    ] {
        let r = c
            .post(app.url("/api/waitlist"))
            .json(&json!({ "email": email }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{email:?}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"]["code"],
            "invalid_email"
        );
    }
    let user = app.user("u@example.com").await;
    let conv = app.conversation(&user).await;
    for title in ["x\u{2066}y", "line\nbreak", "\u{FEFF}bom"] {
        let r = user
            .patch(app.url(&format!("/api/conversations/{conv}")))
            .json(&json!({ "title": title }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{title:?}");
    }
    // A title taken from the first message leaves them out.
    let (status, _) = app
        .chat(
            &user,
            conv,
            json!({"content": "abc\u{202E}def\u{200F}", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
    let v = app
        .get_json(&user, &format!("/api/conversations/{conv}"))
        .await;
    assert_eq!(v["title"], "abcdef");
    // Family emoji keep their zero-width joiners.
    let r = user
        .patch(app.url(&format!("/api/conversations/{conv}")))
        .json(&json!({"title": "👨\u{200D}👩\u{200D}👧"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Request heads are limited (431 past `server.max_header_bytes`), HSTS is sent only over https,
/// and the API key's scheme is case-insensitive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_are_bounded_and_the_bearer_scheme_is_case_insensitive() {
    let app = TestApp::start(Backend::Sqlite, Options::default())
        .await
        .unwrap();
    let limit = app.config.server.max_header_bytes;
    let mut s = tokio::net::TcpStream::connect(host(&app)).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: moss\r\nX-Big: {}\r\n\r\n",
        "a".repeat(limit * 2)
    );
    let _ = s.write_all(head.as_bytes()).await;
    let answer = read_until_closed(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let r = app
        .client()
        .get(app.url("/healthz"))
        .header("x-fine", "b".repeat(limit / 4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !r.headers().contains_key("strict-transport-security"),
        "no HSTS over plain http"
    );
    let c = app.user("k@example.com").await;
    let key = app.api_key(&c).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = reqwest::Client::new()
            .get(app.url("/v1/models"))
            .header("authorization", format!("{scheme} {key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let r = reqwest::Client::new()
        .get(app.url("/v1/models"))
        .header("authorization", format!("Basic {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Behind an https address (`server.public_url`): Strict-Transport-Security on every answer, and
/// the Origin check compares with that address — scheme, host and port — not with the Host header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_deployments_send_hsts_and_check_origins_against_the_public_url() {
    let app = TestApp::start(
        Backend::Sqlite,
        sqlite(|c| c.server.public_url = "https://chat.example.org".into()),
    )
    .await
    .unwrap();
    for path in ["/healthz", "/", "/api/me"] {
        let r = app.client().get(app.url(path)).send().await.unwrap();
        assert_eq!(
            r.headers()["strict-transport-security"],
            "max-age=63072000",
            "{path}"
        );
    }
    let login = |origin: String| {
        app.client()
            .post(app.url("/api/login"))
            .header("origin", origin)
            .json(&json!({"email": "x@example.com", "password": "whatever it is"}))
            .send()
    };
    assert_eq!(
        login("https://chat.example.org".into())
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        login(app.base.clone()).await.unwrap().status(),
        403,
        "the Host is not the site"
    );
    assert_eq!(
        login("http://chat.example.org".into())
            .await
            .unwrap()
            .status(),
        403
    );
}

/// `/readyz` is never rate-limited, so callers share one probe a second instead of each pinging
/// the database: forty at once see at most a couple of probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_probes_are_shared() {
    let app = TestApp::start(Backend::Sqlite, Options::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (c, url) = (app.client(), app.url("/readyz"));
        calls.spawn(async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["probe"].as_u64().unwrap()
        });
    }
    let mut probes = std::collections::BTreeSet::new();
    while let Some(p) = calls.join_next().await {
        probes.insert(p.unwrap());
    }
    let bound = started.elapsed().as_secs() as usize + 2;
    assert!(
        probes.len() <= bound,
        "{} probes for 40 calls",
        probes.len()
    );
}

/// An API exchange kept with `store: true` whose conversation is deleted while it is answered:
/// the caller still gets the answer (streamed and not), never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_api_exchange_deleted_mid_answer_still_answers() {
    let app = TestApp::start(
        Backend::Sqlite,
        Options {
            token_delay_ms: 40,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let c = app.user("store@example.com").await;
    let key = app.api_key(&c).await;
    let ask = |stream: bool| {
        reqwest::Client::new()
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 30, "store": true, "stream": stream}))
            .send()
    };
    let delete_the_exchange = || async {
        let v = app.get_json(&c, "/api/conversations").await;
        let id = v["conversations"][0]["id"]
            .as_i64()
            .expect("the exchange is kept");
        let r = c
            .delete(app.url(&format!("/api/conversations/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    };
    // Streamed: delete after the first piece.
    let mut r = ask(true).await.unwrap();
    assert_eq!(r.status(), 200);
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 2 {
        seen.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
    }
    delete_the_exchange().await;
    while let Some(chunk) = r.chunk().await.unwrap() {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("data: [DONE]"), "{seen}");
    assert!(!seen.contains("\"error\""), "{seen}");
    // Not streamed: delete while it runs (the exchange is stored before the answer starts).
    let pending = tokio::spawn(ask(false));
    loop {
        let v = app.get_json(&c, "/api/conversations").await;
        if !v["conversations"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    delete_the_exchange().await;
    let r = pending.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["choices"][0]["message"]["content"].as_str().is_some(),
        "{v}"
    );
}
