//! One sequence's decoding step, written once for every engine loop (the batched one and the
//! one-at-a-time loop of candle-transformers' models): from the next token's logits to the text
//! the client receives — the budget (`max_tokens`, the context window), sampling, the end of the
//! model's turn, whole characters only, stop strings — and what is held back at the end.

use std::sync::atomic::Ordering;

use candle_core::{DType, Tensor};
use tokio::sync::mpsc;

use super::detok::{Detokenizer, StopMatcher, StopOutcome};
use super::grammar::Constraint;
use super::logprobs::Distribution;
use super::sampler::Sampler;
use super::{EngineStats, Event, FinishReason, GenerateRequest, ModelInfo, Usage};

/// What a step decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// The token to feed the model next.
    Continue(u32),
    Finished(FinishReason),
}

/// The decoding state of one request.
pub(super) struct Sequence<'a> {
    /// The prompt, then every generated token.
    pub tokens: Vec<u32>,
    /// Generated tokens.
    pub completion: usize,
    prompt_len: usize,
    max_tokens: usize,
    ignore_eos: bool,
    sampler: Sampler,
    detok: Detokenizer<'a>,
    stops: StopMatcher,
    /// A stop string ended the answer: what was held back is dropped, not released.
    stopped: bool,
    /// Alternatives to report with each token's log-probability (`None`: none reported).
    logprobs: Option<usize>,
    /// The grammar the answer must follow, compiled before the request was queued.
    constraint: Option<Constraint>,
}

impl<'a> Sequence<'a> {
    pub fn new(req: &GenerateRequest, info: &'a ModelInfo) -> Self {
        Self {
            tokens: req.prompt.clone(),
            completion: 0,
            prompt_len: req.prompt.len(),
            max_tokens: req.max_tokens,
            ignore_eos: req.ignore_eos,
            sampler: Sampler::new(&req.sampling),
            detok: Detokenizer::new(&info.prompts.tokenizer),
            stops: StopMatcher::new(&req.stop),
            stopped: false,
            logprobs: req.logprobs,
            constraint: req.constraint.clone(),
        }
    }

    /// Samples the next token: straight from the model's logits, or — with a grammar or
    /// log-probabilities asked for — from a copy on the host, masked by the grammar.
    fn sample(
        &mut self,
        logits: &Tensor,
        info: &ModelInfo,
        events: &mpsc::UnboundedSender<Event>,
    ) -> candle_core::Result<u32> {
        let constraint = &mut self.constraint;
        if constraint.is_none() && self.logprobs.is_none() {
            return self.sampler.sample(logits, &self.tokens);
        }
        let raw: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        // Only a grammar needs a masked copy; log-probabilities alone sample the logits as they are.
        let next = match constraint.as_mut() {
            None => self.sampler.sample(logits, &self.tokens)?,
            Some(c) => {
                let mut masked = raw.clone();
                c.mask(&mut masked).map_err(candle_core::Error::Msg)?;
                let n = masked.len();
                let masked = Tensor::from_vec(masked, n, &candle_core::Device::Cpu)?;
                self.sampler.sample(&masked, &self.tokens)?
            }
        };
        if let Some(c) = constraint.as_mut() {
            c.accept(next).map_err(candle_core::Error::Msg)?;
        }
        if let Some(k) = self.logprobs {
            if !info.end_of_turn.contains(&next) || self.ignore_eos {
                let entry = Distribution::new(&raw).entry(&info.vocabulary, next, k);
                let _ = events.send(Event::Logprob(entry));
            }
        }
        Ok(next)
    }

    /// No more tokens may be generated: `max_tokens` reached or the context window full.
    fn spent(&self, info: &ModelInfo) -> bool {
        self.completion >= self.max_tokens || self.tokens.len() >= info.context_length
    }

    /// One step: samples the next token from `logits`, streams its text on `events`, and says
    /// whether the sequence goes on.
    pub fn advance(
        &mut self,
        logits: &Tensor,
        info: &ModelInfo,
        events: &mpsc::UnboundedSender<Event>,
        stats: &EngineStats,
    ) -> candle_core::Result<Step> {
        if events.is_closed() {
            return Ok(Step::Finished(FinishReason::Cancelled));
        }
        if self.spent(info) {
            return Ok(Step::Finished(FinishReason::Length));
        }
        let next = self.sample(logits, info, events)?;
        self.tokens.push(next);
        self.completion += 1;
        stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
        if !self.ignore_eos && info.end_of_turn.contains(&next) {
            return Ok(Step::Finished(FinishReason::Stop));
        }
        if let Some(piece) = self.detok.push(next) {
            match self.stops.push(&piece) {
                StopOutcome::Continue(text) => send_text(events, text),
                StopOutcome::Stopped(text) => {
                    send_text(events, text);
                    self.stopped = true;
                    return Ok(Step::Finished(FinishReason::Stop));
                }
            }
        }
        if self.spent(info) {
            return Ok(Step::Finished(FinishReason::Length));
        }
        Ok(Step::Continue(next))
    }

    /// Releases what was held back at the end (an incomplete last character, a possible start
    /// of a stop string), unless a stop string ended the answer. Call once.
    pub fn flush(&mut self, events: &mpsc::UnboundedSender<Event>) {
        if self.stopped {
            return;
        }
        let tail = self.detok.flush().unwrap_or_default();
        let tail = match self.stops.push(&tail) {
            StopOutcome::Continue(t) => t + &self.stops.finish(),
            StopOutcome::Stopped(t) => t,
        };
        send_text(events, tail);
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.completion,
        }
    }
}

/// Sends a piece of text (never the NUL character a model can produce as a token).
pub(super) fn send_text(events: &mpsc::UnboundedSender<Event>, text: String) {
    let text = if text.contains('\0') {
        text.replace('\0', "")
    } else {
        text
    };
    if !text.is_empty() {
        let _ = events.send(Event::Text(text));
    }
}
