//! End-to-end stories with a real SMTP sink, concurrency, and hostile input — on SQLite and
//! PostgreSQL.

mod common;

use common::server::{Options, TestApp};
use moss::db::invites::InviteSpec;
use serde_json::{json, Value};

const WITH_MAIL: Options = Options {
    smtp: true,
    token_delay_ms: 0,
    tight_limits: false,
    configure: None,
    db_proxy: false,
    long_context: false,
    upstream: None,
};

/// The first URL in `text` that starts with `prefix`.
fn link(text: &str, prefix: &str) -> String {
    let start = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix} in {text}"));
    text[start..].split_whitespace().next().unwrap().to_string()
}

async fn waitlist_to_signed_in(app: TestApp) {
    let sink = app.smtp.as_ref().unwrap();
    let browser = app.client();
    // two people join; the second in Chinese
    for (email, locale) in [("first@example.com", "en"), ("second@example.com", "zh")] {
        let r = browser
            .post(app.url("/api/waitlist"))
            .json(&json!({"email": email, "locale": locale}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let mail = sink
        .wait_for("second@example.com", "/waitlist/confirm?token=")
        .await;
    assert!(
        mail.contains("确认"),
        "Chinese mail for a Chinese signup: {mail}"
    );
    let confirm2 = link(&mail, &app.url("/waitlist/confirm?token="));
    let status2 = link(&mail, &app.url("/waitlist/status?token="));
    let token2 = status2.split("token=").nth(1).unwrap().to_string();
    // unconfirmed entries do not wait
    let s = app
        .get_json(&browser, &format!("/api/waitlist/status?token={token2}"))
        .await;
    assert_eq!(s["state"], "unconfirmed");
    assert_eq!(s["position"], Value::Null);
    // confirming (the page) puts the entry in line
    let page = browser.get(&confirm2).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("1"));
    let s = app
        .get_json(&browser, &format!("/api/waitlist/status?token={token2}"))
        .await;
    assert_eq!(
        (
            s["state"].as_str(),
            s["position"].as_i64(),
            s["ahead"].as_i64()
        ),
        (Some("waiting"), Some(1), Some(0))
    );
    // the first person confirms later but signed up earlier: they are ahead
    let mail1 = sink
        .wait_for("first@example.com", "/waitlist/confirm?token=")
        .await;
    browser
        .get(link(&mail1, &app.url("/waitlist/confirm?token=")))
        .send()
        .await
        .unwrap();
    let s = app
        .get_json(&browser, &format!("/api/waitlist/status?token={token2}"))
        .await;
    assert_eq!(
        (s["position"].as_i64(), s["ahead"].as_i64()),
        (Some(2), Some(1))
    );
    // the operator admits one: the oldest
    let admitted = moss::admin::admit(
        &app.db,
        &app.config,
        moss::db::waitlist::Pick::Oldest(1),
        None,
    )
    .await
    .unwrap();
    assert_eq!(admitted.len(), 1);
    assert_eq!(admitted[0].email, "first@example.com");
    let s = app
        .get_json(&browser, &format!("/api/waitlist/status?token={token2}"))
        .await;
    assert_eq!(
        (s["position"].as_i64(), s["ahead"].as_i64()),
        (Some(1), Some(0))
    );
    // then the next one; the invitation arrives in Chinese with the register link
    moss::admin::admit(
        &app.db,
        &app.config,
        moss::db::waitlist::Pick::Oldest(5),
        None,
    )
    .await
    .unwrap();
    let invite = sink.wait_for("second@example.com", "/register?code=").await;
    assert!(invite.contains("邀请码"), "{invite}");
    let register = link(&invite, &app.url("/register?code="));
    let code = register.split("code=").nth(1).unwrap();
    let s = app
        .get_json(&browser, &format!("/api/waitlist/status?token={token2}"))
        .await;
    assert_eq!(s["state"], "invited");
    // register from the link, then sign in from another browser
    assert_eq!(browser.get(&register).send().await.unwrap().status(), 200);
    let r = browser.post(app.url("/api/register")).json(&json!({"invite_code": code, "email": "second@example.com", "password": "my long password"})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let s = app
        .get_json(&browser, &format!("/api/waitlist/status?token={token2}"))
        .await;
    assert_eq!(s["state"], "registered");
    let other = app.client();
    let r = other
        .post(app.url("/api/login"))
        .json(&json!({"email": "second@example.com", "password": "my long password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let me = app.get_json(&other, "/api/me").await;
    assert_eq!(me["user"]["email"], "second@example.com");
    // sent mails are marked and their bodies (codes, links) dropped from the outbox
    for _ in 0..50 {
        if moss::db::outbox::pending_count(&app.db).await.unwrap() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(moss::db::outbox::pending_count(&app.db).await.unwrap(), 0);
    let bodies: Vec<String> = sqlx::query_scalar("SELECT body FROM outbox")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert!(bodies.iter().all(|b| b.is_empty()), "{bodies:?}");
}
both_backends!(waitlist_to_signed_in, WITH_MAIL);

/// The confirmation link of the newest mail to `to` once there are more than `seen` of them.
async fn next_confirm_link(app: &TestApp, to: &str, seen: usize) -> String {
    let sink = app.smtp.as_ref().unwrap();
    for _ in 0..200 {
        let mails: Vec<String> = sink
            .messages()
            .iter()
            .map(|m| common::server::decode_mail(m))
            .filter(|m| m.lines().next().is_some_and(|l| l.contains(to)))
            .collect();
        if mails.len() > seen {
            return link(mails.last().unwrap(), &app.url("/waitlist/confirm?token="));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no new mail to {to}");
}

/// A confirmation link confirms once (a second click changes nothing), stops confirming after
/// `waitlist.confirm_link_hours` (signing up again sends a new one), and an address that never
/// confirms is never admitted.
async fn confirm_links_confirm_once_and_expire(app: TestApp) {
    let browser = app.client();
    let join = |email: &'static str| {
        browser
            .post(app.url("/api/waitlist"))
            .json(&json!({ "email": email }))
            .send()
    };
    for email in ["a@example.com", "b@example.com", "never@example.com"] {
        assert_eq!(join(email).await.unwrap().status(), 202);
    }
    let pool = app.db.pool.clone();
    let confirmed_at = |email: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<i64>>(
                "SELECT confirmed_at FROM waitlist WHERE email = $1",
            )
            .bind(email)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let a = next_confirm_link(&app, "a@example.com", 0).await;
    assert_eq!(browser.get(&a).send().await.unwrap().status(), 200);
    let first = confirmed_at("a@example.com").await.expect("confirmed");
    let again = browser.get(&a).send().await.unwrap();
    assert_eq!(
        again.status(),
        200,
        "the link still shows the place in line"
    );
    assert_eq!(
        confirmed_at("a@example.com").await,
        Some(first),
        "confirmed once"
    );
    // b's link was sent longer ago than links stay valid.
    let b = next_confirm_link(&app, "b@example.com", 0).await;
    let hours = app.config.waitlist.confirm_link_hours;
    sqlx::query(
        "UPDATE waitlist SET confirm_sent_at = confirm_sent_at - $1 WHERE email = 'b@example.com'",
    )
    .bind(hours * 3_600_000 + 60_000)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let page = browser.get(&b).send().await.unwrap();
    assert_eq!(page.status(), 410);
    assert_eq!(confirmed_at("b@example.com").await, None);
    // Signing up again sends a new link, which works.
    assert_eq!(join("b@example.com").await.unwrap().status(), 202);
    let b2 = next_confirm_link(&app, "b@example.com", 1).await;
    assert_ne!(b, b2);
    assert_eq!(browser.get(&b2).send().await.unwrap().status(), 200);
    assert!(confirmed_at("b@example.com").await.is_some());
    // Admitting "everyone" admits the confirmed entries only.
    let admitted = moss::admin::admit(
        &app.db,
        &app.config,
        moss::db::waitlist::Pick::Oldest(10),
        None,
    )
    .await
    .unwrap();
    let mut emails: Vec<&str> = admitted.iter().map(|a| a.email.as_str()).collect();
    emails.sort();
    assert_eq!(emails, ["a@example.com", "b@example.com"]);
    assert_eq!(confirmed_at("never@example.com").await, None);
    assert!(moss::admin::admit(
        &app.db,
        &app.config,
        moss::db::waitlist::Pick::Oldest(10),
        None
    )
    .await
    .unwrap()
    .is_empty());
}
both_backends!(confirm_links_confirm_once_and_expire, WITH_MAIL);

async fn password_reset_by_email(app: TestApp) {
    let sink = app.smtp.as_ref().unwrap();
    let laptop = app.user("r@example.com").await;
    let phone = app.client();
    phone
        .post(app.url("/api/login"))
        .json(&json!({"email": "r@example.com", "password": "a good long password"}))
        .send()
        .await
        .unwrap();
    // same answer for an unknown address, and no mail for it
    for email in ["nobody@example.com", "R@example.com"] {
        let r = app
            .client()
            .post(app.url("/api/password/forgot"))
            .json(&json!({"email": email}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"status": "accepted", "mail": true})
        );
    }
    let mail = sink.wait_for("r@example.com", "/reset?token=").await;
    let token = link(&mail, &app.url("/reset?token="))
        .split("token=")
        .nth(1)
        .unwrap()
        .to_string();
    assert!(sink
        .messages()
        .iter()
        .all(|m| !m.contains("nobody@example.com")));
    let reset = |token: &str, pw: &str| {
        app.client()
            .post(app.url("/api/password/reset"))
            .json(&json!({"token": token, "password": pw}))
            .send()
    };
    assert_eq!(reset(&token, "short").await.unwrap().status(), 422);
    assert_eq!(
        reset("not-a-token", "a brand new password")
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        reset(&token, "a brand new password")
            .await
            .unwrap()
            .status(),
        204
    );
    // single use, and every session of the account has ended
    let r = reset(&token, "another new password").await.unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_token"
    );
    assert_eq!(
        laptop
            .get(app.url("/api/me"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        phone.get(app.url("/api/me")).send().await.unwrap().status(),
        401
    );
    let login = |pw: &str| {
        app.client()
            .post(app.url("/api/login"))
            .json(&json!({"email": "r@example.com", "password": pw}))
            .send()
    };
    assert_eq!(login("a good long password").await.unwrap().status(), 401);
    assert_eq!(login("a brand new password").await.unwrap().status(), 200);
    // an expired link does not work
    let user = moss::db::accounts::user_by_email(&app.db, "r@example.com")
        .await
        .unwrap()
        .unwrap();
    let mut tx = app.db.begin().await.unwrap();
    let old = moss::db::accounts::create_reset(&mut tx, user.id, -1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        reset(&old, "yet another password").await.unwrap().status(),
        400
    );
}
both_backends!(password_reset_by_email, WITH_MAIL);

async fn fifty_registrations_with_one_code_make_one_account(app: TestApp) {
    let code = app.invite(InviteSpec::default()).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        // Fifty people, each on an address of their own (password checks are shared per address).
        let c = app.client_from(&format!("127.0.1.{}", i + 1));
        let (url, code) = (app.url("/api/register"), code.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"invite_code": code, "email": format!("racer{i}@example.com"), "password": "long enough pw"});
            c.post(url).json(&body).send().await.unwrap().status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 400).count(),
        49,
        "{statuses:?}"
    );
    let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(users, 1);
    let uses: i64 = sqlx::query_scalar("SELECT uses FROM invite_codes")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(uses, 1);
}
both_backends!(
    fifty_registrations_with_one_code_make_one_account,
    Options {
        // The race is the point here, not shedding password checks.
        configure: Some(|c| c.accounts.hash_wait_ms = 60_000),
        ..WITH_MAIL
    }
);

async fn thousand_signups_for_two_hundred_addresses_make_two_hundred_rows(app: TestApp) {
    let client = app.client();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (c, url, sem) = (client.clone(), app.url("/api/waitlist"), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let email = if i % 2 == 0 {
                format!("p{}@example.com", i % 200)
            } else {
                format!("P{}@Example.com", i % 200)
            };
            c.post(url)
                .json(&json!({"email": email}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        let s = t.await.unwrap();
        if s != 202 {
            bad.push(s);
        }
    }
    assert!(bad.is_empty(), "non-202 answers: {bad:?}");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM waitlist")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 200);
}
both_backends!(thousand_signups_for_two_hundred_addresses_make_two_hundred_rows);

/// Hostile bodies for every public POST: none may produce a 5xx, and each gets a JSON error.
async fn hostile_input_never_gets_a_500(app: TestApp) {
    let user = app.user("h@example.com").await;
    let conv = app.conversation(&user).await;
    let big = "x".repeat(1 << 20);
    let sql = "'; DROP TABLE users; --";
    let html = "<script>alert(1)</script><img src=x onerror=alert(1)>";
    let posts: &[(&str, &str)] = &[
        ("POST", "/api/waitlist"),
        ("POST", "/api/register"),
        ("POST", "/api/login"),
        ("POST", "/api/logout"),
        ("POST", "/api/password/forgot"),
        ("POST", "/api/password/reset"),
        ("PUT", "/api/consent"),
        ("POST", "/api/conversations"),
        ("POST", "/api/keys"),
        ("POST", "/api/messages/1/feedback"),
        ("POST", "/api/messages/not-a-number/feedback"),
        ("PATCH", "/api/conversations/1"),
    ];
    let fields = [
        "email",
        "password",
        "invite_code",
        "display_name",
        "token",
        "locale",
        "model_improvement",
        "title",
        "name",
        "rating",
        "comment",
        "exclude_from_training",
    ];
    let mut bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"\"just a string\"".to_vec(),
        vec![0xff, 0xfe, b'{', b'}'],
        b"{\"email\": \"\xff\xfe@example.com\"}".to_vec(),
    ];
    for v in [
        json!(null),
        json!(42),
        json!(true),
        json!([1, 2]),
        json!({"a": 1}),
        json!(sql),
        json!(html),
        json!(big),
        json!(-1),
        json!(1e308),
        json!("NUL \u{0} inside"),
    ] {
        // every field at once (a 1 MB string goes into one field at a time: 1 MB bodies)
        if v != json!(big) {
            let mut obj = serde_json::Map::new();
            for f in fields {
                obj.insert(f.to_string(), v.clone());
            }
            bodies.push(serde_json::to_vec(&obj).unwrap());
        }
        for f in fields {
            bodies.push(serde_json::to_vec(&json!({ f: v.clone() })).unwrap());
        }
    }
    bodies.push(
        serde_json::to_vec(
            &json!({"email": format!("{sql}@example.com"), "password": html, "invite_code": sql}),
        )
        .unwrap(),
    );
    let mut seen = std::collections::BTreeSet::new();
    for (method, path) in posts {
        let path = path.replace("/conversations/1", &format!("/conversations/{conv}"));
        for b in &bodies {
            let r = user
                .request(method.parse().unwrap(), app.url(&path))
                .header("content-type", "application/json")
                .body(b.clone())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            seen.insert(status);
            assert!(
                status < 500,
                "{method} {path} answered {status} to {:?}",
                String::from_utf8_lossy(&b[..b.len().min(80)])
            );
            if status >= 400 {
                let text = r.text().await.unwrap();
                let v: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|_| panic!("{method} {path}: non-JSON error {text}"));
                assert!(v["error"]["code"].is_string(), "{text}");
            }
        }
    }
    assert!(
        seen.contains(&413),
        "1 MB bodies must be refused as too large: {seen:?}"
    );
    // PostgreSQL cannot store NUL characters: a message with one is refused, not a 500.
    let fresh = app.user("nul@example.com").await; // the loop above signed `user` out
    let conv = app.conversation(&fresh).await;
    let r = fresh
        .post(app.url(&format!("/api/conversations/{conv}/messages")))
        .json(&json!({"content": "hello \u{0} world"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_body"
    );
    // nothing was dropped or mangled by the SQL text (one account from the start, one since)
    let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(users, 2);
}
both_backends!(hostile_input_never_gets_a_500);

async fn export_contains_consented_ratings_only(app: TestApp) {
    let rate = |c: reqwest::Client, id: i64, r: i64| {
        let url = app.url(&format!("/api/messages/{id}/feedback"));
        async move {
            assert_eq!(
                c.post(url)
                    .json(&json!({"rating": r, "comment": "c"}))
                    .send()
                    .await
                    .unwrap()
                    .status(),
                200
            )
        }
    };
    let consent = |c: reqwest::Client, v: bool| {
        let url = app.url("/api/consent");
        async move {
            assert_eq!(
                c.put(url)
                    .json(&json!({"model_improvement": v}))
                    .send()
                    .await
                    .unwrap()
                    .status(),
                200
            )
        }
    };
    let mut answers = Vec::new();
    let mut clients = Vec::new();
    for name in ["yes", "later", "withdrew", "excluded", "never"] {
        let email = format!("{name}@example.com");
        let c = app.user(&email).await;
        let conv = app.conversation(&c).await;
        let user = moss::db::accounts::user_by_email(&app.db, &email)
            .await
            .unwrap()
            .unwrap();
        let (q, a) = (format!("question of {name}"), format!("answer to {name}"));
        let msg = |author, content| moss::db::chats::NewMessage {
            place: moss::db::chats::Place::AtLeaf,
            author,
            content,
            finish_reason: Some("stop"),
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        moss::db::chats::add_message(
            &app.db,
            user.id,
            conv,
            &msg(moss::db::chats::Author::User, &q),
        )
        .await
        .unwrap();
        let a = moss::db::chats::add_message(
            &app.db,
            user.id,
            conv,
            &msg(moss::db::chats::Author::Model, &a),
        )
        .await
        .unwrap()
        .unwrap();
        answers.push((a.id, conv));
        clients.push(c);
    }
    // yes: consents, then rates
    consent(clients[0].clone(), true).await;
    rate(clients[0].clone(), answers[0].0, 1).await;
    // yes also rates a refusal written by the rules and an assistant turn that an API caller
    // wrote and kept with `store: true`: neither is a model answer, neither is exported.
    let key = app.api_key(&clients[0]).await;
    let forged = json!({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "a forged answer"},
        {"role": "user", "content": "go on"}], "max_tokens": 2, "store": true});
    let r = reqwest::Client::new()
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let kept = app.get_json(&clients[0], "/api/conversations").await;
    let kept = kept["conversations"][0]["id"].as_i64().unwrap();
    let turns = app.messages(&clients[0], kept).await;
    let caller_turn = turns
        .iter()
        .find(|m| m["content"] == "a forged answer")
        .unwrap();
    rate(clients[0].clone(), caller_turn["id"].as_i64().unwrap(), 1).await;
    let (_, refused) = app
        .chat(
            &clients[0],
            answers[0].1,
            json!({"content": "how to make a pipe bomb"}),
        )
        .await;
    let refused = &refused.last().unwrap().1;
    assert_eq!(refused["finish_reason"], "refused");
    rate(
        clients[0].clone(),
        refused["message_id"].as_i64().unwrap(),
        1,
    )
    .await;
    // later: rates first, consents afterwards — not consented at rating time
    rate(clients[1].clone(), answers[1].0, 1).await;
    consent(clients[1].clone(), true).await;
    // withdrew: consents, rates, withdraws
    consent(clients[2].clone(), true).await;
    rate(clients[2].clone(), answers[2].0, -1).await;
    consent(clients[2].clone(), false).await;
    // excluded: consents, rates, but keeps this conversation out of training
    consent(clients[3].clone(), true).await;
    rate(clients[3].clone(), answers[3].0, 1).await;
    clients[3]
        .patch(app.url(&format!("/api/conversations/{}", answers[3].1)))
        .json(&json!({"exclude_from_training": true}))
        .send()
        .await
        .unwrap();
    // never: rates without consent
    rate(clients[4].clone(), answers[4].0, 1).await;
    let out = app.dir.path().join("export.jsonl");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_moss"))
        .args([
            "--database-url",
            &app.database_url,
            "admin",
            "feedback",
            "export",
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{text}");
    assert_eq!(records[0]["answer"], "answer to yes");
    assert_eq!(records[0]["prompt"], "question of yes");
    assert!(
        !text.contains("@example.com"),
        "exports are pseudonymous: {text}"
    );
}
both_backends!(export_contains_consented_ratings_only);
