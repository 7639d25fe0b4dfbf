//! The `moss` binary itself: tokenize, chat and bench on a tiny model, and one-line errors.

mod common;

use std::process::Command;

use common::tiny_model;
use moss::engine::Arch;

fn moss() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moss"));
    c.env_remove("RUST_LOG").env("MOSS_ENGINE__DEVICE", "cpu");
    c
}

#[test]
fn tokenize_prints_a_json_array() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen2);
    let out = moss()
        .args(["tokenize", "--model"])
        .arg(&model)
        .arg("hello world")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    // "hello" and " world" are single tokens of the tiny vocabulary
    assert_eq!(ids.len(), 2, "{ids:?}");
}

#[test]
fn chat_prompt_streams_an_answer_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Llama);
    let out = moss()
        .args([
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--prompt",
            "hello",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).trim().chars().count() >= 2);
}

#[test]
fn bench_json_reports_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen2);
    let out = moss()
        .args([
            "bench",
            "--json",
            "--prompt-tokens",
            "32",
            "--gen-tokens",
            "8",
            "--concurrency",
            "2",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "prefill_tok_s",
        "decode_tok_s",
        "ttft_ms",
        "aggregate_tok_s",
    ] {
        let v = r[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert_eq!(r["concurrency"], 2);
    assert_eq!(r["prompt_tokens"], 32);
    // The memory ceiling: a measured bandwidth, the bytes a step reads, and decode's share.
    let c = &r["ceiling"];
    for key in ["read_gb_s", "step_mb", "decode_limit_tok_s", "decode_share"] {
        let v = c[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "ceiling.{key} = {v}");
    }
    let share = c["decode_share"].as_f64().unwrap();
    let limit = c["decode_limit_tok_s"].as_f64().unwrap();
    let decode = r["decode_tok_s"].as_f64().unwrap();
    assert!((share * limit / decode - 1.0).abs() < 1e-6, "{c}");
}

/// `--depth`: the context before the prompt is computed once and comes from the prefix cache
/// (the bench fails when it does not), and a depth past the context is refused clearly.
#[test]
fn bench_measures_after_a_depth_of_context() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen2);
    let bench = |depth: &str| {
        moss()
            .args([
                "bench",
                "--json",
                "--prompt-tokens",
                "16",
                "--gen-tokens",
                "4",
            ])
            .args(["--depth", depth, "--model"])
            .arg(&model)
            .output()
            .unwrap()
    };
    let out = bench("96");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["depth"], 96);
    assert_eq!(r["prompt_tokens"], 16);
    let prefill = r["prefill_tok_s"].as_f64().unwrap_or(f64::NAN);
    assert!(prefill.is_finite() && prefill > 0.0, "{r}");

    let out = bench("1000000");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exceed the context"), "{err}");
    // A depth too short for the prefix cache to keep is refused, not measured wrong.
    let out = bench("5");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 8"), "{err}");
}

#[test]
fn bad_model_is_a_one_line_error_with_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00").unwrap();
    let out = moss()
        .args(["chat", "--prompt", "hi", "--model"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("bad.gguf"), "{err}");
}

#[test]
fn unknown_config_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("moss.toml");
    std::fs::write(&cfg, "[engine]\ndevise = \"cpu\"\n").unwrap();
    let out = moss()
        .arg("--config")
        .arg(&cfg)
        .args(["tokenize", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("devise"));
}

/// `--database-url sqlite:///absolute/path.db` names a file that need not exist yet: it is made.
#[test]
fn a_sqlite_url_for_a_new_file_creates_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fresh.db");
    for url in [
        format!("sqlite://{}", file.display()),
        format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("other.db").display()
        ),
    ] {
        let out = moss()
            .arg("--database-url")
            .arg(&url)
            .args(["admin", "user", "list"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(file.is_file());
    // A folder that does not exist is a clear one-line error, not a panic.
    let out = moss()
        .arg("--database-url")
        .arg(format!("sqlite://{}/missing/x.db", dir.path().display()))
        .args(["admin", "user", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
