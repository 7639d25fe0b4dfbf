//! One path for an answer, whoever asks (the browser's send and regenerate, the
//! OpenAI-compatible API) and wherever it comes from (the local engine or an upstream cluster):
//! the request's parameters checked once (`params`), one gate that decides — cool-down, refusal,
//! generation slot, quota (`gate`) — the backend (`backend`), and the relay that streams the
//! answer and stores it however it ends (`relay`). Outcomes and errors are typed here and mapped
//! to HTTP once per protocol, in `http`.

pub mod backend;
mod forward;
pub mod gate;
pub mod live;
pub mod pace;
pub mod params;
mod relay;
mod sink;
mod store;
pub mod tools;

use std::sync::Arc;

pub use backend::{Backend, Readiness};
pub use gate::Decision;
pub use params::Params;
pub use relay::start;

use crate::config::Config;
use crate::db::chats::{self, Author, Message, MessageRole};
use crate::db::{Db, DbError};
use crate::engine::{ChatMessage, FinishReason, Role, Usage};
use crate::policy::{Policy, Refusal};

/// How an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model ended its turn, or a stop string came.
    Stop,
    /// `max_tokens` or the context window.
    Length,
    /// The client left or pressed stop, or the service is stopping: what was written is kept.
    Cancelled,
    /// The model or the upstream failed mid-answer: what was written is kept.
    Error,
    /// The refusal rules answered; the model did not run.
    Refused,
    /// The model called functions; the caller runs them and asks again.
    ToolCalls,
}

impl Finish {
    /// The name clients and the database use.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
            Finish::Error => "error",
            Finish::Refused => "refused",
            Finish::ToolCalls => "tool_calls",
        }
    }
}

impl From<FinishReason> for Finish {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length => Finish::Length,
            FinishReason::Cancelled => Finish::Cancelled,
            FinishReason::Error => Finish::Error,
        }
    }
}

/// Why a stream ended without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It waited longer than allowed for the model, or the service is stopping.
    Overloaded,
    /// The model or the upstream failed.
    GenerationFailed,
    /// The answer could not be stored.
    Unavailable,
}

impl Failure {
    pub fn code(self) -> &'static str {
        match self {
            Failure::Overloaded => "overloaded",
            Failure::GenerationFailed => "generation_failed",
            Failure::Unavailable => "unavailable",
        }
    }
}

/// What the client hears while an answer is made.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Queued {
        position: usize,
        /// About how long until the answer starts, from the measured pace (None before any).
        wait_secs: Option<u64>,
    },
    Token {
        text: String,
    },
    /// The log-probability of a token of the answer (API requests that ask for them).
    Logprob(crate::engine::TokenLogprob),
    /// A function the model called (API requests with tools).
    ToolCall(crate::engine::ToolCall),
    /// The answer so far, rendered and sanitised (a few times a second while it streams, for
    /// the browser; the API ignores it).
    Html {
        html: String,
        /// How much of the text it renders, in UTF-16 code units (as a browser counts): the
        /// pieces after that are shown as they come until the next rendering.
        text_len: usize,
    },
    Done {
        /// The stored answer; `None` when nothing was kept (an API call without `store`, or a
        /// conversation deleted while its answer was made).
        message_id: Option<i64>,
        finish: Finish,
        usage: Usage,
        html: String,
    },
    Failed {
        failure: Failure,
        message: String,
    },
}

