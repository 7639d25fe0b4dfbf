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

/// On the real model, moss's Qwen2 (own kernels, quantized embedding) answers greedily with the
/// same tokens as candle-transformers' implementation, and a batch of prompts decoded together
/// says what each says alone. Float summation order differs between the kernels, so two
/// implementations could in principle part ways at a near tie; on these prompts they do not.
#[test]
fn moss_and_candle_agree_and_batching_changes_nothing() {
    let Some(path) = real_model(QWEN_FILE) else {
        return;
    };
    let engine = |imp, batch| {
        let mut o = moss::engine::EngineOptions::new(&path);
        o.device = "cpu".into();
        o.implementation = imp;
        o.max_batch = batch;
        moss::engine::EngineHandle::start(o).unwrap()
    };
    use moss::engine::model::Implementation;
    let ours = engine(Implementation::Moss, 4);
    let questions = [
        "What is the capital of France?",
        "用一句话介绍长城。",
        "Write a Rust function that adds two numbers.",
        "List three primary colours.",
    ];
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            ours.prompt(
                Some("You are MOSS."),
                &[ChatMessage::new(Role::User, *q)],
                24,
            )
            .unwrap()
            .ids
        })
        .collect();
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| collect(&ours, greedy(p.clone(), 24)).0.concat())
        .collect();
    // all four at once: one batch
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| ours.generate(greedy(p.clone(), 24)).unwrap())
        .collect();
    let together: Vec<String> = streams
        .into_iter()
        .map(|mut rx| {
            let mut text = String::new();
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    moss::engine::Event::Text(t) => text.push_str(&t),
                    moss::engine::Event::Done { .. } => break,
                    moss::engine::Event::Error(e) => panic!("{e}"),
                    moss::engine::Event::Started => {}
                }
            }
            text
        })
        .collect();
    assert!(
        ours.stats
            .batch_peak
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    assert_eq!(alone, together, "batched answers differ from single ones");
    drop(ours);
    let theirs = engine(Implementation::Candle, 1);
    for (p, mine) in prompts.iter().zip(&alone) {
        let (candle, _, _) = collect(&theirs, greedy(p.clone(), 24));
        assert_eq!(&candle.concat(), mine);
    }
}
