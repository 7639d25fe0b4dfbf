//! Builds a `tokenizers::Tokenizer` from GGUF metadata (or a `tokenizer.json` beside the file).
//!
//! Two families are supported, following the recipes in docs/models.md that reproduce llama.cpp's ids:
//! byte-level BPE (`tokenizer.ggml.model = gpt2`) and SentencePiece-style BPE with scores (`llama`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// The pre-tokenizer regex of Qwen2 (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's original pattern, used by `pre = gpt2` and as the llama.cpp default for byte-level BPE.
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's pattern (`pre = llama-bpe`, also used by several other models).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Why a tokenizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("missing or malformed tokenizer metadata `{0}`")]
    Metadata(&'static str),
    #[error("unsupported tokenizer.ggml.model `{0}` (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("unsupported tokenizer.ggml.pre `{0}` (supported: qwen2, gpt2, llama-bpe, default)")]
    UnsupportedPre(String),
    #[error("cannot build tokenizer: {0}")]
    Build(String),
}

fn build_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

/// The token list, types and scores of a GGUF vocabulary.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Vec<f32>,
}

fn string_array(
    md: &HashMap<String, Value>,
    key: &'static str,
) -> Result<Vec<String>, TokenizerError> {
    let arr = md
        .get(key)
        .and_then(|v| v.to_vec().ok())
        .ok_or(TokenizerError::Metadata(key))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| TokenizerError::Metadata(key))
        })
        .collect()
}

fn read_vocab(md: &HashMap<String, Value>) -> Result<Vocab, TokenizerError> {
    let tokens = string_array(md, "tokenizer.ggml.tokens")?;
    let types = match md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
    {
        Some(arr) => arr
            .iter()
            .map(|v| {
                v.to_i32()
                    .map_err(|_| TokenizerError::Metadata("tokenizer.ggml.token_type"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![TYPE_NORMAL; tokens.len()],
    };
    let scores = match md
        .get("tokenizer.ggml.scores")
        .and_then(|v| v.to_vec().ok())
    {
        Some(arr) => arr.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
        None => vec![0.0; tokens.len()],
    };
    if types.len() != tokens.len() || scores.len() != tokens.len() {
        return Err(TokenizerError::Metadata("tokenizer.ggml.token_type"));
    }
    Ok(Vocab {
        tokens,
        types,
        scores,
    })
}

/// Builds the tokenizer for a model: `tokenizer.json` next to the GGUF wins, else the metadata.
pub fn load(gguf_path: &Path, content: &Content) -> Result<Tokenizer, TokenizerError> {
    if let Some(dir) = gguf_path.parent() {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Tokenizer::from_file(&json).map_err(build_err);
        }
    }
    from_gguf_metadata(&content.metadata)
}

/// Builds the tokenizer from `tokenizer.ggml.*` metadata alone.
pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Tokenizer, TokenizerError> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or(TokenizerError::Metadata("tokenizer.ggml.model"))?;
    let vocab = read_vocab(md)?;
    match model.as_str() {
        "gpt2" => byte_level_bpe(md, &vocab),
        "llama" => sentencepiece_bpe(&vocab),
        other => Err(TokenizerError::UnsupportedModel(other.to_string())),
    }
}

fn vocab_map(vocab: &Vocab) -> BpeVocab {
    // When a string occurs twice, the first id wins (as in llama.cpp's token_to_id map).
    let mut map = BpeVocab::default();
    for (id, tok) in vocab.tokens.iter().enumerate() {
        map.entry(tok.clone()).or_insert(id as u32);
    }
    map
}

fn pre_pattern(md: &HashMap<String, Value>) -> Result<&'static str, TokenizerError> {
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok());
    match pre.map(String::as_str) {
        Some("qwen2") => Ok(QWEN2_PATTERN),
        Some("llama-bpe" | "llama3" | "smaug-bpe") => Ok(LLAMA3_PATTERN),
        Some("gpt2" | "default") | None => Ok(GPT2_PATTERN),
        Some(other) => Err(TokenizerError::UnsupportedPre(other.to_string())),
    }
}

fn byte_level_bpe(md: &HashMap<String, Value>, vocab: &Vocab) -> Result<Tokenizer, TokenizerError> {
    let merges = string_array(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(TokenizerError::Metadata("tokenizer.ggml.merges")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(vocab), merges)
        .build()
        .map_err(build_err)?;
    let mut tok = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(pre_pattern(md)?.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(build_err)?;
    let pre = PreSequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]);
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
    // User-defined tokens (Qwen's `<tool_call>`, `<|fim_prefix|>`) are text the model writes
    // and reads like any other: kept when decoding, as in the model's own tokenizer; only
    // control tokens (turn markers) are special.
    let user: Vec<AddedToken> = added_of_type(vocab, TYPE_USER_DEFINED)
        .map(|t| AddedToken::from(t, false))
        .collect();
    tok.add_tokens(user).map_err(build_err)?;
    add_special(&mut tok, vocab, &[TYPE_CONTROL])?;
    Ok(tok)
}

fn sentencepiece_bpe(vocab: &Vocab) -> Result<Tokenizer, TokenizerError> {
    let map = vocab_map(vocab);
    let mergeable = |id: u32| matches!(vocab.types[id as usize], TYPE_NORMAL | TYPE_BYTE);
    // Derive merges: every split of a normal token into two mergeable halves, ranked by the
    // whole token's score (higher first), ties broken by the halves' ids.
    let mut ranked: Vec<(f32, u32, u32)> = Vec::new();
    for (id, tok) in vocab.tokens.iter().enumerate() {
        if vocab.types[id] != TYPE_NORMAL || tok.chars().count() < 2 {
            continue;
        }
        for (cut, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(cut);
            if let (Some(&li), Some(&ri)) = (map.get(l), map.get(r)) {
                if mergeable(li) && mergeable(ri) {
                    ranked.push((vocab.scores[id], li, ri));
                }
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = ranked
        .into_iter()
        .map(|(_, l, r)| {
            (
                vocab.tokens[l as usize].clone(),
                vocab.tokens[r as usize].clone(),
            )
        })
        .collect::<Vec<_>>();
    let unk = vocab
        .tokens
        .iter()
        .position(|t| t == "<unk>")
        .map(|i| vocab.tokens[i].clone());
    let mut builder = BPE::builder()
        .vocab_and_merges(map, merges)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let mut tok = Tokenizer::new(builder.build().map_err(build_err)?);
    tok.with_normalizer(Some(Replace::new(" ", "▁").map_err(build_err)?))
        .map_err(build_err)?;
    tok.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(build_err)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ])));
    let user: Vec<AddedToken> = added_of_type(vocab, TYPE_USER_DEFINED)
        .map(|t| AddedToken::from(t, false).normalized(true))
        .collect();
    tok.add_tokens(user).map_err(build_err)?;
    add_special(&mut tok, vocab, &[TYPE_CONTROL])?;
    Ok(tok)
}

fn added_of_type(vocab: &Vocab, kind: i32) -> impl Iterator<Item = String> + '_ {
    vocab
        .tokens
        .iter()
        .zip(&vocab.types)
        .filter(move |(t, ty)| **ty == kind && !t.is_empty())
        .map(|(t, _)| t.clone())
}

fn add_special(tok: &mut Tokenizer, vocab: &Vocab, kinds: &[i32]) -> Result<(), TokenizerError> {
    let special: Vec<AddedToken> = kinds
        .iter()
        .flat_map(|k| added_of_type(vocab, *k))
        .map(|t| AddedToken::from(t, true))
        .collect();
    tok.add_special_tokens(special).map_err(build_err)?;
    Ok(())
}
