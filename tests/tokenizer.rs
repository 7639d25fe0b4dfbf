//! Tokenizers built from GGUF metadata: the reference ids of llama.cpp for the real models
//! (tests/data/tokenizer-vectors.json), and incremental detokenisation of multi-byte text.

mod common;

use common::*;
use moss::engine::detok::Detokenizer;
use moss::engine::gguf::ModelFile;
use moss::engine::Arch;

fn vectors() -> serde_json::Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer-vectors.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tokenizer_of(path: &std::path::Path) -> tokenizers::Tokenizer {
    let file = ModelFile::open(path).unwrap();
    let mut tok = moss::engine::tokenizer::load(path, &file.content).unwrap();
    tok.set_encode_special_tokens(true);
    tok
}

fn check_vectors(key: &str, file: &str) {
    let Some(path) = real_model(file) else { return };
    let tok = tokenizer_of(&path);
    let cases = vectors()[key].as_array().unwrap().clone();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "{key}: {text:?}");
        // and back: decoding the reference ids gives the text again
        assert_eq!(tok.decode(&want, false).unwrap(), text, "{key} decode");
    }
}

#[test]
fn qwen2_tokenizer_matches_llama_cpp() {
    check_vectors("qwen2", QWEN_FILE);
}

#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    check_vectors("gemma3", GEMMA_FILE);
}

/// Feeds ids one at a time and checks that every piece is whole text and they join to `text`.
fn assert_streams_whole(tok: &tokenizers::Tokenizer, text: &str) {
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let mut d = Detokenizer::new(tok);
    let mut out = String::new();
    let mut pieces = 0;
    for id in ids {
        if let Some(p) = d.push(id) {
            assert!(
                !p.contains('\u{FFFD}'),
                "broken character in piece {p:?} of {text:?}"
            );
            out.push_str(&p);
            pieces += 1;
        }
    }
    out.push_str(&d.flush().unwrap_or_default());
    assert_eq!(out, text);
    assert!(pieces > 1, "expected several pieces for {text:?}");
}

#[test]
fn multibyte_text_streams_whole_characters() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::Qwen2, Arch::Gemma3] {
        let tok = tokenizer_of(&tiny_model(dir.path(), arch));
        for text in [
            "你好，世界！北京是首都。",
            "emoji 🤖🚀 and ünïcödé",
            "mixed 中文 and English 😀",
        ] {
            assert_streams_whole(&tok, text);
        }
    }
    if let Some(path) = real_model(QWEN_FILE) {
        let tok = tokenizer_of(&path);
        assert_streams_whole(
            &tok,
            "emoji 🤖🚀 and ünïcödé; 复旦大学自然语言处理实验室发布了MOSS。",
        );
    }
}
