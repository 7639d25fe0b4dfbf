//! One answer, from the stored question to the stored answer: refusal policy, prompt from the
//! conversation's history, the engine, and the store — run in its own task so that the answer is
//! kept (partially, as `cancelled`) even when the browser goes away.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::db::chats::{self, Message, NewMessage};
use crate::db::{now_ms, Db};
use crate::engine::{
    ChatMessage, EngineHandle, Event, FinishReason, GenerateRequest, Role, SamplingParams,
    SubmitError, Usage,
};
use crate::policy::Policy;

/// What the client hears while an answer is made.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Queued {
        position: usize,
    },
    Token {
        text: String,
    },
    Done {
        message_id: i64,
        finish_reason: String,
        usage: Usage,
        html: String,
    },
    Error {
        code: String,
        message: String,
    },
}

/// Why an answer could not even start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the prompt does not fit the context window")]
    PromptTooLong,
    #[error("the engine queue is full")]
    Overloaded,
    #[error("{0}")]
    Db(#[from] crate::db::DbError),
    #[error("{0}")]
    Internal(String),
}

/// What a turn needs.
pub struct Turn {
    pub user_id: i64,
    pub conversation_id: i64,
    pub max_tokens: usize,
    pub temperature: Option<f64>,
}

/// Everything the answer task shares.
#[derive(Clone)]
pub struct ChatDeps {
    pub db: Db,
    pub config: Arc<Config>,
    pub engine: EngineHandle,
    pub policy: Arc<Policy>,
}

/// The refusal for `text`, if the policy refuses it.
pub fn refusal_for(deps: &ChatDeps, text: &str) -> Option<String> {
    deps.policy.check(text).map(|r| {
        tracing::info!(rule = %r.rule, "request refused by policy");
        r.answer
    })
}

/// Milliseconds until the user's refusal cool-down ends, if they are in one.
pub async fn cooldown_left(deps: &ChatDeps, user_id: i64) -> crate::db::DbResult<Option<i64>> {
    let r = &deps.config.refusals;
    if r.cooldown_after <= 0 {
        return Ok(None);
    }
    let now = now_ms();
    let times = chats::refusal_times(&deps.db, user_id, now - r.window_minutes * 60_000).await?;
    if (times.len() as i64) < r.cooldown_after {
        return Ok(None);
    }
    let until = times[0] + r.cooldown_minutes * 60_000;
    Ok((until > now).then_some(until - now))
}

/// Stores a refusal as the answer and streams it.
pub async fn refuse(
    deps: &ChatDeps,
    turn: &Turn,
    answer: String,
) -> Result<mpsc::Receiver<StreamEvent>, StartError> {
    let m = NewMessage {
        role: "assistant",
        content: &answer,
        finish_reason: Some("refused"),
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    let stored = chats::add_message(&deps.db, turn.user_id, turn.conversation_id, &m)
        .await?
        .ok_or(StartError::Internal("conversation vanished".into()))?;
    let (tx, rx) = mpsc::channel(4);
    let _ = tx.try_send(StreamEvent::Token {
        text: answer.clone(),
    });
    let _ = tx.try_send(StreamEvent::Done {
        message_id: stored.id,
        finish_reason: "refused".into(),
        usage: Usage::default(),
        html: crate::render::markdown(&answer),
    });
    Ok(rx)
}

/// The conversation so far, as the model sees it (refused turns are left out).
fn history(messages: &[Message]) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let refused_next = messages
            .get(i + 1)
            .is_some_and(|n| n.finish_reason.as_deref() == Some("refused"));
        if m.finish_reason.as_deref() == Some("refused") || (m.role == "user" && refused_next) {
            continue;
        }
        let role = if m.role == "assistant" {
            Role::Assistant
        } else {
            Role::User
        };
        out.push(ChatMessage::new(role, m.content.clone()));
    }
    out
}

