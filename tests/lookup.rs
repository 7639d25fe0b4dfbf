//! Prompt-lookup drafting changes nothing but speed: on tiny models through the real engine, the
//! answers with drafting are those without — greedy and sampled, alone and batched, with stop
//! strings, log-probabilities and a grammar — on every architecture and on the kernels that sum a
//! lone row differently from several; drafts are really made, some held and some refused; and
//! drafting stays off when the configuration or the request says so.

mod common;

use std::sync::atomic::Ordering;

use candle_core::quantized::GgmlDType;
use moss::engine::lookup::LookupOptions;
use moss::engine::tiny::TinySpec;
use moss::engine::{
    Arch, ChatMessage, EngineHandle, EngineOptions, Event, GenerateRequest, Grammar, Role,
    SamplingParams,
};

fn engine(dir: &std::path::Path, spec: &TinySpec, lookup: LookupOptions) -> EngineHandle {
    let path = dir.join(format!(
        "tiny-{}-{:?}-{}.gguf",
        spec.arch.name(),
        spec.matrices,
        spec.hidden
    ));
    if !path.exists() {
        moss::engine::tiny::write_tiny_model(&path, spec).unwrap();
    }
    let mut opts = EngineOptions::new(&path);
    opts.device = common::test_device();
    opts.lookup = lookup;
    EngineHandle::start(opts).unwrap()
}

/// A tiny model with Q5_0 matrices (moss's kernels, as the default model), drafting while at
/// most `max_batch` sequences decode, `max_draft` tokens at a time.
fn q5_engine(
    dir: &std::path::Path,
    arch: Arch,
    max_batch: usize,
    max_draft: usize,
) -> EngineHandle {
    let mut spec = TinySpec::new(arch);
    spec.matrices = GgmlDType::Q5_0;
    engine(
        dir,
        &spec,
        LookupOptions {
            max_batch,
            max_draft,
        },
    )
}

/// Everything a stream says, in order (timings aside).
fn events(engine: &EngineHandle, req: GenerateRequest) -> Vec<String> {
    drain(engine.generate(req).unwrap())
}

/// Everything `rx` says until done, each event as text (timings aside).
fn drain(mut rx: moss::engine::EventStream) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Done {
                finish_reason,
                usage,
                ..
            } => {
                out.push(format!("done {finish_reason:?} {usage:?}"));
                return out;
            }
            Event::Error(e) => panic!("{e}"),
            other => out.push(format!("{other:?}")),
        }
    }
    panic!("the stream ended without done")
}

/// Prompts whose answers (on a tiny random model: loops) repeat what came before.
fn prompts(engine: &EngineHandle) -> Vec<Vec<u32>> {
    [
        "the world is the world is the world is the world",
        "moss moss paris moss paris moss 你好 moss paris",
        "def f(x):\n    return x + 1\n\ndef g(x):\n    return f(x) + 1\n\nfix g",
        "北京是北京, 上海是上海, 北京是",
    ]
    .iter()
    .map(|q| {
        engine
            .prompt(None, &[ChatMessage::new(Role::User, *q)], 64)
            .unwrap()
            .ids
    })
    .collect()
}

fn request(prompt: &[u32], sampled: bool, no_lookup: bool) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_vec(),
        sampling: if sampled {
            SamplingParams {
                temperature: 0.9,
                seed: Some(11),
                ..SamplingParams::greedy()
            }
        } else {
            SamplingParams::greedy()
        },
        max_tokens: 60,
        ignore_eos: true,
        no_lookup,
        ..Default::default()
    }
}

fn specs() -> Vec<TinySpec> {
    let mut out = Vec::new();
    for arch in [Arch::Qwen2, Arch::Llama, Arch::Gemma3] {
        let mut spec = TinySpec::new(arch);
        spec.matrices = GgmlDType::Q5_0;
        out.push(spec);
    }
    // Q6_K: candle sums a lone row differently from several, so moss runs its rows one by one.
    let mut q6 = TinySpec::new(Arch::Qwen2);
    (q6.matrices, q6.hidden, q6.ffn) = (GgmlDType::Q6K, 256, 512);
    out.push(q6);
    out
}

#[test]
fn answers_with_drafting_are_the_answers_without() {
    let dir = tempfile::tempdir().unwrap();
    let on = LookupOptions {
        max_batch: 8,
        max_draft: 8,
    };
    for spec in specs() {
        let engine = engine(dir.path(), &spec, on);
        for prompt in prompts(&engine) {
            for sampled in [false, true] {
                let without = events(&engine, request(&prompt, sampled, true));
                let with = events(&engine, request(&prompt, sampled, false));
                assert_eq!(with, without, "{:?} sampled={sampled}", spec.matrices);
            }
        }
        let drafted = engine.stats.draft_tokens.load(Ordering::Relaxed);
        let accepted = engine.stats.draft_accepted.load(Ordering::Relaxed);
        if engine.info.gpu.is_some() {
            // A GPU's kernels depend on the number of rows: drafting stays off there.
            assert_eq!(drafted, 0);
            continue;
        }
        assert!(
            accepted > 0 && drafted > accepted,
            "{:?} {:?}: {accepted} of {drafted} drafted tokens held: both outcomes must occur",
            spec.arch,
            spec.matrices
        );
    }
}

