//! Upstream inference (`engine.backend = "openai"`): answers come from OpenAI-compatible servers
//! (vLLM, TGI, llama.cpp's server, another moss) over streamed `POST {url}/chat/completions`.
//!
//! Requests go to the listed URLs in turn; a URL that refuses the connection, times out or
//! answers 429/5xx is skipped for `failure_cooldown_secs` and the next one is tried. When none
//! can take the request the caller gets `UpstreamError::Overloaded` — the same fast "try again
//! tomorrow morning" answer as a full local queue, never a 500. The stream is relayed as engine
//! `Event`s; dropping the receiver closes the upstream connection, which cancels the upstream's
//! generation.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::UpstreamConfig;
use crate::engine::{ChatMessage, EngineStats, Event, EventStream, Role};

mod request;
mod stream;

use request::request_body;
pub use request::UpstreamRequest;

/// One upstream server and how it has been doing.
struct Target {
    /// Base URL without a trailing slash (`…/v1`).
    base: String,
    /// Skipped until then after a failure.
    down_until: Mutex<Option<Instant>>,
    /// Requests it could not take (refused connection, timeout, 429, 5xx) since start.
    skipped: AtomicU64,
    /// Requests it refused as such (400-like answers) since start.
    refused: AtomicU64,
}

impl Target {
    fn is_down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap()
            .is_some_and(|t| t > Instant::now())
    }
}

/// A cheap, cloneable client for the configured upstream servers.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    targets: Vec<Target>,
    next: AtomicUsize,
    cfg: UpstreamConfig,
    stats: Arc<EngineStats>,
}

/// Why no upstream stream could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The conversation is too long for the upstream (or for `max_prompt_chars`).
    #[error("the prompt is too long for the upstream")]
    TooLong,
    /// Every URL is down or refused for now: the overloaded answer.
    #[error("no upstream can take the request")]
    Overloaded,
    /// An upstream refused this request itself (a wrong key, model name or parameter).
    #[error("{0}")]
    Refused(String),
}

/// How one attempt on one target ended, when it did not give a stream.
enum Attempt {
    /// The target cannot take it now (refused, timed out, 429, 5xx): try the next one.
    Next(String),
    /// The request itself is the problem; another target would say the same.
    Final(UpstreamError),
}

