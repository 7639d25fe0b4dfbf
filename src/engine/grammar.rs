//! Constrained decoding: a grammar (a JSON schema, a Lark grammar) held by each sequence that
//! has one, masking the tokens it forbids before sampling. The grammar engine is llguidance (the
//! one llama.cpp and vLLM use); moss gives it the model's vocabulary as bytes (`Vocabulary`),
//! built once, on the first request that needs it.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use tokenizers::Tokenizer;

/// What a constrained answer must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON value matching the schema (`{"type": "object"}` for any object).
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark dialect (which can embed schemas with `%json`).
    Lark(String),
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema)),
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        }
    }
}

/// The schema with llguidance's JSON options: no free whitespace (a small model given the
/// freedom can write newlines until its budget runs out), separators as Python writes them.
pub fn compact(schema: &serde_json::Value) -> serde_json::Value {
    let mut s = schema.clone();
    if let Some(obj) = s.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
        });
    }
    s
}

/// The model's tokens as bytes (special tokens marked), and the grammar engine over them.
pub struct Vocabulary {
    tokenizer: Tokenizer,
    size: usize,
    end_of_turn: u32,
    built: OnceLock<Result<Built, String>>,
}

struct Built {
    bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    factory: Arc<ParserFactory>,
}

impl Vocabulary {
    /// `size`: how many logits the model gives (the table is padded to it).
    pub fn new(tokenizer: Tokenizer, size: usize, end_of_turn: u32) -> Self {
        Self {
            tokenizer,
            size,
            end_of_turn,
            built: OnceLock::new(),
        }
    }

    fn built(&self) -> Result<&Built, String> {
        self.built
            .get_or_init(|| build(&self.tokenizer, self.size, self.end_of_turn))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// A token's bytes (a special token's name) and whether it is special.
    pub fn token(&self, id: u32) -> (&[u8], bool) {
        match self.built() {
            Ok(b) => match b.bytes.get(id as usize) {
                Some(bytes) => (bytes, b.special[id as usize]),
                None => (&[], false),
            },
            Err(_) => (&[], false),
        }
    }

    /// Checks `grammar` and makes a matcher for one sequence.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint, String> {
        let built = self.built()?;
        let parser = built
            .factory
            .create_parser(grammar.top_level())
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(Constraint { matcher }),
        }
    }

    /// Builds the table now (otherwise the first request that needs it does).
    pub fn prepare(&self) -> Result<(), String> {
        self.built().map(|_| ())
    }
}

fn build(tokenizer: &Tokenizer, size: usize, end_of_turn: u32) -> Result<Built, String> {
    let json: serde_json::Value = serde_json::from_str(
        &tokenizer
            .to_string(false)
            .map_err(|e| format!("tokenizer: {e}"))?,
    )
    .map_err(|e| format!("tokenizer: {e}"))?;
    let mut bytes = llguidance::token_bytes_from_tokenizer_json(&json)
        .map_err(|e| format!("the vocabulary cannot be read as bytes: {e}"))?;
    let size = size.max(bytes.len());
    bytes.resize(size, Vec::new());
    let special: Vec<bool> = bytes
        .iter()
        .map(|b| b.len() > 1 && b[0] == TokTrie::SPECIAL_TOKEN_MARKER)
        .collect();
    let info = TokRxInfo::new(size as u32, end_of_turn);
    let trie = TokTrie::from(&info, &bytes);
    let env: Arc<dyn TokenizerEnv + Sync> = Arc::new(ApproximateTokEnv::new(trie));
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    for (b, s) in bytes.iter_mut().zip(&special) {
        if *s {
            b.remove(0);
        }
    }
    Ok(Built {
        bytes,
        special,
        factory: Arc::new(factory),
    })
}

/// One sequence's grammar state. A clone starts where the original is, sharing its compiled
/// grammar and lexer caches (one compile for any number of sequences).
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Sets every logit the grammar forbids next to −∞ (when it is complete, all but
    /// end-of-turn).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        for (i, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Moves the grammar past the sampled token.
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}