/// A step in which two sequences each verify drafts of their own (a draft of one sequence never
/// sees the other's rows), stop strings and a length limit that fall inside a draft.
#[test]
fn drafting_sequences_in_one_batch_match_each_alone() {
    let dir = tempfile::tempdir().unwrap();
    let engine = q5_engine(dir.path(), Arch::Qwen2, 2, 6);
    let prompts = prompts(&engine);
    let alone: Vec<_> = prompts[..2]
        .iter()
        .map(|p| events(&engine, request(p, false, true)))
        .collect();
    let drafted_before = engine.stats.draft_tokens.load(Ordering::Relaxed);
    let streams: Vec<_> = prompts[..2]
        .iter()
        .map(|p| engine.generate(request(p, false, false)).unwrap())
        .collect();
    let together: Vec<Vec<String>> = streams.into_iter().map(drain).collect();
    assert_eq!(together, alone);
    assert_eq!(engine.stats.batch_peak.load(Ordering::Relaxed), 2);
    // (on a GPU drafting stays off)
    assert_eq!(
        engine.stats.draft_tokens.load(Ordering::Relaxed) > drafted_before,
        engine.info.gpu.is_none()
    );

    // Limits reached inside a draft: the answer ends where it would have.
    for prompt in &prompts {
        let text = common::collect(&engine, request(prompt, false, true))
            .0
            .concat();
        for max_tokens in [1, 2, 7, 13] {
            let limited = |no_lookup| GenerateRequest {
                max_tokens,
                ..request(prompt, false, no_lookup)
            };
            assert_eq!(
                events(&engine, limited(false)),
                events(&engine, limited(true)),
                "max_tokens {max_tokens}"
            );
        }
        // A stop string from the middle of the answer.
        let chars: Vec<char> = text.chars().collect();
        if chars.len() > 12 {
            let stop: String = chars[8..11].iter().collect();
            let stopped = |no_lookup| GenerateRequest {
                stop: vec![stop.clone()],
                ..request(prompt, false, no_lookup)
            };
            assert_eq!(
                events(&engine, stopped(false)),
                events(&engine, stopped(true)),
                "stop {stop:?}"
            );
        }
    }
}

/// Log-probabilities and a grammar see each drafted row as its own step.
#[test]
fn drafting_keeps_logprobs_and_grammars_exact() {
    let dir = tempfile::tempdir().unwrap();
    let engine = q5_engine(dir.path(), Arch::Qwen2, 4, 8);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["moss moss", "paris moss"]}, "maxItems": 12}
        },
        "required": ["tags"],
        "additionalProperties": false
    });
    let drafted_before = engine.stats.draft_tokens.load(Ordering::Relaxed);
    for prompt in prompts(&engine) {
        let compiled = engine
            .info
            .vocabulary
            .constraint(&Grammar::JsonSchema(schema.clone()))
            .unwrap();
        for constraint in [None, Some(compiled)] {
            let req = |no_lookup| GenerateRequest {
                logprobs: Some(3),
                constraint: constraint.clone(),
                ignore_eos: false,
                ..request(&prompt, false, no_lookup)
            };
            assert_eq!(events(&engine, req(false)), events(&engine, req(true)));
        }
    }
    // (on a GPU drafting stays off)
    assert_eq!(
        engine.stats.draft_tokens.load(Ordering::Relaxed) > drafted_before,
        engine.info.gpu.is_none()
    );
}

/// Off in the configuration (`max_batch` 0), or for one request: nothing is drafted.
#[test]
fn drafting_stays_off_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let off = q5_engine(dir.path(), Arch::Llama, 0, 8);
    for prompt in prompts(&off) {
        events(&off, request(&prompt, false, false));
    }
    assert_eq!(off.stats.draft_tokens.load(Ordering::Relaxed), 0);
    drop(off);
    let default = LookupOptions::default();
    let on = q5_engine(
        dir.path(),
        Arch::Llama,
        default.max_batch,
        default.max_draft,
    );
    for prompt in prompts(&on) {
        events(&on, request(&prompt, false, true));
    }
    assert_eq!(on.stats.draft_tokens.load(Ordering::Relaxed), 0);
    for prompt in prompts(&on) {
        events(&on, request(&prompt, false, false));
    }
    assert_eq!(
        on.stats.draft_tokens.load(Ordering::Relaxed) > 0,
        on.info.gpu.is_none()
    );
}