/// Why an answer was not started.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// A parameter has the wrong value (422).
    #[error("invalid {}: {message}", field.name())]
    Invalid {
        field: params::Field,
        message: String,
        message_zh: String,
    },
    /// The message is longer than `max_chars`; `None`: the conversation does not fit the
    /// model's context window.
    #[error("prompt too long")]
    PromptTooLong { max_chars: Option<usize> },
    #[error("not found")]
    NotFound,
    /// Several recent requests were refused.
    #[error("cooldown")]
    Cooldown { retry_after_secs: u64 },
    /// The account has its answers in progress.
    #[error("busy")]
    Busy,
    /// Every slot is taken, the engine's queue is full, no upstream can take it, or the day's
    /// service budget is spent: try again tomorrow morning.
    #[error("overloaded")]
    Overloaded,
    #[error("quota exceeded")]
    QuotaExceeded { retry_after_secs: u64 },
    /// The database is away, or an upstream refused the request itself.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<DbError> for AnswerError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(m) => AnswerError::Unavailable(m),
            other => AnswerError::Internal(other.to_string()),
        }
    }
}

/// Where an answer's conversation comes from.
pub enum Source {
    /// A stored conversation (the browser): the answer follows `after` (the question it
    /// answers), the path to it is the prompt, and the answer is stored under it — beside any
    /// earlier answers (regenerate). `question` is taken back if nothing answers it.
    Conversation {
        id: i64,
        question: Option<i64>,
        after: i64,
    },
    /// The caller's own messages (the API); the answer is stored in `keep` when asked.
    Messages {
        messages: Vec<ChatMessage>,
        keep: Option<i64>,
    },
}

/// Everything answers share, made once (cheap to clone).
#[derive(Clone)]
pub struct Answers(Arc<Inner>);

pub struct Inner {
    pub db: Db,
    pub config: Arc<Config>,
    pub backend: Backend,
    pub policy: Policy,
    pub admission: crate::admission::Admission,
    /// Tells running answers to stop and store what they have (set at shutdown).
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// The answers being made in conversations, for anyone (re)joining them.
    pub live: live::Registry,
    /// How fast answers are being made (the estimated wait in line).
    pub pace: pace::Pace,
    /// What this process did, for the dashboard's rollups.
    pub tally: crate::tally::Tally,
}

impl std::ops::Deref for Answers {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Answers {
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }

    /// Takes a question back that nothing will answer (a refused start, a shed wait).
    pub async fn take_back(&self, conversation_id: i64, question: i64) -> Result<(), DbError> {
        chats::take_back(&self.db, conversation_id, question).await
    }

    /// Stores a refusal as the answer to `question` and streams it.
    pub async fn refuse_in(
        &self,
        user_id: i64,
        conversation_id: i64,
        question: i64,
        refusal: Refusal,
    ) -> Result<tokio::sync::mpsc::Receiver<StreamEvent>, AnswerError> {
        let m = chats::NewMessage {
            author: chats::Author::Rules,
            place: chats::Place::Under(Some(question)),
            content: &refusal.answer,
            finish_reason: Some(Finish::Refused.as_str()),
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        let stored = chats::add_message(&self.db, user_id, conversation_id, &m)
            .await?
            .ok_or(AnswerError::NotFound)?;
        Ok(refusal_stream(refusal.answer, Some(stored.id)))
    }
}

/// A refusal as a stream: its text, then `done`.
pub fn refusal_stream(
    answer: String,
    message_id: Option<i64>,
) -> tokio::sync::mpsc::Receiver<StreamEvent> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let html = crate::render::markdown(&answer);
    let _ = tx.try_send(StreamEvent::Token { text: answer });
    let _ = tx.try_send(StreamEvent::Done {
        message_id,
        finish: Finish::Refused,
        usage: Usage::default(),
        html,
    });
    rx
}

/// The conversation so far, as the model sees it (refused turns are left out).
fn history(messages: &[Message]) -> Vec<ChatMessage> {
    let refused = |m: &Message| m.written_by == Author::Rules;
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let refused_next = messages.get(i + 1).is_some_and(refused);
        if refused(m) || (m.role == MessageRole::User && refused_next) {
            continue;
        }
        let role = match m.role {
            MessageRole::Assistant => Role::Assistant,
            MessageRole::User => Role::User,
        };
        out.push(ChatMessage::new(role, m.content.clone()));
    }
    out
}