/// Starts answering the last user message of the conversation; returns the event stream.
pub async fn start_answer(
    deps: &ChatDeps,
    turn: Turn,
) -> Result<mpsc::Receiver<StreamEvent>, StartError> {
    let messages = chats::messages(&deps.db, turn.user_id, turn.conversation_id).await?;
    let cfg = &deps.config.engine;
    let system = Some(cfg.system_prompt.as_str()).filter(|s| !s.is_empty());
    let prompt = deps
        .engine
        .prompt(system, &history(&messages), turn.max_tokens)
        .map_err(|e| match e {
            crate::engine::PromptError::TooLong { .. } => StartError::PromptTooLong,
            other => StartError::Internal(other.to_string()),
        })?;
    let mut sampling: SamplingParams = cfg.sampling.params();
    if let Some(t) = turn.temperature {
        sampling.temperature = t;
    }
    let ahead = deps.engine.load();
    let request = GenerateRequest {
        prompt: prompt.ids,
        sampling,
        max_tokens: turn.max_tokens,
        stop: cfg.stop.clone(),
        ignore_eos: false,
    };
    let events = deps.engine.generate(request).map_err(|e| match e {
        SubmitError::TooLong { .. } => StartError::PromptTooLong,
        SubmitError::QueueFull | SubmitError::Stopped => StartError::Overloaded,
        SubmitError::EmptyPrompt => StartError::Internal("empty prompt".into()),
    })?;
    let (tx, rx) = mpsc::channel(64);
    if ahead > 0 {
        let _ = tx.try_send(StreamEvent::Queued { position: ahead });
    }
    tokio::spawn(relay(deps.db.clone(), turn, events, tx));
    Ok(rx)
}

/// Forwards engine events to the client and stores the answer however it ends.
async fn relay(
    db: Db,
    turn: Turn,
    mut events: crate::engine::EventStream,
    tx: mpsc::Sender<StreamEvent>,
) {
    let mut text = String::new();
    let mut usage = Usage::default();
    let finish = loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Text(piece)) => {
                    text.push_str(&piece);
                    if tx.send(StreamEvent::Token { text: piece }).await.is_err() {
                        break FinishReason::Cancelled;
                    }
                }
                Some(Event::Done { finish_reason, usage: u, .. }) => {
                    usage = u;
                    break finish_reason;
                }
                Some(Event::Started) => {}
                Some(Event::Error(e)) => {
                    tracing::error!("generation failed: {e}");
                    break FinishReason::Error;
                }
                None => break FinishReason::Error,
            },
            _ = tx.closed() => break FinishReason::Cancelled,
        }
    };
    drop(events); // cancels the generation if it is still running
    let m = NewMessage {
        role: "assistant",
        content: &text,
        finish_reason: Some(finish.as_str()),
        prompt_tokens: usage.prompt_tokens as i64,
        completion_tokens: usage.completion_tokens as i64,
    };
    let stored = store_with_retry(&db, turn.user_id, turn.conversation_id, &m).await;
    match (stored, finish) {
        (Some(msg), FinishReason::Error) => {
            let _ = tx
                .send(StreamEvent::Error {
                    code: "generation_failed".into(),
                    message: format!("The answer failed (kept as message {}).", msg.id),
                })
                .await;
        }
        (Some(msg), f) => {
            let html = crate::render::markdown(&text);
            let _ = tx
                .send(StreamEvent::Done {
                    message_id: msg.id,
                    finish_reason: f.as_str().into(),
                    usage,
                    html,
                })
                .await;
        }
        (None, _) => {
            let _ = tx
                .send(StreamEvent::Error {
                    code: "unavailable".into(),
                    message: "The answer could not be stored.".into(),
                })
                .await;
        }
    }
}

/// Stores an answer, retrying for a while if the database is briefly away: an answer is never
/// silently dropped.
async fn store_with_retry(
    db: &Db,
    user_id: i64,
    conversation_id: i64,
    m: &NewMessage<'_>,
) -> Option<Message> {
    for attempt in 0..10u32 {
        match chats::add_message(db, user_id, conversation_id, m).await {
            Ok(Some(msg)) => return Some(msg),
            Ok(None) => return None, // the conversation was deleted meanwhile
            Err(e) => {
                tracing::warn!(attempt, "storing an answer failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(
                    200 * 2u64.pow(attempt.min(5)),
                ))
                .await;
            }
        }
    }
    tracing::error!("an answer could not be stored after retries");
    None
}
