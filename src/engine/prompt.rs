//! Conversation → prompt token ids: chat template, safe tokenization of message text, and
//! dropping the oldest turns when the history does not fit the context window.

use tokenizers::Tokenizer;

use super::template::{ChatMessage, ChatTemplate, Role, Tool};

/// Why a prompt could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("the conversation has no message")]
    Empty,
    #[error("the prompt needs {needed} tokens but at most {limit} fit")]
    TooLong { needed: usize, limit: usize },
    #[error("chat template failed: {0}")]
    Template(String),
    #[error("tokenizer failed: {0}")]
    Tokenize(String),
    #[error("this model's chat template does not describe tools to the model")]
    NoTools,
}

/// A prompt ready for the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// How many of the oldest non-system messages were left out to make it fit.
    pub dropped_messages: usize,
}

/// Everything needed to turn messages into ids; shared (read-only) by every request.
pub struct PromptBuilder {
    pub template: ChatTemplate,
    /// Parses special-token markup (used for template text only).
    pub tokenizer: Tokenizer,
    /// Treats special-token markup as plain text (used for message contents).
    plain: Tokenizer,
    pub bos: Option<u32>,
}

/// Private-use characters that mark where a message's content goes in the rendered template.
const MARK_OPEN: char = '\u{F8F0}';
const MARK_CLOSE: char = '\u{F8F1}';

impl PromptBuilder {
    pub fn new(template: ChatTemplate, tokenizer: Tokenizer, bos: Option<u32>) -> Self {
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        Self {
            template,
            tokenizer,
            plain,
            bos,
        }
    }

    /// Token ids of `text` with special-token markup taken literally (no BOS).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        encode(&self.plain, text)
    }

    /// Renders and tokenizes `messages` with no truncation. Text written by users and the model is
    /// tokenized as plain text, so `<|im_start|>` typed in a message cannot open a new turn.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, PromptError> {
        self.encode_chat_with(messages, &[])
    }

    /// `encode_chat` with the functions the model may call. Contents are marked (an empty
    /// content stays empty: templates test it); function names are checked by the caller and
    /// JSON in the template is written so that it cannot hold a special token.
    pub fn encode_chat_with(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> Result<Vec<u32>, PromptError> {
        let contents: Vec<&str> = messages
            .iter()
            .map(|m| m.content.as_str())
            .filter(|c| !c.is_empty())
            .collect();
        let mut i = 0;
        let marked: Vec<ChatMessage> = messages
            .iter()
            .map(|m| {
                let mut copy = m.clone();
                if !m.content.is_empty() {
                    copy.content = format!("{MARK_OPEN}{i}{MARK_CLOSE}");
                    i += 1;
                }
                copy
            })
            .collect();
        let rendered = self
            .template
            .render_with_tools(&marked, tools, true)
            .map_err(|e| PromptError::Template(e.to_string()))?;
        if tools.iter().any(|t| !rendered.contains(t.name.as_str())) {
            return Err(PromptError::NoTools);
        }
        let messages = contents;
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        let mut rest = rendered.as_str();
        let mut next = 0usize;
        while let Some(open) = rest.find(MARK_OPEN) {
            ids.extend(encode(&self.tokenizer, &rest[..open])?);
            let after = &rest[open + MARK_OPEN.len_utf8()..];
            let close = after
                .find(MARK_CLOSE)
                .ok_or_else(|| PromptError::Template("unbalanced marker".into()))?;
            let index: usize = after[..close]
                .parse()
                .map_err(|_| PromptError::Template("bad marker".into()))?;
            if index != next || index >= messages.len() {
                return Err(PromptError::Template(
                    "the template reorders or repeats messages".into(),
                ));
            }
            ids.extend(encode(&self.plain, messages[index])?);
            next += 1;
            rest = &after[close + MARK_CLOSE.len_utf8()..];
        }
        if next != messages.len() {
            return Err(PromptError::Template(
                "the template dropped a message".into(),
            ));
        }
        ids.extend(encode(&self.tokenizer, rest)?);
        // Templates often start with the BOS text themselves; never send it twice.
        if let Some(bos) = self.bos {
            if ids.len() > 1 && ids[1] == bos {
                ids.remove(0);
            }
        }
        Ok(ids)
    }

    /// Builds the prompt for `system` + `history`, keeping at most `limit` tokens: the oldest turns
    /// go first; the system prompt and the newest message are never dropped.
    pub fn build(
        &self,
        system: Option<&str>,
        history: &[ChatMessage],
        limit: usize,
    ) -> Result<Prompt, PromptError> {
        self.build_with(system, history, &[], limit)
    }

    /// `build` with the functions the model may call.
    pub fn build_with(
        &self,
        system: Option<&str>,
        history: &[ChatMessage],
        tools: &[Tool],
        limit: usize,
    ) -> Result<Prompt, PromptError> {
        if history.is_empty() {
            return Err(PromptError::Empty);
        }
        let with = |start: usize| -> Result<Vec<u32>, PromptError> {
            let mut msgs = Vec::with_capacity(history.len() - start + 1);
            if let Some(s) = system.filter(|s| !s.is_empty()) {
                msgs.push(ChatMessage::new(Role::System, s));
            }
            msgs.extend_from_slice(&history[start..]);
            self.encode_chat_with(&msgs, tools)
        };
        let full = with(0)?;
        if full.len() <= limit {
            return Ok(Prompt {
                ids: full,
                dropped_messages: 0,
            });
        }
        let last = history.len() - 1;
        let newest_only = with(last)?;
        if newest_only.len() > limit {
            return Err(PromptError::TooLong {
                needed: newest_only.len(),
                limit,
            });
        }
        // Binary search for the earliest start that fits (length shrinks as start grows).
        let (mut lo, mut hi) = (1usize, last);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if with(mid)?.len() <= limit {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        // Start on a user message so the model never sees an answer without its question.
        let mut start = lo;
        while start < last && history[start].role != Role::User {
            start += 1;
        }
        Ok(Prompt {
            ids: with(start)?,
            dropped_messages: start,
        })
    }
}

fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, PromptError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    tok.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| PromptError::Tokenize(e.to_string()))
}
