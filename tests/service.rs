//! The HTTP contract of the service (accounts, waitlist, consent, conversations, feedback, keys,
//! admin), each test on SQLite and on PostgreSQL, against a real server on a real socket.

mod common;

use common::server::TestApp;
use moss::db::invites::InviteSpec;
use serde_json::{json, Value};

async fn body(r: reqwest::Response) -> Value {
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "{:?}", r.url().path());
    let b = body(r).await;
    assert_eq!(b["error"]["code"], code, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{b}"
    );
    assert!(
        b["error"]["message_zh"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{b}"
    );
    b
}

async fn register_and_sign_in(app: TestApp) {
    let code = app.invite(InviteSpec::default()).await;
    let c = app.client();
    let reg = |body: Value| c.post(app.url("/api/register")).json(&body).send();
    // weak password, bad e-mail, bad code: clear errors, and the code is not used up by them
    expect_error(
        reg(json!({"invite_code": code, "email": "a@example.com", "password": "short"}))
            .await
            .unwrap(),
        422,
        "weak_password",
    )
    .await;
    expect_error(
        reg(json!({"invite_code": code, "email": "not-an-email", "password": "long enough pw"}))
            .await
            .unwrap(),
        422,
        "invalid_email",
    )
    .await;
    expect_error(reg(json!({"invite_code": "AAAAA-BBBBB-CCCCC-DDDDD", "email": "a@example.com", "password": "long enough pw"})).await.unwrap(), 400, "invalid_invite").await;
    let r = reg(json!({"invite_code": code.to_lowercase(), "email": " A@Example.com ", "password": "long enough pw", "display_name": "Ann"})).await.unwrap();
    assert_eq!(r.status(), 201);
    let cookie = r
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let b = body(r).await;
    assert_eq!(b["user"]["email"], "a@example.com");
    assert_eq!(b["user"]["display_name"], "Ann");
    assert_eq!(b["user"]["role"], "user");
    // the code is single-use
    let again = app
        .client()
        .post(app.url("/api/register"))
        .json(&json!({"invite_code": code, "email": "b@example.com", "password": "long enough pw"}))
        .send()
        .await
        .unwrap();
    expect_error(again, 400, "invalid_invite").await;
    // signed in by registration
    let me = body(c.get(app.url("/api/me")).send().await.unwrap()).await;
    assert_eq!(me["user"]["email"], "a@example.com");
    assert_eq!(
        me["consent"]["model_improvement"], false,
        "consent is off until the user turns it on"
    );
    assert_eq!(
        me["consent"]["text_version"],
        app.config.consent.text_version
    );
    // logout ends the session server-side
    assert_eq!(
        c.post(app.url("/api/logout"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    expect_error(
        c.get(app.url("/api/me")).send().await.unwrap(),
        401,
        "unauthenticated",
    )
    .await;
    // login: wrong password and unknown account answer the same
    let login = |email: &str, pw: &str| {
        c.post(app.url("/api/login"))
            .json(&json!({"email": email, "password": pw}))
            .send()
    };
    let wrong = expect_error(
        login("a@example.com", "wrong password").await.unwrap(),
        401,
        "invalid_credentials",
    )
    .await;
    let unknown = expect_error(
        login("nobody@example.com", "wrong password").await.unwrap(),
        401,
        "invalid_credentials",
    )
    .await;
    assert_eq!(wrong, unknown);
    let r = login("A@example.com", "long enough pw").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        body(c.get(app.url("/api/me")).send().await.unwrap()).await["user"]["display_name"],
        "Ann"
    );
}
both_backends!(register_and_sign_in);

async fn invite_codes_that_are_used_up_expired_or_revoked_are_refused(app: TestApp) {
    let expired = app
        .invite(InviteSpec {
            expires_in_ms: Some(-1000),
            ..Default::default()
        })
        .await;
    let revoked = app.invite(InviteSpec::default()).await;
    assert!(moss::db::invites::revoke(&app.db, &revoked).await.unwrap());
    let multi = app
        .invite(InviteSpec {
            max_uses: 2,
            ..Default::default()
        })
        .await;
    let c = app.client();
    let reg = |code: &str, email: &str| {
        c.post(app.url("/api/register"))
            .json(&json!({"invite_code": code, "email": email, "password": "long enough pw"}))
            .send()
    };
    let e1 = expect_error(
        reg(&expired, "x@example.com").await.unwrap(),
        400,
        "invalid_invite",
    )
    .await;
    let e2 = expect_error(
        reg(&revoked, "x@example.com").await.unwrap(),
        400,
        "invalid_invite",
    )
    .await;
    assert_eq!(e1, e2, "no hint which way a code is invalid");
    assert_eq!(reg(&multi, "m1@example.com").await.unwrap().status(), 201);
    assert_eq!(reg(&multi, "m2@example.com").await.unwrap().status(), 201);
    expect_error(
        reg(&multi, "m3@example.com").await.unwrap(),
        400,
        "invalid_invite",
    )
    .await;
    // An address that has an account spends the code's use all the same: one code cannot test
    // address after address for accounts.
    let one = app.invite(InviteSpec::default()).await;
    expect_error(
        reg(&one, "m1@example.com").await.unwrap(),
        409,
        "email_taken",
    )
    .await;
    expect_error(
        reg(&one, "m4@example.com").await.unwrap(),
        400,
        "invalid_invite",
    )
    .await;
}
both_backends!(invite_codes_that_are_used_up_expired_or_revoked_are_refused);

async fn sessions_expire_and_rotate(app: TestApp) {
    let c = app.user("s@example.com").await;
    assert_eq!(
        c.get(app.url("/api/me")).send().await.unwrap().status(),
        200
    );
    // idle expiry, enforced by the server
    sqlx::query("UPDATE sessions SET last_seen_at = 0")
        .execute(&app.db.pool)
        .await
        .unwrap();
    expect_error(
        c.get(app.url("/api/me")).send().await.unwrap(),
        401,
        "unauthenticated",
    )
    .await;
    // a new session id at every login; the old one stops working
    let login = json!({"email": "s@example.com", "password": "a good long password"});
    // the session cookie a sign-in sets, as "name=value"
    let login_cookie = || async {
        let r = c
            .post(app.url("/api/login"))
            .json(&login)
            .send()
            .await
            .unwrap();
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    };
    let s1 = login_cookie().await;
    let s2 = login_cookie().await;
    assert_ne!(s1, s2);
    let raw = reqwest::Client::new();
    assert_eq!(
        raw.get(app.url("/api/me"))
            .header("cookie", &s1)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        raw.get(app.url("/api/me"))
            .header("cookie", &s2)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // absolute expiry
    sqlx::query("UPDATE sessions SET expires_at = 1")
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        raw.get(app.url("/api/me"))
            .header("cookie", &s2)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}
both_backends!(sessions_expire_and_rotate);

async fn failed_logins_are_throttled_per_account(app: TestApp) {
    let owner = app.user("t@example.com").await;
    // Someone guessing the owner's password from another address.
    let guesser = app.client_from("127.0.0.2");
    let login = |c: &reqwest::Client, pw: &str| {
        c.post(app.url("/api/login"))
            .json(&json!({"email": "t@example.com", "password": pw}))
            .send()
    };
    // Failures are recorded after the answer (so that it takes as long as for no account): each
    // is waited for before the next.
    let counted = || async {
        sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(failures), 0) FROM login_failures")
            .fetch_one(&app.db.pool)
            .await
            .unwrap()
    };
    let free = app.config.accounts.free_login_failures;
    for i in 1..=free + 1 {
        assert_eq!(login(&guesser, "guess guess").await.unwrap().status(), 401);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while counted().await < i && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(counted().await, i);
    }
    let until: i64 = sqlx::query_scalar("SELECT blocked_until FROM login_failures")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(
        until > moss::db::now_ms(),
        "blocked after {} failures",
        free + 1
    );
    // (The first block lasts a second; hold it for the rest of the test.)
    sqlx::query("UPDATE login_failures SET blocked_until = $1")
        .bind(moss::db::now_ms() + 3_600_000)
        .execute(&app.db.pool)
        .await
        .unwrap();
    // That client is blocked for a while: even the right password is refused, with the same
    // answer as a wrong one …
    let r = login(&guesser, "a good long password").await.unwrap();
    expect_error(r, 401, "invalid_credentials").await;
    // … while the owner, on another address, signs in as always: the guesser cannot lock them out.
    assert_eq!(
        login(&owner, "a good long password")
            .await
            .unwrap()
            .status(),
        200
    );
    // The block ends (not forever).
    sqlx::query("UPDATE login_failures SET blocked_until = 0")
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        login(&guesser, "a good long password")
            .await
            .unwrap()
            .status(),
        200
    );
    // A successful sign-in forgets that client's failures.
    assert_eq!(counted().await, 0);
}
both_backends!(failed_logins_are_throttled_per_account);

async fn waitlist_signup_is_idempotent_and_gives_its_link_once(app: TestApp) {
    let c = app.client();
    let signup = |email: &str| {
        c.post(app.url("/api/waitlist"))
            .json(&json!({"email": email, "locale": "zh-CN"}))
            .send()
    };
    let r1 = signup("w@example.com").await.unwrap();
    assert_eq!(r1.status(), 202);
    let b1 = body(r1).await;
    // No mail here: the place in line and the private status link come in the answer.
    assert_eq!(
        (b1["mail"].clone(), b1["position"].clone()),
        (json!(false), json!(1)),
        "{b1}"
    );
    let url = b1["status_url"].as_str().unwrap();
    let token = url.split("token=").nth(1).unwrap();
    let status = app
        .get_json(&c, &format!("/api/waitlist/status?token={token}"))
        .await;
    assert_eq!(status["position"], 1);
    let r2 = signup("  W@Example.COM ").await.unwrap();
    assert_eq!(r2.status(), 202);
    let b2 = body(r2).await;
    assert_eq!(b2["known"], true, "{b2}");
    assert!(
        b2.get("status_url").is_none(),
        "a status link is given once, never to whoever types the address again"
    );
    let b3 = body(signup("second@example.com").await.unwrap()).await;
    assert_eq!(b3["position"], 2);
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM waitlist")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let locale: String =
        sqlx::query_scalar("SELECT locale FROM waitlist WHERE email = 'w@example.com'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(locale, "zh");
    expect_error(signup("nope").await.unwrap(), 422, "invalid_email").await;
    expect_error(
        c.get(app.url("/api/waitlist/status?token=abc"))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    expect_error(
        c.get(app.url("/api/waitlist/status")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    // the pages behind e-mail links answer unknown tokens with a page, not an error body
    let page = c
        .get(app.url("/waitlist/status?token=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 404);
    assert!(page.text().await.unwrap().contains("<html"));
}
both_backends!(waitlist_signup_is_idempotent_and_gives_its_link_once);

async fn consent_is_an_append_only_log(app: TestApp) {
    let c = app.user("c@example.com").await;
    let put = |v: bool| {
        c.put(app.url("/api/consent"))
            .json(&json!({"model_improvement": v}))
            .send()
    };
    let b = body(put(true).await.unwrap()).await;
    assert_eq!(
        b,
        json!({"model_improvement": true, "text_version": app.config.consent.text_version})
    );
    assert_eq!(
        body(c.get(app.url("/api/me")).send().await.unwrap()).await["consent"]["model_improvement"],
        true
    );
    assert_eq!(
        body(put(false).await.unwrap()).await["model_improvement"],
        false
    );
    let rows: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT granted, text_version, method FROM consent_records ORDER BY id")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, 1);
    assert_eq!(rows[1].0, 0);
    assert_eq!(rows[0].2, "settings");
    // the database itself refuses to rewrite history
    assert!(sqlx::query("UPDATE consent_records SET granted = 1")
        .execute(&app.db.pool)
        .await
        .is_err());
    assert!(sqlx::query("DELETE FROM consent_records")
        .execute(&app.db.pool)
        .await
        .is_err());
    expect_error(
        c.put(app.url("/api/consent"))
            .json(&json!({"model_improvement": "yes"}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid_body",
    )
    .await;
}
both_backends!(consent_is_an_append_only_log);

/// An answer in a conversation, written the way the chat stream will write it.
async fn seed_answer(app: &TestApp, email: &str, conversation: i64) -> i64 {
    let user = moss::db::accounts::user_by_email(&app.db, email)
        .await
        .unwrap()
        .unwrap();
    let m = |author, content| moss::db::chats::NewMessage {
        place: moss::db::chats::Place::AtLeaf,
        author,
        content,
        finish_reason: None,
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    moss::db::chats::add_message(
        &app.db,
        user.id,
        conversation,
        &m(moss::db::chats::Author::User, "What is 2+2?"),
    )
    .await
    .unwrap()
    .unwrap();
    let mut answer = m(
        moss::db::chats::Author::Model,
        "| a | b |\n|---|---|\n| 4 | <script>alert(1)</script> |",
    );
    answer.finish_reason = Some("stop");
    moss::db::chats::add_message(&app.db, user.id, conversation, &answer)
        .await
        .unwrap()
        .unwrap()
        .id
}

async fn conversations_and_feedback_belong_to_their_owner(app: TestApp) {
    let alice = app.user("alice@example.com").await;
    let bob = app.user("bob@example.com").await;
    let r = alice
        .post(app.url("/api/conversations"))
        .json(&json!({"title": "Maths"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = body(r).await["id"].as_i64().unwrap();
    // an empty body is fine too
    assert_eq!(
        alice
            .post(app.url("/api/conversations"))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let answer = seed_answer(&app, "alice@example.com", id).await;
    let list = body(
        alice
            .get(app.url("/api/conversations"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(list["conversations"].as_array().unwrap().len(), 2);
    assert_eq!(
        list["conversations"][0]["id"], id,
        "newest first (just answered)"
    );
    let conv = body(
        alice
            .get(app.url(&format!("/api/conversations/{id}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let msgs = conv["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["finish_reason"], "stop");
    let html = msgs[1]["html"].as_str().unwrap();
    assert!(
        html.contains("<table>") && !html.contains("<script"),
        "{html}"
    );
    // Bob sees none of it: 404 on every path
    for r in [
        bob.get(app.url(&format!("/api/conversations/{id}")))
            .send()
            .await
            .unwrap(),
        bob.patch(app.url(&format!("/api/conversations/{id}")))
            .json(&json!({"title": "mine"}))
            .send()
            .await
            .unwrap(),
        bob.delete(app.url(&format!("/api/conversations/{id}")))
            .send()
            .await
            .unwrap(),
        bob.post(app.url(&format!("/api/messages/{answer}/feedback")))
            .json(&json!({"rating": -1}))
            .send()
            .await
            .unwrap(),
    ] {
        expect_error(r, 404, "not_found").await;
    }
    assert_eq!(
        body(bob.get(app.url("/api/conversations")).send().await.unwrap()).await["conversations"],
        json!([])
    );
    // rename and exclude from training
    let p = alice
        .patch(app.url(&format!("/api/conversations/{id}")))
        .json(&json!({"title": "Sums", "exclude_from_training": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(p.status(), 200);
    let p = body(p).await;
    assert_eq!(
        (p["title"].as_str(), p["exclude_from_training"].as_bool()),
        (Some("Sums"), Some(true))
    );
    expect_error(
        alice
            .patch(app.url(&format!("/api/conversations/{id}")))
            .json(&json!({"title": "x".repeat(201)}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid_title",
    )
    .await;
    // feedback: one per user and answer, replaced by a second call
    let fb = |v: Value| {
        alice
            .post(app.url(&format!("/api/messages/{answer}/feedback")))
            .json(&v)
            .send()
    };
    assert_eq!(fb(json!({"rating": 1})).await.unwrap().status(), 200);
    assert_eq!(
        fb(json!({"rating": -1, "comment": "wrong table"}))
            .await
            .unwrap()
            .status(),
        200
    );
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT rating, comment FROM feedback")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![(-1, "wrong table".to_string())]);
    expect_error(
        fb(json!({"rating": 0})).await.unwrap(),
        422,
        "invalid_rating",
    )
    .await;
    expect_error(
        fb(json!({"rating": 1, "comment": "x".repeat(2001)}))
            .await
            .unwrap(),
        422,
        "invalid_comment",
    )
    .await;
    let question = answer - 1;
    expect_error(
        alice
            .post(app.url(&format!("/api/messages/{question}/feedback")))
            .json(&json!({"rating": 1}))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    // delete
    assert_eq!(
        alice
            .delete(app.url(&format!("/api/conversations/{id}")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    expect_error(
        alice
            .get(app.url(&format!("/api/conversations/{id}")))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    // signed out: 401
    expect_error(
        app.client()
            .get(app.url("/api/conversations"))
            .send()
            .await
            .unwrap(),
        401,
        "unauthenticated",
    )
    .await;
}
both_backends!(conversations_and_feedback_belong_to_their_owner);

async fn api_keys_are_shown_once_and_revocable(app: TestApp) {
    let alice = app.user("k@example.com").await;
    let bob = app.user("k2@example.com").await;
    let r = alice
        .post(app.url("/api/keys"))
        .json(&json!({"name": "laptop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created = body(r).await;
    let key = created["key"].as_str().unwrap();
    assert!(key.starts_with("moss_") && key.len() >= 40);
    let list = body(alice.get(app.url("/api/keys")).send().await.unwrap()).await;
    assert_eq!(list["keys"].as_array().unwrap().len(), 1);
    assert!(
        list["keys"][0].get("key").is_none() && !list.to_string().contains(key),
        "the full key is shown once only"
    );
    let stored: String = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, moss::secrets::sha256_hex(key));
    let id = created["id"].as_i64().unwrap();
    expect_error(
        bob.delete(app.url(&format!("/api/keys/{id}")))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    assert!(moss::db::keys::authenticate(&app.db, key)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        alice
            .delete(app.url(&format!("/api/keys/{id}")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        moss::db::keys::authenticate(&app.db, key).await.unwrap(),
        None
    );
    expect_error(
        alice
            .delete(app.url(&format!("/api/keys/{id}")))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
}
both_backends!(api_keys_are_shown_once_and_revocable);

async fn admin_paths_are_for_admins(app: TestApp) {
    let user = app.user("u@example.com").await;
    let admin = app.admin("boss@example.com").await;
    for path in [
        "/api/admin/stats",
        "/api/admin/waitlist",
        "/api/admin/invites",
        "/api/admin/users",
    ] {
        expect_error(
            user.get(app.url(path)).send().await.unwrap(),
            403,
            "forbidden",
        )
        .await;
        expect_error(
            app.client().get(app.url(path)).send().await.unwrap(),
            401,
            "unauthenticated",
        )
        .await;
        assert_eq!(
            admin.get(app.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    assert_eq!(
        user.get(app.url("/admin")).send().await.unwrap().status(),
        403
    );
    assert_eq!(
        admin.get(app.url("/admin")).send().await.unwrap().status(),
        200
    );
    // invites: create, list, revoke
    let r = admin
        .post(app.url("/api/admin/invites"))
        .json(&json!({"count": 3, "uses": 2, "note": "press"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let codes = body(r).await["codes"].as_array().unwrap().clone();
    assert_eq!(codes.len(), 3);
    let list = body(
        admin
            .get(app.url("/api/admin/invites"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let press: Vec<&Value> = list["invites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["note"] == "press")
        .collect();
    assert_eq!(press.len(), 3);
    assert!(
        !list.to_string().contains(codes[0].as_str().unwrap()),
        "codes are not stored, so never listed"
    );
    let id = press[0]["id"].as_i64().unwrap();
    assert_eq!(
        admin
            .post(app.url(&format!("/api/admin/invites/{id}/revoke")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    expect_error(
        admin
            .post(app.url("/api/admin/invites"))
            .json(&json!({"count": 0}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid_count",
    )
    .await;
    // waitlist admit: without e-mail the codes come back to the operator
    app.client()
        .post(app.url("/api/waitlist"))
        .json(&json!({"email": "q@example.com"}))
        .send()
        .await
        .unwrap();
    let admitted = body(
        admin
            .post(app.url("/api/admin/waitlist/admit"))
            .json(&json!({"count": 5}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(admitted["admitted"].as_array().unwrap().len(), 1);
    let code = admitted["admitted"][0]["code"].as_str().unwrap();
    let r = app
        .client()
        .post(app.url("/api/register"))
        .json(&json!({"invite_code": code, "email": "q@example.com", "password": "long enough pw"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let stats = body(admin.get(app.url("/api/admin/stats")).send().await.unwrap()).await;
    assert_eq!(stats["users"], 3);
    // cross-site writes are refused even with a valid session
    let r = admin
        .post(app.url("/api/admin/invites"))
        .header("sec-fetch-site", "cross-site")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "forbidden").await;
    let r = admin
        .post(app.url("/api/admin/invites"))
        .header("origin", "https://evil.example")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "forbidden").await;
    let r = admin
        .post(app.url("/api/admin/invites"))
        .header("sec-fetch-site", "same-origin")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}
both_backends!(admin_paths_are_for_admins);

async fn first_start_prints_an_admin_invite_once(app: TestApp) {
    let url = moss::cli::serve::first_admin_invite(&app.db, &app.config)
        .await
        .unwrap()
        .expect("empty database");
    let code = url.split("code=").nth(1).unwrap();
    assert!(url.starts_with(&app.base) && url.contains("/register?code="));
    let c = app.client();
    let r = c
        .post(app.url("/api/register"))
        .json(
            &json!({"invite_code": code, "email": "op@example.com", "password": "long enough pw"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(body(r).await["user"]["role"], "admin");
    assert!(moss::cli::serve::first_admin_invite(&app.db, &app.config)
        .await
        .unwrap()
        .is_none());
    // the register page fills the code in from the link (client side) and serves the form
    let page = c.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("object-src 'none'")
            && csp.contains("frame-ancestors 'none'")
            && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(page.text().await.unwrap().contains("invite_code"));
}
both_backends!(first_start_prints_an_admin_invite_once);

async fn account_deletion_keeps_only_anonymous_consent(app: TestApp) {
    let c = app.user("gone@example.com").await;
    c.put(app.url("/api/consent"))
        .json(&json!({"model_improvement": true}))
        .send()
        .await
        .unwrap();
    let id = body(c.post(app.url("/api/conversations")).send().await.unwrap()).await["id"]
        .as_i64()
        .unwrap();
    let answer = seed_answer(&app, "gone@example.com", id).await;
    c.post(app.url(&format!("/api/messages/{answer}/feedback")))
        .json(&json!({"rating": 1}))
        .send()
        .await
        .unwrap();
    c.post(app.url("/api/keys")).send().await.unwrap();
    assert!(moss::db::accounts::delete_user(&app.db, "gone@example.com")
        .await
        .unwrap());
    for table in [
        "users",
        "sessions",
        "conversations",
        "messages",
        "feedback",
        "api_keys",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} still has rows");
    }
    let consent: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM consent_records")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(consent, 1, "consent history is kept");
    assert_eq!(
        c.get(app.url("/api/me")).send().await.unwrap().status(),
        401
    );
}
both_backends!(account_deletion_keeps_only_anonymous_consent);

#[test]
fn migration_folders_hold_the_same_names() {
    let names = |b: &str| {
        let mut v: Vec<String> =
            std::fs::read_dir(format!("{}/migrations/{b}", env!("CARGO_MANIFEST_DIR")))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
        v.sort();
        v
    };
    assert_eq!(names("sqlite"), names("postgres"));
    assert!(!names("sqlite").is_empty());
}

/// The account page's API: a new name, a new password (other sessions end, this one stays), a
/// download of everything held about the user, and deleting the account (the consent log keeps
/// its rows, naming no one). The operator's per-row actions: admit one waitlist entry, remove
/// one, change a role, hand out a reset link — never on their own account.
async fn own_account_and_operator_rows(app: TestApp) {
    use reqwest::Method;
    let at = &app;
    let send = |c: &reqwest::Client, method: Method, path: String, body: Value| {
        let c = c.clone();
        async move { at.send_json(&c, method, &path, body).await }
    };
    let login = |email: &'static str, password: &'static str| {
        let c = at.client();
        async move {
            let body = json!({"email": email, "password": password});
            let (status, _) = at.send_json(&c, Method::POST, "/api/login", body).await;
            (status, c)
        }
    };
    let c = app.user("own@example.com").await;
    let (status, elsewhere) = login("own@example.com", "a good long password").await;
    assert_eq!(status, 200);
    // Name.
    let name = |n: &str| {
        send(
            &c,
            Method::PUT,
            "/api/me/profile".into(),
            json!({"display_name": n}),
        )
    };
    assert_eq!(name("Lin").await.0, 200);
    assert_eq!(
        app.get_json(&c, "/api/me").await["user"]["display_name"],
        "Lin"
    );
    assert_eq!(name("\u{202e}nil").await.0, 422);
    // Password.
    let change = |current: &str, new: &str| {
        let body = json!({"current": current, "password": new});
        send(&c, Method::PUT, "/api/me/password".into(), body)
    };
    assert_eq!(
        change("wrong password!", "another long password").await.0,
        401
    );
    assert_eq!(change("a good long password", "short").await.0, 422);
    assert_eq!(
        change("a good long password", "another long password")
            .await
            .0,
        204
    );
    let me_status = |c: &reqwest::Client| {
        let c = c.clone();
        async move { c.get(at.url("/api/me")).send().await.unwrap().status() }
    };
    assert_eq!(me_status(&c).await, 200, "this session stays");
    assert_eq!(me_status(&elsewhere).await, 401, "the others end");
    assert_eq!(
        login("own@example.com", "a good long password").await.0,
        401
    );
    assert_eq!(
        login("own@example.com", "another long password").await.0,
        200
    );
    // Download.
    let conv = app.conversation(&c).await;
    let (status, _) = app
        .chat(&c, conv, json!({"content": "hello there", "max_tokens": 3}))
        .await;
    assert_eq!(status, 200);
    let consent = json!({"model_improvement": true});
    assert_eq!(
        send(&c, Method::PUT, "/api/consent".into(), consent)
            .await
            .0,
        200
    );
    let r = c.get(app.url("/api/me/export")).send().await.unwrap();
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(disposition.starts_with("attachment"), "{disposition}");
    let data: Value = serde_json::from_str(&r.text().await.unwrap()).expect("the download is JSON");
    assert_eq!(data["account"]["email"], "own@example.com");
    assert_eq!(
        data["conversations"][0]["messages"][0]["content"],
        "hello there"
    );
    assert_eq!(data["consent_history"][0]["granted"], 1);
    // The operator's rows.
    let admin = app.admin("ops@example.com").await;
    let id_of = |v: Value| v["user"]["id"].as_i64().unwrap();
    let me = id_of(app.get_json(&c, "/api/me").await);
    let admin_id = id_of(app.get_json(&admin, "/api/me").await);
    let as_admin = |path: String, body: Value| send(&admin, Method::POST, path, body);
    let link = format!("/api/admin/users/{me}/reset-link");
    assert_eq!(
        send(&c, Method::POST, link.clone(), json!({})).await.0,
        403,
        "only admins"
    );
    let role = |id: i64, role: &str| {
        as_admin(
            format!("/api/admin/users/{id}/role"),
            json!({ "role": role }),
        )
    };
    assert_eq!(role(admin_id, "user").await.0, 422, "not one's own role");
    assert_eq!(role(me, "root").await.0, 422);
    assert_eq!(role(me, "admin").await.0, 204);
    assert_eq!(app.get_json(&c, "/api/me").await["user"]["role"], "admin");
    let (status, made) = as_admin(link, json!({})).await;
    assert_eq!(status, 200);
    let token = made["url"]
        .as_str()
        .unwrap()
        .split("token=")
        .nth(1)
        .unwrap();
    let reset = json!({"token": token, "password": "set by the link"});
    let anyone = app.client();
    assert_eq!(
        send(&anyone, Method::POST, "/api/password/reset".into(), reset)
            .await
            .0,
        204
    );
    assert_eq!(login("own@example.com", "set by the link").await.0, 200);
    for email in ["w1@example.com", "w2@example.com"] {
        let (status, _) = send(
            &anyone,
            Method::POST,
            "/api/waitlist".into(),
            json!({ "email": email }),
        )
        .await;
        assert_eq!(status, 202);
    }
    let entries = app.get_json(&admin, "/api/admin/waitlist").await;
    let entry = |email: &str| {
        let all = entries["entries"].as_array().unwrap();
        all.iter().find(|e| e["email"] == email).unwrap()["id"]
            .as_i64()
            .unwrap()
    };
    let (w1, w2) = (entry("w1@example.com"), entry("w2@example.com"));
    let (status, admitted) = as_admin(format!("/api/admin/waitlist/{w2}/admit"), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(
        admitted["email"], "w2@example.com",
        "the one chosen, not the oldest"
    );
    assert!(admitted["link"]
        .as_str()
        .unwrap()
        .contains("/register?code="));
    let (again, _) = as_admin(format!("/api/admin/waitlist/{w2}/admit"), json!({})).await;
    assert_eq!(again, 404, "admitted once");
    let (status, _) = send(
        &admin,
        Method::DELETE,
        format!("/api/admin/waitlist/{w1}"),
        json!({}),
    )
    .await;
    assert_eq!(status, 204);
    let entries = app.get_json(&admin, "/api/admin/waitlist").await;
    assert!(!entries.to_string().contains("w1@example.com"));
    // Forgot password without mail says so (the same for every address).
    let forgot = json!({"email": "own@example.com"});
    let (_, r) = send(&anyone, Method::POST, "/api/password/forgot".into(), forgot).await;
    assert_eq!(r["mail"], false);
    // Deleting the account: the password first; then signing in fails, the consent log stays.
    let c = login("own@example.com", "set by the link").await.1;
    let count = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&at.db.pool)
            .await
            .unwrap()
    };
    let consents = count("SELECT COUNT(*) FROM consent_records").await;
    let delete = |password: &str| {
        send(
            &c,
            Method::POST,
            "/api/me/delete".into(),
            json!({ "password": password }),
        )
    };
    assert_eq!(delete("not my password").await.0, 401);
    assert_eq!(delete("set by the link").await.0, 204);
    assert_eq!(login("own@example.com", "set by the link").await.0, 401);
    assert_eq!(me_status(&c).await, 401);
    assert_eq!(
        count("SELECT COUNT(*) FROM consent_records").await,
        consents,
        "the consent log keeps its rows"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM users WHERE email = 'own@example.com'").await,
        0
    );
}
both_backends!(own_account_and_operator_rows);

/// Automatic admission stops while the service sheds and resumes once it has recovered; each
/// interval is decided once, and every decision is in its log. The shedding is real: answers
/// turned away by a full service, counted and written to the rollups by the service itself.
async fn automatic_admission_pauses_while_the_service_sheds(app: TestApp) {
    use moss::autoadmit::{tick, window, Decision};
    let anyone = app.client();
    for i in 0..12 {
        let body = json!({ "email": format!("q{i}@example.com") });
        let (status, _) = app
            .send_json(&anyone, reqwest::Method::POST, "/api/waitlist", body)
            .await;
        assert_eq!(status, 202);
    }
    let waiting = || async { moss::db::waitlist::waiting_count(&app.db).await.unwrap() };
    assert_eq!(waiting().await, 12);
    let mut config = (*app.config).clone();
    config.waitlist.auto.per_interval = 5;
    // Until the rollups hold what the service counted (it writes every second).
    let db = &app.db;
    let written = |done: fn(&moss::autoadmit::Window) -> bool| async move {
        for _ in 0..100 {
            if done(&window(db, 60).await.unwrap()) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!(
            "the rollups never showed it: {:?}",
            window(db, 60).await.unwrap()
        );
    };
    // The service is full: one answer runs, and the next three people are turned away.
    let first = app.user("runs@example.com").await;
    let conv = app.conversation(&first).await;
    let running = app.answer_in_progress(&first, conv, 400).await;
    for i in 0..3 {
        let c = app.user(&format!("shed{i}@example.com")).await;
        let conv = app.conversation(&c).await;
        let (status, _) = app.chat(&c, conv, json!({"content": "hi"})).await;
        assert_eq!(status, 503);
    }
    written(|w| w.shed >= 3.0).await;
    assert!(matches!(
        tick(&app.db, &config, 1).await.unwrap(),
        Some(Decision::Pause(_))
    ));
    assert_eq!(waiting().await, 12, "nobody admitted while it sheds");
    assert_eq!(
        tick(&app.db, &config, 1).await.unwrap(),
        None,
        "an interval is decided once"
    );
    // Recovered: the shedding hour is past, and the last hour answered everyone.
    let stop = format!("/api/conversations/{conv}/stop");
    app.send_json(&first, reqwest::Method::POST, &stop, json!({}))
        .await;
    drop(running);
    sqlx::query("UPDATE rollups SET minute = minute - 120")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let c = app.user("back@example.com").await;
    let conv = app.conversation(&c).await;
    let (status, _) = app
        .chat(&c, conv, json!({"content": "hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200);
    written(|w| w.served >= 1.0 && w.shed == 0.0).await;
    assert_eq!(
        tick(&app.db, &config, 2).await.unwrap(),
        Some(Decision::Admit(5))
    );
    assert_eq!(waiting().await, 7);
    assert_eq!(
        tick(&app.db, &config, 3).await.unwrap(),
        Some(Decision::Admit(5))
    );
    assert_eq!(waiting().await, 2);
    let log = moss::autoadmit::log(&app.db, config.waitlist.auto.every_secs, 10)
        .await
        .unwrap();
    let reasons: Vec<&str> = log.iter().map(|(_, _, r)| r.as_str()).collect();
    assert_eq!(reasons.len(), 3);
    assert_eq!(&reasons[..2], ["admitted 5", "admitted 5"]);
    assert!(reasons[2].starts_with("paused:"), "{reasons:?}");
}
both_backends!(
    automatic_admission_pauses_while_the_service_sheds,
    common::server::Options {
        token_delay_ms: 40,
        configure: Some(|c| {
            c.dashboard.write_secs = 1;
            c.limits.max_running = 1;
            c.limits.max_waiting = 0;
        }),
        ..common::server::Options::default()
    }
);

/// With automatic admission on, the status page says when the turn may come at its pace.
async fn the_status_page_estimates_the_turn(app: TestApp) {
    let anyone = app.client();
    let mut link = String::new();
    for i in 0..12 {
        let body = json!({ "email": format!("e{i}@example.com") });
        let (_, r) = app
            .send_json(&anyone, reqwest::Method::POST, "/api/waitlist", body)
            .await;
        link = r["status_url"].as_str().unwrap().to_string();
    }
    // The twelfth, at 5 every 5 minutes: the third interval.
    let path = &link[link.find("/waitlist/").unwrap()..];
    let page = anyone
        .get(app.url(path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("number 12 in line"), "{page}");
    assert!(
        page.contains("your turn may come in about 15 minutes"),
        "{page}"
    );
    assert!(page.contains("约 15 分钟"), "{page}");
}
both_backends!(
    the_status_page_estimates_the_turn,
    common::server::Options {
        configure: Some(|c| {
            c.waitlist.auto.enabled = true;
            c.waitlist.auto.per_interval = 5;
            c.waitlist.auto.every_secs = 300;
        }),
        ..common::server::Options::default()
    }
);