/// The health of each upstream URL, for `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetHealth {
    pub url: String,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Requests this URL could not take since this process started (each then went to the next).
    pub skipped: u64,
    /// Requests this URL refused as such since this process started.
    pub refused: u64,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the upstream HTTP client: {e}"))?;
        let targets = cfg
            .urls
            .iter()
            .map(|u| Target {
                base: u.trim_end_matches('/').to_string(),
                down_until: Mutex::new(None),
                skipped: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                targets,
                next: AtomicUsize::new(0),
                cfg: cfg.clone(),
                stats: Arc::default(),
            }),
        })
    }

    pub fn model(&self) -> &str {
        &self.inner.cfg.model
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.inner.stats
    }

    /// The conversation cut to `max_prompt_chars`, oldest turns first, starting on a user turn;
    /// the system message is always kept. `PromptTooLong` when even the last message does not fit.
    pub fn fit(
        &self,
        system: Option<&str>,
        history: &[ChatMessage],
    ) -> Result<Vec<ChatMessage>, UpstreamError> {
        let budget = self
            .inner
            .cfg
            .max_prompt_chars
            .saturating_sub(system.map_or(0, |s| s.chars().count()));
        let mut used = 0;
        let mut start = history.len();
        for (i, m) in history.iter().enumerate().rev() {
            let n = m.content.chars().count();
            if used + n > budget {
                break;
            }
            used += n;
            start = i;
        }
        while start < history.len() && history[start].role != Role::User {
            start += 1;
        }
        if start >= history.len() {
            return Err(UpstreamError::TooLong);
        }
        let mut out = Vec::with_capacity(history.len() - start + 1);
        if let Some(s) = system {
            out.push(ChatMessage::new(Role::System, s.to_string()));
        }
        out.extend(history[start..].iter().cloned());
        Ok(out)
    }

    /// Sends the request to the first upstream that takes it; the stream yields its events.
    pub async fn generate(&self, req: UpstreamRequest) -> Result<EventStream, UpstreamError> {
        let inner = &self.inner;
        let body = request_body(&inner.cfg.model, &req);
        let n = inner.targets.len();
        let first = inner.next.fetch_add(1, Ordering::Relaxed);
        let order: Vec<usize> = (0..n)
            .map(|i| (first + i) % n)
            .filter(|&i| !inner.targets[i].is_down())
            .collect();
        if order.is_empty() {
            metrics::counter!("moss_upstream_failures_total", "reason" => "all_down").increment(1);
            return Err(UpstreamError::Overloaded);
        }
        let prompt_chars: usize = req.messages.iter().map(|m| m.content.chars().count()).sum();
        let submitted = Instant::now();
        for i in order {
            let target = &inner.targets[i];
            match self.attempt(target, &body).await {
                Ok(response) => {
                    *target.down_until.lock().unwrap() = None;
                    let (tx, rx) = mpsc::unbounded_channel();
                    inner.stats.in_flight.fetch_add(1, Ordering::Relaxed);
                    inner.stats.requests_started.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Event::Started);
                    tokio::spawn(stream::pump(
                        self.clone(),
                        response,
                        tx,
                        submitted,
                        prompt_chars,
                    ));
                    return Ok(rx);
                }
                Err(Attempt::Next(why)) => {
                    tracing::warn!(upstream = %target.base, "upstream skipped: {why}");
                    metrics::counter!("moss_upstream_failures_total", "reason" => "unavailable")
                        .increment(1);
                    target.skipped.fetch_add(1, Ordering::Relaxed);
                    self.mark_down(target);
                }
                Err(Attempt::Final(e)) => return Err(e),
            }
        }
        Err(UpstreamError::Overloaded)
    }

    fn mark_down(&self, target: &Target) {
        let until = Instant::now() + Duration::from_secs(self.inner.cfg.failure_cooldown_secs);
        *target.down_until.lock().unwrap() = Some(until);
    }

    fn post(&self, target: &Target, body: &Value) -> reqwest::RequestBuilder {
        let mut rb = self
            .inner
            .client
            .post(format!("{}/chat/completions", target.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .body(body.to_string());
        if !self.inner.cfg.api_key.is_empty() {
            rb = rb.bearer_auth(&self.inner.cfg.api_key);
        }
        rb
    }

    async fn attempt(&self, target: &Target, body: &Value) -> Result<reqwest::Response, Attempt> {
        let wait = Duration::from_secs(self.inner.cfg.response_timeout_secs);
        let response = match tokio::time::timeout(wait, self.post(target, body).send()).await {
            Err(_) => return Err(Attempt::Next("no response headers in time".into())),
            Ok(Err(e)) => return Err(Attempt::Next(format!("request failed: {e}"))),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = tokio::time::timeout(Duration::from_secs(2), response.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let text: String = text.chars().take(500).collect();
        match status.as_u16() {
            429 | 500..=599 => Err(Attempt::Next(format!("answered {status}: {text}"))),
            400 | 413 | 422
                if text.contains("context")
                    || text.contains("too long")
                    || text.contains("prompt_too_long") =>
            {
                Err(Attempt::Final(UpstreamError::TooLong))
            }
            // The upstream refused this request (a wrong key or model name, or a parameter it does
            // not take): another URL would most likely say the same, and the URL itself is fine.
            _ => {
                tracing::error!(upstream = %target.base, "upstream refused the request: {status}: {text}");
                metrics::counter!("moss_upstream_failures_total", "reason" => "refused")
                    .increment(1);
                target.refused.fetch_add(1, Ordering::Relaxed);
                Err(Attempt::Final(UpstreamError::Refused(format!(
                    "the inference server refused the request ({status})"
                ))))
            }
        }
    }

    /// Each URL as requests have found it (no probe): `up` unless in its failure cool-down.
    pub fn targets(&self) -> Vec<TargetHealth> {
        self.inner
            .targets
            .iter()
            .map(|t| TargetHealth {
                url: t.base.clone(),
                up: !t.is_down(),
                error: None,
                skipped: t.skipped.load(Ordering::Relaxed),
                refused: t.refused.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Asks every upstream for its model list; an upstream that answers is usable again at once.
    pub async fn health(&self) -> Vec<TargetHealth> {
        let checks = self.inner.targets.iter().map(|t| async move {
            let mut rb = self
                .inner
                .client
                .get(format!("{}/models", t.base))
                .timeout(Duration::from_secs(self.inner.cfg.connect_timeout_secs + 2));
            if !self.inner.cfg.api_key.is_empty() {
                rb = rb.bearer_auth(&self.inner.cfg.api_key);
            }
            let error = match rb.send().await {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("answered {}", r.status())),
                Err(e) => Some(format!("unreachable: {e}")),
            };
            // A probe that succeeds puts the URL back in rotation at once; one that fails only
            // reports (requests mark URLs down themselves), so probing cannot keep a URL out.
            if error.is_none() {
                *t.down_until.lock().unwrap() = None;
            }
            TargetHealth {
                url: t.base.clone(),
                up: error.is_none(),
                error,
                skipped: t.skipped.load(Ordering::Relaxed),
                refused: t.refused.load(Ordering::Relaxed),
            }
        });
        futures_util::future::join_all(checks).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_prompt_chars: usize) -> UpstreamConfig {
        UpstreamConfig {
            urls: vec!["http://127.0.0.1:1/v1".into()],
            model: "m".into(),
            api_key: String::new(),
            connect_timeout_secs: 1,
            response_timeout_secs: 1,
            idle_timeout_secs: 1,
            failure_cooldown_secs: 1,
            max_prompt_chars,
        }
    }

    #[test]
    fn history_is_cut_oldest_first_and_starts_on_a_user_turn() {
        let up = Upstream::new(&cfg(30)).unwrap();
        let h = vec![
            ChatMessage::new(Role::User, "u".repeat(10)),
            ChatMessage::new(Role::Assistant, "a".repeat(10)),
            ChatMessage::new(Role::User, "v".repeat(10)),
            ChatMessage::new(Role::Assistant, "b".repeat(5)),
            ChatMessage::new(Role::User, "w".repeat(5)),
        ];
        let out = up.fit(Some("sys"), &h).unwrap();
        let roles: Vec<Role> = out.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            vec![Role::System, Role::User, Role::Assistant, Role::User]
        );
        assert_eq!(out[1].content, "v".repeat(10));
        let too_long = vec![ChatMessage::new(Role::User, "x".repeat(40))];
        assert!(matches!(
            up.fit(None, &too_long),
            Err(UpstreamError::TooLong)
        ));
    }

    #[tokio::test]
    async fn nothing_listening_is_overloaded_then_skipped() {
        let up = Upstream::new(&cfg(1000)).unwrap();
        let req = || UpstreamRequest {
            messages: vec![ChatMessage::new(Role::User, "hi")],
            max_tokens: 4,
            temperature: 0.0,
            top_p: None,
            seed: None,
            stop: vec![],
            logprobs: None,
            response_format: None,
            tools: vec![],
            tool_choice: None,
        };
        assert!(matches!(
            up.generate(req()).await,
            Err(UpstreamError::Overloaded)
        ));
        assert!(up.inner.targets[0].is_down());
        let health = up.health().await;
        assert!(!health[0].up && health[0].error.is_some());
    }
}
