//! Smoke test on the real default model (fetched by scripts/fetch-model; CI fetches it).

mod common;

use std::time::Duration;

use common::*;
use moss::engine::{ChatMessage, FinishReason, Role};

#[test]
fn default_model_answers_in_english_and_chinese() {
    let Some(path) = real_model(QWEN_FILE) else {
        return;
    };
    let engine = start(&path, Duration::ZERO);
    let system = moss::config::Config::load(None)
        .unwrap()
        .engine
        .system_prompt;
    let ask = |q: &str| {
        let prompt = engine
            .prompt(Some(&system), &[ChatMessage::new(Role::User, q)], 48)
            .unwrap();
        collect(&engine, greedy(prompt.ids, 48))
    };
    let (pieces, finish, _) = ask("What is the capital of France?");
    let answer = pieces.concat();
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(finish, FinishReason::Stop, "{answer}");
    let (pieces, _, _) = ask("中国的首都是哪里？");
    let answer = pieces.concat();
    assert!(answer.contains("北京"), "{answer}");
}
