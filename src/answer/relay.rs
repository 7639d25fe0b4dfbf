//! One answer from the backend to the client: the prompt (a conversation's history or the
//! caller's messages, after the operator's system prompt), the wait in line, the stream, and the
//! store — in a task of its own. An answer in a conversation goes on when its page goes away
//! (`live`: it ends early only on Stop); an API caller that leaves ends its answer, which is kept
//! (partially, as `cancelled`) when it is to be stored.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::backend::AnswerRequest;
use super::forward::forward;
use super::sink::Sink;
use super::store::{store_with_retry, Storage};
use super::{history, AnswerError, Answers, Failure, Finish, Params, Source, StreamEvent};
use crate::admission::Permit;
use crate::db::branches;
use crate::db::chats::{self, Message, NewMessage, Place};
use crate::engine::{ChatMessage, Event, EventStream, Role, SamplingParams, Usage};

/// One answer under way.
struct Turn {
    user_id: i64,
    source: Source,
    permit: Permit,
    /// The model was shown functions: calls are read out of its text.
    reads_calls: bool,
}

impl Turn {
    /// The question to take back if nothing answers it.
    fn question(&self) -> Option<(i64, i64)> {
        match self.source {
            Source::Conversation {
                id,
                question: Some(q),
                ..
            } => Some((id, q)),
            _ => None,
        }
    }

    /// The conversation the answer is stored in, if any.
    fn kept_in(&self) -> Option<i64> {
        match self.source {
            Source::Conversation { id, .. } => Some(id),
            Source::Messages { keep, .. } => keep,
        }
    }
}

/// Starts an answer for `user_id` (holding `permit`, from the gate); returns its event stream.
pub async fn start(
    answers: &Answers,
    user_id: i64,
    source: Source,
    params: Params,
    permit: Permit,
) -> Result<mpsc::Receiver<StreamEvent>, AnswerError> {
    let (system, history) = prompt(answers, user_id, &source).await?;
    let reads_calls = !params.shown_tools().is_empty();
    let request = AnswerRequest {
        system: Some(system).filter(|s| !s.is_empty()),
        history,
        max_tokens: params.max_tokens,
        sampling: sampling(answers, &params),
        logprobs: params.logprobs,
        grammar: params.grammar(),
        tools: params.shown_tools().to_vec(),
        format: params.format.clone(),
        tool_choice: params.tool_choice.clone(),
        // The caller's stop strings first: an upstream takes only four.
        stop: params
            .stop
            .iter()
            .chain(&answers.config.engine.stop)
            .cloned()
            .collect(),
    };
    let ahead = answers.backend.ahead();
    let events = answers.backend.start(request).await?;
    let turn = Turn {
        user_id,
        source,
        permit,
        reads_calls,
    };
    let (sink, rx) = match turn.source {
        Source::Conversation { id, .. } => {
            let live = answers.live.begin(id, user_id);
            let rx = live.clone().follow();
            let sink = Sink::Live {
                live,
                conversation: id,
            };
            (sink, rx)
        }
        Source::Messages { .. } => {
            let (tx, rx) = mpsc::channel(64);
            (Sink::Direct(tx), rx)
        }
    };
    if ahead > 0 {
        let wait_secs = answers
            .pace
            .wait_secs(ahead, answers.config.limits.max_running);
        sink.send(StreamEvent::Queued {
            position: ahead,
            wait_secs,
        })
        .await;
    }
    let answers = answers.clone();
    tokio::spawn(async move {
        relay(&answers, turn, events, &sink, ahead).await;
        if let Sink::Live { live, conversation } = &sink {
            answers.live.end(*conversation, live);
        }
    });
    Ok(rx)
}

/// The system prompt and the conversation the model sees.
async fn prompt(
    answers: &Answers,
    user_id: i64,
    source: &Source,
) -> Result<(String, Vec<ChatMessage>), AnswerError> {
    let operator = answers.config.engine.system_prompt.clone();
    match source {
        Source::Messages { messages, .. } => {
            // The operator's system prompt always comes first; a caller's system messages
            // follow it, never replace it.
            let mut system = operator;
            for own in messages.iter().filter(|m| m.role == Role::System) {
                if !own.content.trim().is_empty() {
                    if !system.is_empty() {
                        system.push_str("\n\n");
                    }
                    system.push_str(&own.content);
                }
            }
            let rest = messages
                .iter()
                .filter(|m| m.role != Role::System)
                .cloned()
                .collect();
            Ok((system, rest))
        }
        Source::Conversation { id, after, .. } => {
            let all = chats::messages(&answers.db, user_id, *id).await?;
            let path: Vec<Message> = branches::path_to(&all, Some(*after))
                .into_iter()
                .cloned()
                .collect();
            Ok((operator, history(&path)))
        }
    }
}

/// The configured sampling with the request's changes.
fn sampling(answers: &Answers, params: &Params) -> SamplingParams {
    let mut sampling = answers.config.engine.sampling.params();
    if let Some(t) = params.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = params.top_p {
        sampling.top_p = Some(p).filter(|p| *p > 0.0 && *p < 1.0);
    }
    if params.seed.is_some() {
        sampling.seed = params.seed;
    }
    sampling
}

/// How the wait for the model ended.
enum WaitEnd {
    /// The model took the request.
    Started,
    /// The engine or upstream dropped it.
    BackendGone,
    ClientLeft,
    /// Longer than `limits.max_queue_wait_secs`.
    TimedOut,
    /// The service is shutting down.
    Stopping,
}

