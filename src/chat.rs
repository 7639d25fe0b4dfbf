//! One answer, from the stored question to the stored answer: refusal policy, prompt from the
//! conversation's history, the engine, and the store — run in its own task so that the answer is
//! kept (partially, as `cancelled`) even when the browser goes away.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::db::chats::{self, Message, NewMessage};
use crate::db::{now_ms, Db};
use crate::engine::{ChatMessage, Event, FinishReason, Role, SamplingParams, Usage};
use crate::inference::{AnswerRequest, Inference};
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
        /// The stored answer; `None` when nothing was kept (an API call without `store`, or a
        /// conversation deleted while its answer was made).
        message_id: Option<i64>,
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
    #[error("the engine queue is full or no upstream can take the request")]
    Overloaded,
    #[error("{0}")]
    Db(#[from] crate::db::DbError),
    /// The upstream inference server refused the request (moss's or its operator's problem).
    #[error("{0}")]
    Upstream(String),
    #[error("{0}")]
    Internal(String),
}

/// What a turn needs.
pub struct Turn {
    pub user_id: i64,
    pub conversation_id: i64,
    /// The stored question (taken back if the answer is shed while waiting).
    pub question_id: Option<i64>,
    /// Regenerate: the answer this one replaces. It is left out of the prompt and removed only
    /// once the new answer has started, so a refused start loses nothing.
    pub replaces: Option<i64>,
    pub max_tokens: usize,
    pub temperature: Option<f64>,
    /// The admission slot, held until the answer ends.
    pub permit: crate::admission::Permit,
    /// Set for the OpenAI-compatible API: the caller brings the whole conversation, and nothing
    /// is stored in the browser history.
    pub stateless: Option<Stateless>,
}

/// A self-contained request (OpenAI API).
pub struct Stateless {
    /// The conversation; a system message in it comes after the configured system prompt.
    pub messages: Vec<ChatMessage>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Keep the exchange in the user's history (`Turn::conversation_id`), as asked by `store: true`.
    pub keep: bool,
}

/// Everything the answer task shares.
#[derive(Clone)]
pub struct ChatDeps {
    pub db: Db,
    pub config: Arc<Config>,
    pub engine: Inference,
    pub policy: Arc<Policy>,
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// The refusal for a request whose caller wrote `texts` (every turn they wrote), if the policy
/// refuses it.
pub fn refusal_for<'a>(
    deps: &ChatDeps,
    texts: impl IntoIterator<Item = &'a str>,
) -> Option<crate::policy::Refusal> {
    deps.policy.check_all(texts).inspect(|r| {
        tracing::info!(rule = %r.rule, "request refused by policy");
    })
}

