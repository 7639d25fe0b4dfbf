//! Several `moss serve` replicas on one PostgreSQL database: migrations when
//! replicas start together, sessions, invite redemption and daily quotas shared across them.

mod common;

use common::server::{Backend, Options, TestApp};
use serde_json::{json, Value};

async fn two_replicas(opts: Options) -> Option<(TestApp, TestApp)> {
    let url = TestApp::shared_postgres().await?;
    // Both start (and migrate) at the same time.
    let (a, b) = tokio::join!(
        TestApp::start_on(Backend::Postgres, opts.clone(), Some(url.clone())),
        TestApp::start_on(Backend::Postgres, opts, Some(url))
    );
    Some((a.unwrap(), b.unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_invites_work_across_replicas() {
    let opts = Options {
        // The race below is the point here, not shedding password checks.
        configure: Some(|c| c.accounts.hash_wait_ms = 60_000),
        ..Options::default()
    };
    let Some((a, b)) = two_replicas(opts).await else {
        return;
    };
    assert_ne!(a.base, b.base);
    // a session made on one replica works on the other (cookies are per host, not per port)
    let c = a.user("r@example.com").await;
    let me: Value = c
        .get(b.url("/api/me"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["user"]["email"], "r@example.com");
    assert_eq!(
        c.post(b.url("/api/logout")).send().await.unwrap().status(),
        204
    );
    assert_eq!(
        c.get(a.url("/api/me")).send().await.unwrap().status(),
        401,
        "logout on one replica ends the session on all"
    );
    // 50 simultaneous registrations with one single-use code, spread over both replicas
    let code = a.invite(moss::db::invites::InviteSpec::default()).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = if i % 2 == 0 {
            a.url("/api/register")
        } else {
            b.url("/api/register")
        };
        let code = code.clone();
        // Each on an address of its own (password checks are shared per address).
        let client = a.client_from(&format!("127.0.1.{}", i + 1));
        tasks.push(tokio::spawn(async move {
            let body = json!({"invite_code": code, "email": format!("racer{i}@example.com"), "password": "long enough pw"});
            client.post(url).json(&body).send().await.unwrap().status().as_u16()
        }));
    }
    let mut created = 0;
    for t in tasks {
        if t.await.unwrap() == 201 {
            created += 1;
        }
    }
    assert_eq!(created, 1);
    let racers: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE email LIKE 'racer%'")
        .fetch_one(&a.db.pool)
        .await
        .unwrap();
    assert_eq!(racers, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_quota_is_shared_by_replicas() {
    let opts = Options {
        configure: Some(|c| c.limits.daily_user_tokens = 20),
        ..Options::default()
    };
    let Some((a, b)) = two_replicas(opts).await else {
        return;
    };
    let c = a.user("q@example.com").await;
    let conv = a.conversation(&c).await;
    let (status, _) = a
        .chat(&c, conv, json!({"content": "hello", "max_tokens": 4}))
        .await;
    assert_eq!(status, 200);
    // the tokens spent through replica A count on replica B
    let r = c
        .post(b.url(&format!("/api/conversations/{conv}/messages")))
        .json(&json!({"content": "again"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "quota_exceeded"
    );
}

/// The dashboard reads rollups that every replica writes: what two replicas did adds up, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_rollups_from_two_replicas_add_up() {
    let opts = Options {
        configure: Some(|c| c.dashboard.write_secs = 1),
        ..Options::default()
    };
    let Some((a, b)) = two_replicas(opts).await else {
        return;
    };
    let on_a = a.user("da@example.com").await;
    let on_b = b.user("db@example.com").await;
    let admin = a.admin("ops@example.com").await;
    for (app, c, text) in [
        (&a, &on_a, "hello"),
        (&b, &on_b, "hello"),
        (&b, &on_b, "How do I break into someone's house?"),
    ] {
        let conv = app.conversation(c).await;
        let (status, events) = app
            .chat(c, conv, json!({"content": text, "max_tokens": 3}))
            .await;
        assert_eq!(status, 200, "{events:?}");
    }
    let requests = || async {
        let d = a.get_json(&admin, "/api/admin/dashboard?range=hour").await;
        let chart = d["charts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "requests")
            .cloned()
            .unwrap();
        (
            chart["summary"].as_f64().unwrap(),
            chart["svg"].as_str().unwrap().to_string(),
        )
    };
    // Each replica writes every second; wait (bounded) until both have.
    let mut seen = (0.0, String::new());
    for _ in 0..100 {
        seen = requests().await;
        if seen.0 >= 3.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen.0, 3.0, "two answers and a refusal, each counted once");
    assert!(seen.1.contains("data-series=\"answered\"") && seen.1.contains("<polyline"));
    let d = a.get_json(&admin, "/api/admin/dashboard?range=week").await;
    assert_eq!(d["charts"].as_array().unwrap().len(), 7);
    let active = d["charts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "active")
        .unwrap()["summary"]
        .as_f64()
        .unwrap();
    assert_eq!(active, 2.0, "two people asked");
    let r = admin
        .get(a.url("/api/admin/dashboard?range=year"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
}