/// Waits for the backend to take the request, telling the client its place in line as it moves.
async fn wait_turn(
    answers: &Answers,
    events: &mut EventStream,
    sink: &Sink,
    ahead: usize,
) -> WaitEnd {
    let stats = answers.backend.stats();
    let finished_at_start = stats.requests_finished.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(answers.config.limits.max_queue_wait_secs);
    let mut stopping = answers.stopping.clone();
    let mut last = ahead;
    let period = Duration::from_millis(250);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            ev = events.recv() => return match ev {
                Some(Event::Started) => WaitEnd::Started,
                _ => WaitEnd::BackendGone,
            },
            _ = tick.tick() => {
                let done = stats.requests_finished.load(Ordering::Relaxed) - finished_at_start;
                let position = ahead.saturating_sub(done as usize).max(1);
                if ahead > 0 && position != last {
                    last = position;
                    let wait_secs = answers.pace.wait_secs(position, answers.config.limits.max_running);
                    if !sink.send(StreamEvent::Queued { position, wait_secs }).await {
                        return WaitEnd::ClientLeft;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => return WaitEnd::TimedOut,
            _ = sink.unwanted() => return WaitEnd::ClientLeft,
            _ = stopping.changed() => return WaitEnd::Stopping,
        }
    }
}

/// Forwards backend events to the client and stores the answer however it ends.
async fn relay(answers: &Answers, turn: Turn, mut events: EventStream, sink: &Sink, ahead: usize) {
    let started = Instant::now();
    metrics::gauge!("moss_generations_waiting").increment(1.0);
    let waited = wait_turn(answers, &mut events, sink, ahead).await;
    metrics::gauge!("moss_generations_waiting").decrement(1.0);
    let failure = match waited {
        WaitEnd::Started => None,
        // Stopped (or left, for the API) before it began: nothing to keep.
        WaitEnd::ClientLeft => Some(None),
        WaitEnd::BackendGone => Some(Some((
            Failure::GenerationFailed,
            "The model could not take the request.",
        ))),
        WaitEnd::TimedOut | WaitEnd::Stopping => {
            metrics::counter!("moss_shed_total", "reason" => "queue_timeout").increment(1);
            answers.tally.outcome(crate::tally::Outcome::Overloaded);
            Some(Some((
                Failure::Overloaded,
                "The server is overloaded, please try again tomorrow morning.",
            )))
        }
    };
    if let Some(told) = failure {
        drop(events); // leaves the queue: the engine skips a request nobody listens to
        if let Some((conversation, question)) = turn.question() {
            if let Err(e) = answers.take_back(conversation, question).await {
                tracing::warn!("taking back an unanswered question failed: {e}");
            }
        }
        let end = match told {
            Some((failure, message)) => StreamEvent::Failed {
                failure,
                message: message.to_string(),
            },
            None => StreamEvent::Done {
                message_id: None,
                finish: Finish::Cancelled,
                usage: Usage::default(),
                html: String::new(),
            },
        };
        sink.send(end).await;
        return;
    }
    metrics::gauge!("moss_generations_running").increment(1.0);
    let running_since = Instant::now();
    answers.tally.waited(running_since - started);
    let (text, finish, usage) =
        forward(answers, &mut events, sink, started, turn.reads_calls).await;
    if matches!(finish, Finish::Stop | Finish::Length | Finish::ToolCalls) {
        answers.pace.record(running_since.elapsed());
    }
    answers.tally.outcome(crate::tally::Outcome::Answered);
    answers
        .tally
        .add(crate::tally::Metric::Tokens, usage.completion_tokens as u64);
    drop(events); // cancels the generation if it is still running
    metrics::gauge!("moss_generations_running").decrement(1.0);
    metrics::counter!("moss_tokens_generated_total").increment(usage.completion_tokens as u64);
    let place = match turn.source {
        Source::Conversation { after, .. } => Place::Under(Some(after)),
        // An API exchange kept with `store`: its messages are one branch.
        Source::Messages { .. } => Place::AtLeaf,
    };
    let m = NewMessage {
        author: chats::Author::Model,
        place,
        content: &text,
        finish_reason: Some(finish.as_str()),
        prompt_tokens: usage.prompt_tokens as i64,
        completion_tokens: usage.completion_tokens as i64,
    };
    let storage = match turn.kept_in() {
        None => Storage::NotKept,
        Some(conversation) => store_with_retry(&answers.db, turn.user_id, conversation, &m).await,
    };
    record_usage(answers, turn.user_id, usage).await;
    drop(turn.permit); // the slot is free before the client hears "done"
    let message_id = match storage {
        Storage::Kept(id) => Some(id),
        Storage::NotKept | Storage::Gone => None,
        Storage::Failed => {
            let failure = Failure::Unavailable;
            let message = "The answer could not be stored.".to_string();
            sink.send(StreamEvent::Failed { failure, message }).await;
            return;
        }
    };
    let event = match finish {
        Finish::Error => StreamEvent::Failed {
            failure: Failure::GenerationFailed,
            message: match message_id {
                Some(id) => format!("The answer failed (kept as message {id})."),
                None => "The answer failed.".into(),
            },
        },
        finish => StreamEvent::Done {
            message_id,
            finish,
            usage,
            html: crate::render::markdown(&text),
        },
    };
    sink.send(event).await;
}

/// Counts the tokens toward the account's and the service's daily budgets.
async fn record_usage(answers: &Answers, user_id: i64, usage: Usage) {
    let spent = (usage.prompt_tokens + usage.completion_tokens) as i64;
    if spent == 0 {
        return;
    }
    let day = crate::admission::local_day(
        std::time::SystemTime::now(),
        answers.config.limits.utc_offset_hours,
    );
    if let Err(e) = crate::db::usage::add(&answers.db, user_id, &day, spent).await {
        tracing::warn!("recording usage failed: {e}");
    }
}