/// Counts a refusal toward the user's cool-down (whether or not it is kept in a conversation).
pub async fn record_refusal(
    deps: &ChatDeps,
    user_id: i64,
    refusal: &crate::policy::Refusal,
) -> crate::db::DbResult<()> {
    chats::record_refusal(&deps.db, user_id, &refusal.rule).await
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

/// Stores a refusal as the answer, counts it toward the cool-down, and streams it.
pub async fn refuse(
    deps: &ChatDeps,
    user_id: i64,
    conversation_id: i64,
    refusal: crate::policy::Refusal,
) -> Result<mpsc::Receiver<StreamEvent>, StartError> {
    record_refusal(deps, user_id, &refusal).await?;
    let answer = refusal.answer;
    let m = NewMessage {
        author: chats::Author::Rules,
        content: &answer,
        finish_reason: Some("refused"),
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    let stored = chats::add_message(&deps.db, user_id, conversation_id, &m)
        .await?
        .ok_or(StartError::Internal("conversation vanished".into()))?;
    let (tx, rx) = mpsc::channel(4);
    let _ = tx.try_send(StreamEvent::Token {
        text: answer.clone(),
    });
    let html = crate::render::markdown(&answer);
    let _ = tx.try_send(StreamEvent::Done {
        message_id: Some(stored.id),
        finish_reason: "refused".into(),
        usage: Usage::default(),
        html,
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
    let cfg = &deps.config.engine;
    let (system, history) = match &turn.stateless {
        Some(st) => {
            // The operator's system prompt always comes first; a caller's system messages
            // follow it, never replace it.
            let mut system = cfg.system_prompt.clone();
            for own in st.messages.iter().filter(|m| m.role == Role::System) {
                if !own.content.trim().is_empty() {
                    if !system.is_empty() {
                        system.push_str("\n\n");
                    }
                    system.push_str(&own.content);
                }
            }
            let rest = st
                .messages
                .iter()
                .filter(|m| m.role != Role::System)
                .cloned()
                .collect();
            (system, rest)
        }
        None => {
            let mut messages =
                chats::messages(&deps.db, turn.user_id, turn.conversation_id).await?;
            if let Some(old) = turn.replaces {
                messages.retain(|m| m.id < old);
            }
            (cfg.system_prompt.clone(), history(&messages))
        }
    };
    let system = Some(system).filter(|s| !s.is_empty());
    let mut sampling: SamplingParams = cfg.sampling.params();
    if let Some(t) = turn.temperature {
        sampling.temperature = t;
    }
    // The caller's stop strings first: an upstream takes only four.
    let mut stop: Vec<String> = turn
        .stateless
        .as_ref()
        .map(|st| st.stop.clone())
        .unwrap_or_default();
    stop.extend(cfg.stop.iter().cloned());
    if let Some(st) = &turn.stateless {
        if let Some(p) = st.top_p {
            sampling.top_p = Some(p).filter(|p| *p > 0.0 && *p < 1.0);
        }
        if st.seed.is_some() {
            sampling.seed = st.seed;
        }
    }
    let ahead = deps.engine.ahead();
    let request = AnswerRequest {
        system,
        history,
        max_tokens: turn.max_tokens,
        sampling,
        stop,
    };
    let events = deps.engine.start(request).await?;
    if let Some(old) = turn.replaces {
        // The new answer is under way: the old one goes (before the new one can be stored).
        if let Err(e) = chats::truncate_from(&deps.db, turn.conversation_id, old).await {
            drop(events);
            return Err(e.into());
        }
    }
    let (tx, rx) = mpsc::channel(64);
    if ahead > 0 {
        let _ = tx.try_send(StreamEvent::Queued { position: ahead });
    }
    tokio::spawn(relay(deps.clone(), turn, events, tx, ahead));
    Ok(rx)
}

/// Waits for the engine to take the request, telling the client its place in line as it moves.
/// False when the client left, the service is stopping, or the wait passed the configured limit.
async fn wait_turn(
    deps: &ChatDeps,
    events: &mut crate::engine::EventStream,
    tx: &mpsc::Sender<StreamEvent>,
    ahead: usize,
) -> Result<(), &'static str> {
    let stats = deps.engine.stats();
    let finished_at_start = stats
        .requests_finished
        .load(std::sync::atomic::Ordering::Relaxed);
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_secs(deps.config.limits.max_queue_wait_secs);
    let mut stopping = deps.stopping.clone();
    let mut last = ahead;
    let period = std::time::Duration::from_millis(250);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            ev = events.recv() => return match ev {
                Some(Event::Started) => Ok(()),
                _ => Err("engine"),
            },
            _ = tick.tick() => {
                let done = stats.requests_finished.load(std::sync::atomic::Ordering::Relaxed) - finished_at_start;
                let position = ahead.saturating_sub(done as usize).max(1);
                if ahead > 0 && position != last {
                    last = position;
                    if tx.send(StreamEvent::Queued { position }).await.is_err() {
                        return Err("client");
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Err("timeout"),
            _ = tx.closed() => return Err("client"),
            _ = stopping.changed() => return Err("stopping"),
        }
    }
}

/// How long a client may leave the stream unread before its answer is cut off (and kept).
const CLIENT_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Forwards engine events to the client and stores the answer however it ends.
async fn relay(
    deps: ChatDeps,
    turn: Turn,
    mut events: crate::engine::EventStream,
    tx: mpsc::Sender<StreamEvent>,
    ahead: usize,
) {
    let started = std::time::Instant::now();
    metrics::gauge!("moss_generations_waiting").increment(1.0);
    let waited = wait_turn(&deps, &mut events, &tx, ahead).await;
    metrics::gauge!("moss_generations_waiting").decrement(1.0);
    if let Err(why) = waited {
        drop(events); // leaves the queue: the engine skips a request nobody listens to
        if let Some(q) = turn.question_id {
            let _ = chats::truncate_from(&deps.db, turn.conversation_id, q).await;
        }
        if why == "engine" {
            let _ = tx
                .send(StreamEvent::Error {
                    code: "generation_failed".into(),
                    message: "The model could not take the request.".into(),
                })
                .await;
        }
        if why == "timeout" || why == "stopping" {
            metrics::counter!("moss_shed_total", "reason" => "queue_timeout").increment(1);
            let message =
                "The server is overloaded, please try again tomorrow morning.".to_string();
            let _ = tx
                .send(StreamEvent::Error {
                    code: "overloaded".into(),
                    message,
                })
                .await;
        }
        return;
    }
    metrics::gauge!("moss_generations_running").increment(1.0);
    let mut stopping = deps.stopping.clone();
    let mut text = String::new();
    let mut usage = Usage::default();
    let mut first_token = true;
    let finish = loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Text(piece)) => {
                    if first_token {
                        first_token = false;
                        metrics::histogram!("moss_time_to_first_token_seconds").record(started.elapsed().as_secs_f64());
                    }
                    text.push_str(&piece);
                    // A client that stops reading must not hold the answer (and its slot) forever.
                    let sent = tokio::select! {
                        r = tokio::time::timeout(CLIENT_STALL, tx.send(StreamEvent::Token { text: piece })) => matches!(r, Ok(Ok(()))),
                        _ = stopping.changed() => false,
                    };
                    if !sent {
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
            _ = stopping.changed() => break FinishReason::Cancelled,
        }
    };
    drop(events); // cancels the generation if it is still running
    metrics::gauge!("moss_generations_running").decrement(1.0);
    metrics::counter!("moss_tokens_generated_total").increment(usage.completion_tokens as u64);
    let m = NewMessage {
        author: chats::Author::Model,
        content: &text,
        finish_reason: Some(finish.as_str()),
        prompt_tokens: usage.prompt_tokens as i64,
        completion_tokens: usage.completion_tokens as i64,
    };
    let storage = match &turn.stateless {
        // Nothing is kept for API requests unless asked.
        Some(st) if !st.keep => Storage::NotKept,
        _ => store_with_retry(&deps.db, turn.user_id, turn.conversation_id, &m).await,
    };
    let spent = (usage.prompt_tokens + usage.completion_tokens) as i64;
    if spent > 0 {
        let day = crate::admission::local_day(
            std::time::SystemTime::now(),
            deps.config.limits.utc_offset_hours,
        );
        if let Err(e) = crate::db::usage::add(&deps.db, turn.user_id, &day, spent).await {
            tracing::warn!("recording usage failed: {e}");
        }
    }
    drop(turn.permit); // the slot is free before the client hears "done"
    let message_id = match storage {
        Storage::Kept(id) => Some(id),
        Storage::NotKept | Storage::Gone => None,
        Storage::Failed => {
            let _ = tx
                .send(StreamEvent::Error {
                    code: "unavailable".into(),
                    message: "The answer could not be stored.".into(),
                })
                .await;
            return;
        }
    };
    let event = match finish {
        FinishReason::Error => StreamEvent::Error {
            code: "generation_failed".into(),
            message: match message_id {
                Some(id) => format!("The answer failed (kept as message {id})."),
                None => "The answer failed.".into(),
            },
        },
        f => StreamEvent::Done {
            message_id,
            finish_reason: f.as_str().into(),
            usage,
            html: crate::render::markdown(&text),
        },
    };
    let _ = tx.send(event).await;
}

/// Where an answer ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// Stored as this message.
    Kept(i64),
    /// Not to be stored (an API call without `store`).
    NotKept,
    /// Its conversation was deleted while the answer was made: nothing to store it in.
    Gone,
    /// The database refused or stayed away through every retry.
    Failed,
}

/// Stores an answer, retrying for a while if the database is briefly away: an answer is never
/// silently dropped.
async fn store_with_retry(
    db: &Db,
    user_id: i64,
    conversation_id: i64,
    m: &NewMessage<'_>,
) -> Storage {
    for attempt in 0..10u32 {
        match chats::add_message(db, user_id, conversation_id, m).await {
            Ok(Some(msg)) => return Storage::Kept(msg.id),
            Ok(None) => return Storage::Gone,
            Err(e @ (crate::db::DbError::Other(_) | crate::db::DbError::Conflict)) => {
                // Not the database being away: trying again would fail the same way.
                tracing::error!("storing an answer failed: {e}");
                return Storage::Failed;
            }
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
    Storage::Failed
}
