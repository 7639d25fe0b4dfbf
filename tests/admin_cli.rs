//! `moss admin …` against SQLite and PostgreSQL: output formats, effects, and one-line errors.

mod common;

use std::process::{Command, Output};

use common::server::TestApp;
use serde_json::json;

fn moss(app: &TestApp, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moss"))
        .arg("--database-url")
        .arg(&app.database_url)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails_with(out: Output, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one-line reason expected: {err}"
    );
    assert!(err.contains(needle), "{err}");
}

async fn admin_commands_work(app: TestApp) {
    // invite create prints only the codes, one per line
    let codes = ok(moss(
        &app,
        &[
            "admin",
            "invite",
            "create",
            "--count",
            "3",
            "--uses",
            "2",
            "--expires-in",
            "7d",
            "--note",
            "launch",
        ],
    ));
    let codes: Vec<&str> = codes.lines().collect();
    assert_eq!(codes.len(), 3);
    assert!(
        codes
            .iter()
            .all(|c| moss::secrets::normalize_code(c).is_some()),
        "{codes:?}"
    );
    let list = ok(moss(&app, &["admin", "invite", "list"]));
    assert_eq!(
        list.lines()
            .filter(|l| l.contains("launch") && l.contains("active") && l.contains("0/2"))
            .count(),
        3,
        "{list}"
    );
    ok(moss(&app, &["admin", "invite", "revoke", codes[0]]));
    assert!(ok(moss(&app, &["admin", "invite", "list"])).contains("revoked"));
    fails_with(
        moss(&app, &["admin", "invite", "revoke", codes[0]]),
        "no such active invite code",
    );
    fails_with(
        moss(&app, &["admin", "invite", "create", "--expires-in", "soon"]),
        "bad duration",
    );
    // a revoked code cannot register; a live one can
    let c = app.client();
    let reg = |code: &str, email: &str| {
        c.post(app.url("/api/register"))
            .json(&json!({"invite_code": code, "email": email, "password": "long enough pw"}))
            .send()
    };
    assert_eq!(reg(codes[0], "x@example.com").await.unwrap().status(), 400);
    assert_eq!(
        reg(codes[1], "member@example.com").await.unwrap().status(),
        201
    );
    // waitlist: list and admit (no SMTP here: codes are printed for the operator)
    for e in ["w1@example.com", "w2@example.com", "w3@example.com"] {
        app.client()
            .post(app.url("/api/waitlist"))
            .json(&json!({"email": e}))
            .send()
            .await
            .unwrap();
    }
    let wl = ok(moss(&app, &["admin", "waitlist", "list"]));
    assert_eq!(
        wl.lines().filter(|l| l.contains("\twaiting\t")).count(),
        3,
        "{wl}"
    );
    let admitted = ok(moss(&app, &["admin", "waitlist", "admit", "--count", "2"]));
    let lines: Vec<(&str, &str)> = admitted
        .lines()
        .map(|l| l.split_once('\t').unwrap())
        .collect();
    assert_eq!(
        lines.iter().map(|l| l.0).collect::<Vec<_>>(),
        vec!["w1@example.com", "w2@example.com"],
        "oldest first"
    );
    assert_eq!(
        reg(lines[0].1, "w1@example.com").await.unwrap().status(),
        201
    );
    assert_eq!(
        reg(lines[0].1, "w9@example.com").await.unwrap().status(),
        400,
        "waitlist codes are single-use"
    );
    // users: list, set-role, delete
    let users = ok(moss(&app, &["admin", "user", "list"]));
    assert!(users.contains("member@example.com\tuser"), "{users}");
    ok(moss(
        &app,
        &["admin", "user", "set-role", "member@example.com", "admin"],
    ));
    assert!(ok(moss(&app, &["admin", "user", "list"])).contains("member@example.com\tadmin"));
    fails_with(
        moss(
            &app,
            &["admin", "user", "set-role", "member@example.com", "root"],
        ),
        "role must be admin or user",
    );
    fails_with(
        moss(
            &app,
            &["admin", "user", "set-role", "nobody@example.com", "admin"],
        ),
        "unknown email",
    );
    // A reset link for someone without mail: it works once, in the reset page's API.
    let link = ok(moss(
        &app,
        &["admin", "user", "reset-link", "member@example.com"],
    ));
    let token = link.trim().split("token=").nth(1).expect("a reset link");
    let reset = |token: String| {
        app.client()
            .post(app.url("/api/password/reset"))
            .json(&serde_json::json!({"token": token, "password": "a brand new password"}))
            .send()
    };
    assert_eq!(reset(token.to_string()).await.unwrap().status(), 204);
    assert_eq!(reset(token.to_string()).await.unwrap().status(), 400);
    fails_with(
        moss(&app, &["admin", "user", "reset-link", "nobody@example.com"]),
        "unknown email",
    );
    ok(moss(&app, &["admin", "user", "delete", "w1@example.com"]));
    assert!(!ok(moss(&app, &["admin", "user", "list"])).contains("w1@example.com"));
    fails_with(
        moss(&app, &["admin", "user", "delete", "w1@example.com"]),
        "unknown email",
    );
}
both_backends!(admin_commands_work);

#[test]
fn unreachable_database_is_a_one_line_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_moss"))
        .args([
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
            "admin",
            "user",
            "list",
        ])
        .env("MOSS_DATABASE__ACQUIRE_TIMEOUT_SECS", "1")
        .output()
        .unwrap();
    fails_with(out, "cannot open database");
    let out = Command::new(env!("CARGO_BIN_EXE_moss"))
        .args(["--database-url", "mysql://x", "admin", "user", "list"])
        .output()
        .unwrap();
    fails_with(out, "unsupported database URL");
}
