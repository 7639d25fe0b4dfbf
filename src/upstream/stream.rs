//! One upstream answer as it streams: the server-sent events read and parsed, forwarded as the
//! engine's events, and the connection closed as soon as nobody listens.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

use super::Upstream;
use crate::engine::{
    EngineStats, Event, FinishReason, Timings, TokenLogprob, TokenText, ToolCall, Usage,
};

/// Counts a request in `in_flight` until dropped, whatever way the stream ends.
struct InFlight(Arc<EngineStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.requests_finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads the upstream's event stream and forwards it; stops (closing the connection) as soon as
/// nobody listens.
pub(super) async fn pump(
    up: Upstream,
    response: reqwest::Response,
    tx: mpsc::UnboundedSender<Event>,
    submitted: Instant,
    prompt_chars: usize,
) {
    let stats = up.inner.stats.clone();
    let _count = InFlight(stats.clone());
    let idle = Duration::from_secs(up.inner.cfg.idle_timeout_secs);
    let mut body = response.bytes_stream();
    let mut parser = SseParser::default();
    let mut state = StreamState::default();
    let started = Instant::now();
    let end = loop {
        let next = tokio::select! {
            _ = tx.closed() => {
                stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                return; // dropping `body` closes the connection: the upstream stops generating
            }
            next = tokio::time::timeout(idle, body.next()) => next,
        };
        let bytes = match next {
            Err(_) => break Err("the upstream went silent".to_string()),
            Ok(None) => {
                // A last event without its closing blank line still counts.
                for data in parser.finish() {
                    for ev in state.apply(&data).unwrap_or_default() {
                        let _ = tx.send(ev);
                    }
                }
                for call in state.take_calls() {
                    let _ = tx.send(Event::ToolCall(call));
                }
                if state.finish.is_some() || state.done {
                    break Ok(());
                }
                break Err("the upstream closed the stream early".to_string());
            }
            Ok(Some(Err(e))) => break Err(format!("reading the upstream stream failed: {e}")),
            Ok(Some(Ok(b))) => b,
        };
        let mut failed = None;
        for data in parser.push(&bytes) {
            match state.apply(&data) {
                Ok(events) => {
                    for ev in events {
                        if matches!(ev, Event::Text(_)) {
                            stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = tx.send(ev);
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if state.done {
            for call in state.take_calls() {
                let _ = tx.send(Event::ToolCall(call));
            }
            break Ok(());
        }
    };
    match end {
        Ok(()) => {
            let usage = state.usage.unwrap_or(Usage {
                // No usage from the upstream: estimate (about four characters a token).
                prompt_tokens: prompt_chars.div_ceil(4),
                completion_tokens: state.pieces,
            });
            let _ = tx.send(Event::Done {
                finish_reason: state.finish.unwrap_or(FinishReason::Stop),
                usage,
                timings: Timings {
                    queued: started - submitted,
                    prefill: Duration::ZERO,
                    decode: started.elapsed(),
                },
            });
        }
        Err(e) => {
            metrics::counter!("moss_upstream_failures_total", "reason" => "stream").increment(1);
            let _ = tx.send(Event::Error(e));
        }
    }
}

/// Splits a byte stream into server-sent events and returns each event's `data`.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Whatever is left when the stream ends, as a last event.
    fn finish(&mut self) -> Vec<String> {
        self.buf.extend_from_slice(b"\n\n");
        self.push(&[])
    }

    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend(bytes.iter().filter(|b| **b != b'\r'));
        let mut out = Vec::new();
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event[..end]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// What the chunks so far have said.
#[derive(Default)]
struct StreamState {
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    pieces: usize,
    done: bool,
    /// Function calls as their pieces come: (id, name, arguments so far), by index.
    calls: Vec<(String, String, String)>,
}

impl StreamState {
    /// Applies one chunk; returns the events it adds (log-probabilities, text).
    fn apply(&mut self, data: &str) -> Result<Vec<Event>, String> {
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(vec![]);
        }
        let v: Value = serde_json::from_str(data)
            .map_err(|e| format!("the upstream sent a chunk that is not JSON: {e}"))?;
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(format!("the upstream failed: {message}"));
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
            self.usage = Some(Usage {
                prompt_tokens: n("prompt_tokens"),
                completion_tokens: n("completion_tokens"),
            });
        }
        let mut events = Vec::new();
        let choice = v.get("choices").and_then(|c| c.get(0));
        let entries = choice
            .and_then(|c| c.get("logprobs"))
            .and_then(|l| l.get("content"))
            .and_then(Value::as_array);
        for entry in entries.into_iter().flatten() {
            if let Some(lp) = logprob(entry) {
                events.push(Event::Logprob(lp));
            }
        }
        let delta = choice.and_then(|c| c.get("delta"));
        let calls = delta
            .and_then(|d| d.get("tool_calls"))
            .and_then(Value::as_array);
        for part in calls.into_iter().flatten() {
            self.call_part(part);
        }
        if let Some(reason) = choice
            .and_then(|c| c.get("finish_reason"))
            .and_then(Value::as_str)
        {
            self.finish = Some(match reason {
                "length" => FinishReason::Length,
                _ => FinishReason::Stop,
            });
        }
        let text = delta
            .and_then(|d| d.get("content"))
            .and_then(Value::as_str)
            .map(|t| t.replace('\0', ""))
            .filter(|t| !t.is_empty());
        if let Some(text) = text {
            self.pieces += 1;
            events.push(Event::Text(text));
        }
        Ok(events)
    }

    /// Adds a piece of a streamed function call (OpenAI sends the id and name first, then the
    /// arguments in pieces, all under the call's index).
    fn call_part(&mut self, part: &Value) {
        let index = part.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
        if index > 127 {
            return;
        }
        if self.calls.len() <= index {
            self.calls.resize(index + 1, Default::default());
        }
        let call = &mut self.calls[index];
        if let Some(id) = part.get("id").and_then(Value::as_str) {
            call.0 = id.to_string();
        }
        let function = part.get("function");
        if let Some(name) = function.and_then(|f| f.get("name")).and_then(Value::as_str) {
            call.1.push_str(name);
        }
        if let Some(args) = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
        {
            call.2.push_str(args);
        }
    }

    /// The function calls the upstream made, complete (once).
    fn take_calls(&mut self) -> Vec<ToolCall> {
        std::mem::take(&mut self.calls)
            .into_iter()
            .filter(|c| !c.1.is_empty())
            .map(|(id, name, arguments)| ToolCall {
                id: match id.is_empty() {
                    true => format!("call_{}", &crate::secrets::token()[..24]),
                    false => id,
                },
                name,
                arguments,
            })
            .collect()
    }
}

/// One token's log-probabilities as OpenAI writes them.
fn logprob(entry: &Value) -> Option<TokenLogprob> {
    let text = |e: &Value| -> Option<TokenText> {
        let token = e.get("token")?.as_str()?.to_string();
        let bytes = match e.get("bytes").and_then(Value::as_array) {
            Some(b) => b
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u8))
                .collect(),
            None => token.as_bytes().to_vec(),
        };
        let logprob = e.get("logprob")?.as_f64()? as f32;
        Some(TokenText {
            token,
            bytes,
            logprob,
        })
    };
    let top = entry
        .get("top_logprobs")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(text).collect())
        .unwrap_or_default();
    Some(TokenLogprob {
        chosen: text(entry)?,
        top_logprobs: top,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_reads() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(p.push(b":1}\r\n\r\ndata: [DONE]\n"), vec!["{\"a\":1}"]);
        assert_eq!(p.push(b"\n: comment\n\n"), vec!["[DONE]"]);
        // the stream may end without the last blank line
        assert!(p.push(b"data: [DONE]").is_empty());
        assert_eq!(p.finish(), vec!["[DONE]"]);
    }

    #[test]
    fn chunks_give_text_finish_and_usage() {
        let mut s = StreamState::default();
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(s.apply(role).unwrap(), vec![]);
        let piece = r#"{"choices":[{"index":0,"delta":{"content":"你好"},"finish_reason":null}]}"#;
        assert_eq!(s.apply(piece).unwrap(), vec![Event::Text("你好".into())]);
        let end = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#;
        assert_eq!(s.apply(end).unwrap(), vec![]);
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#;
        s.apply(usage).unwrap();
        s.apply("[DONE]").unwrap();
        assert!(s.done);
        assert_eq!(s.finish, Some(FinishReason::Length));
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 3
            })
        );
        assert!(s
            .apply(r#"{"error":{"message":"boom"}}"#)
            .unwrap_err()
            .contains("boom"));
        assert!(s.apply("not json").is_err());
    }

    #[test]
    fn logprobs_and_calls_in_pieces_are_read() {
        let mut s = StreamState::default();
        let lp = r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi","logprob":-0.5,"bytes":[72,105],"top_logprobs":[{"token":"Hi","logprob":-0.5,"bytes":[72,105]},{"token":"Hello","logprob":-1.5,"bytes":null}]}]}}]}"#;
        let events = s.apply(lp).unwrap();
        let Event::Logprob(entry) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(entry.chosen.bytes, b"Hi");
        assert_eq!(entry.top_logprobs[1].bytes, b"Hello");
        assert_eq!(events[1], Event::Text("Hi".into()));
        let first = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}"#;
        let more = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\": "}}]}}]}"#;
        let last = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]},"finish_reason":"tool_calls"}]}"#;
        for c in [first, more, last] {
            assert!(s.apply(c).unwrap().is_empty());
        }
        let calls = s.take_calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (
                calls[0].id.as_str(),
                calls[0].name.as_str(),
                calls[0].arguments.as_str()
            ),
            ("call_1", "get_weather", "{\"city\": \"Paris\"}")
        );
        assert!(s.take_calls().is_empty());
    }
}
