//! The answer as it streams, from the backend to the client: its pieces (with function calls read
//! out of them when the model was shown functions), log-probabilities, renderings for the browser
//! a few times a second, and how it ends.

use std::time::{Duration, Instant};

use super::sink::Sink;
use super::tools::{CallReader, Piece};
use super::{Answers, Finish, StreamEvent};
use crate::engine::{Event, EventStream, Usage};

/// How often a followed answer is rendered while it streams.
const RENDER_EVERY: Duration = Duration::from_millis(300);

/// Passes the answer's pieces on until it ends; returns its text, how it ended and its usage.
pub(super) async fn forward(
    answers: &Answers,
    events: &mut EventStream,
    sink: &Sink,
    started: Instant,
    reads_calls: bool,
) -> (String, Finish, Usage) {
    let mut stopping = answers.stopping.clone();
    let mut text = String::new();
    let mut first_token = true;
    let mut calls = reads_calls.then(CallReader::default);
    // Calls an upstream reported as calls.
    let mut upstream_calls = 0usize;
    // Renderings: the first at once, then at most one per RENDER_EVERY, and one after the last
    // piece however long the next takes (a stalled answer is not left half raw).
    let mut rendered: Option<tokio::time::Instant> = None;
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let render_at = due.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            _ = tokio::time::sleep_until(render_at), if due.is_some() => {
                due = None;
                rendered = Some(tokio::time::Instant::now());
                let html = crate::render::markdown(&text);
                let text_len = text.encode_utf16().count();
                sink.send(StreamEvent::Html { html, text_len }).await;
            }
            ev = events.recv() => match ev {
                Some(Event::Text(piece)) => {
                    if first_token {
                        first_token = false;
                        metrics::histogram!("moss_time_to_first_token_seconds").record(started.elapsed().as_secs_f64());
                        answers.tally.first_token(started.elapsed());
                    }
                    text.push_str(&piece);
                    let out = match calls.as_mut() {
                        Some(reader) => reader.push(&piece),
                        None => vec![Piece::Text(piece)],
                    };
                    // A client that stops reading must not hold the answer (and its slot) forever.
                    if !send_all(sink, out, &mut stopping).await {
                        return (text, Finish::Cancelled, Usage::default());
                    }
                    if sink.renders() && due.is_none() {
                        let now = tokio::time::Instant::now();
                        due = Some(rendered.map_or(now, |at| (at + RENDER_EVERY).max(now)));
                    }
                }
                Some(Event::Logprob(lp)) => {
                    if !sink.send(StreamEvent::Logprob(lp)).await {
                        return (text, Finish::Cancelled, Usage::default());
                    }
                }
                Some(Event::ToolCall(call)) => {
                    upstream_calls += 1;
                    if !sink.send(StreamEvent::ToolCall(call)).await {
                        return (text, Finish::Cancelled, Usage::default());
                    }
                }
                Some(Event::Done { finish_reason, usage, .. }) => {
                    let mut finish: Finish = finish_reason.into();
                    if let Some(reader) = calls.as_mut() {
                        let rest = reader.finish();
                        if !send_all(sink, rest, &mut stopping).await {
                            return (text, Finish::Cancelled, usage);
                        }
                        if reader.calls > 0 && finish == Finish::Stop {
                            finish = Finish::ToolCalls;
                        }
                    }
                    if upstream_calls > 0 && finish == Finish::Stop {
                        finish = Finish::ToolCalls;
                    }
                    return (text, finish, usage);
                }
                Some(Event::Started) => {}
                Some(Event::Error(e)) => {
                    tracing::error!("generation failed: {e}");
                    return (text, Finish::Error, Usage::default());
                }
                None => return (text, Finish::Error, Usage::default()),
            },
            _ = sink.unwanted() => return (text, Finish::Cancelled, Usage::default()),
            _ = stopping.changed() => return (text, Finish::Cancelled, Usage::default()),
        }
    }
}

/// Sends the pieces in order; false when the client is gone or the service is stopping.
async fn send_all(
    sink: &Sink,
    pieces: Vec<Piece>,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    for piece in pieces {
        let event = match piece {
            Piece::Text(text) => StreamEvent::Token { text },
            Piece::Call(call) => StreamEvent::ToolCall(call),
        };
        let sent = tokio::select! {
            sent = sink.send(event) => sent,
            _ = stopping.changed() => false,
        };
        if !sent {
            return false;
        }
    }
    true
}
