//! Continuous batching for models that support it (moss's decoder): the engine thread keeps a set
//! of running sequences, each with its own KV cache and position, and advances all of those that
//! are decoding in one batched forward pass per step. New requests join between steps; their
//! prompt is prefilled in chunks (short ones while others are decoding, so a long prompt does not
//! stall everyone); finished or cancelled sequences leave at once. A finished sequence's KV cache
//! is kept in a small prefix cache (`prefixes`): a later prompt that starts with the same tokens
//! (the system prompt, or the same conversation one turn later) continues from it instead of
//! recomputing. Keys and values live in one paged store (`KvPool`): a shared prefix's whole blocks
//! are shared, not copied, and the prefix cache gives blocks back whenever a running sequence
//! needs them. While few sequences decode, each may feed tokens drafted by prompt lookup
//! (`lookup`) after its next one, kept only as far as its own samples confirm them.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc;

use super::decoder::{Decoder, KvPool, SeqCache};
use super::lookup::{self, DraftLength};
use super::prefixes::Prefixes;
use super::sequence::{Sequence, Step};
use super::{EngineOptions, EngineStats, Event, FinishReason, Job, ModelInfo, Timings};

/// Prompt tokens prefilled per step when nobody else is waiting for a token.
const PREFILL_ALONE: usize = 512;
/// … and while other sequences are decoding (each step costs them a token's delay).
const PREFILL_SHARED: usize = 64;

struct Seq<'a> {
    job: Job,
    cache: SeqCache,
    /// The decoding state: prompt and generated tokens, sampler, text, stop strings.
    seq: Sequence<'a>,
    /// Logits for the next token, when the sequence is ready to sample: (rows, vocab), one row
    /// more than `draft` holds.
    logits: Option<Tensor>,
    /// Tokens drafted by prompt lookup and fed in the last step after the sequence's next token.
    draft: Vec<u32>,
    draft_length: DraftLength,
    /// A failure was reported on the stream already: nothing more is sent.
    failed: bool,
    queued: Duration,
    started: Instant,
    prefill: Option<Duration>,
    decode_start: Instant,
    /// Bytes of the KV budget held for this sequence.
    reserved: usize,
    /// Prompt tokens that came from the prefix cache.
    reused: usize,
}

/// The store `run` needs: the KV budget admission counts against, plus a block per batch slot for
/// rounding, and at least one whole context (a sequence admitted alone always fits).
pub(super) fn kv_pool(
    model: &Decoder,
    info: &ModelInfo,
    options: &EngineOptions,
) -> candle_core::Result<KvPool> {
    let per_token = model.kv_bytes_per_token();
    let slack = (info.batch + 1) * super::decoder::KV_BLOCK * per_token;
    model.kv_pool(options.kv_cache_bytes.max(info.context_length * per_token) + slack)
}

/// The engine loop with batching; returns when the job channel closes.
pub(super) fn run(
    model: &Decoder,
    pool: &KvPool,
    info: &ModelInfo,
    jobs: &mut mpsc::Receiver<Job>,
    options: &EngineOptions,
    stats: &EngineStats,
) {
    let per_token = model.kv_bytes_per_token();
    let budget = options.kv_cache_bytes;
    let max_batch = info.batch;
    let mut prefixes = Prefixes::new(budget / 2, pool.block_bytes());
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut reserved = 0usize;
    loop {
        if running.is_empty() && waiting.is_empty() {
            match jobs.blocking_recv() {
                Some(job) => waiting.push_back(job),
                None => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            waiting.push_back(job);
        }
        // Admit in arrival order while there is room in the batch and in the KV budget.
        while let Some(job) = waiting.front() {
            if job.events.is_closed() {
                waiting.pop_front();
                stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                finished(stats);
                continue;
            }
            let r = &job.request;
            let need = kv_need(r.prompt.len(), r.max_tokens, info.context_length, per_token);
            if !admits(running.len(), max_batch, reserved, need, budget) {
                break;
            }
            let job = waiting.pop_front().expect("front exists");
            reserved += need;
            let max_draft = options.lookup.max_draft;
            running.push(start(
                job,
                info,
                pool,
                &mut prefixes,
                need,
                max_draft,
                stats,
            ));
        }

        let decoding = running.iter().any(|s| s.logits.is_some());
        // One prefill chunk for the oldest sequence still reading its prompt.
        if let Some(seq) = running.iter_mut().find(|s| s.prefill.is_none()) {
            let chunk = if decoding {
                PREFILL_SHARED
            } else {
                PREFILL_ALONE
            };
            let done = seq.cache.len();
            let end = (done + chunk).min(seq.job.request.prompt.len());
            if !seq.job.events.is_closed() {
                let mut caches = [&mut seq.cache];
                prefixes.make_room(pool, KvPool::blocks_needed(&caches, end - done));
                match model.forward_batch(pool, &mut caches, &seq.seq.tokens[done..end]) {
                    Ok(logits) if end == seq.job.request.prompt.len() => {
                        seq.prefill = Some(seq.started.elapsed());
                        seq.decode_start = Instant::now();
                        seq.logits = logits.to_device(&candle_core::Device::Cpu).ok();
                    }
                    Ok(_) => {}
                    Err(e) => seq.logits = fail(seq, e),
                }
            } else {
                seq.prefill = Some(seq.started.elapsed());
            }
        }

        // Sample a token for every sequence that has logits; feed the continuing ones together.
        let mut feed: Vec<(usize, u32)> = Vec::new();
        let mut ended: Vec<(usize, FinishReason)> = Vec::new();
        for (i, seq) in running.iter_mut().enumerate() {
            if seq.prefill.is_some() && seq.logits.is_none() && seq.job.events.is_closed() {
                ended.push((i, FinishReason::Cancelled));
                continue;
            }
            let Some(logits) = seq.logits.take() else {
                if seq.prefill.is_some() {
                    // Failed (already reported) or cancelled before its first token.
                    ended.push((i, FinishReason::Cancelled));
                }
                continue;
            };
            match take_rows(seq, &logits, info, stats) {
                Ok(Step::Continue(next)) => feed.push((i, next)),
                Ok(Step::Finished(reason)) => ended.push((i, reason)),
                Err(e) => {
                    let _ = fail(seq, e);
                    ended.push((i, FinishReason::Error));
                }
            }
        }
        if !feed.is_empty() {
            if !options.token_delay.is_zero() {
                std::thread::sleep(options.token_delay);
            }
            stats.batch_peak.fetch_max(feed.len(), Ordering::Relaxed);
            // While few sequences decode, each may guess what follows its next token — on the
            // CPU, where every row is computed as it would be alone (a GPU's kernels depend on the
            // number of rows, so a drafted answer could differ there).
            let drafting = feed.len() <= options.lookup.max_batch && info.gpu.is_none();
            for &(i, _) in &feed {
                let seq = &mut running[i];
                // (the sequence's tokens end with `next`)
                seq.draft = if drafting && !seq.job.request.no_lookup {
                    let room = draft_room(seq, info).min(seq.draft_length.get());
                    lookup::draft(&seq.seq.tokens, room)
                } else {
                    Vec::new()
                };
            }
            let result = {
                let mut caches: Vec<&mut SeqCache> = Vec::with_capacity(feed.len());
                let mut feeds: Vec<Vec<u32>> = Vec::with_capacity(feed.len());
                let mut want = feed.iter().peekable();
                for (i, seq) in running.iter_mut().enumerate() {
                    if let Some(&&(_, next)) = want.peek().filter(|(w, _)| *w == i) {
                        want.next();
                        let mut tokens = vec![next];
                        tokens.extend_from_slice(&seq.draft);
                        feeds.push(tokens);
                        caches.push(&mut seq.cache);
                    }
                }
                let need: usize = caches
                    .iter()
                    .zip(&feeds)
                    .map(|(c, f)| c.blocks_short(f.len()))
                    .sum();
                prefixes.make_room(pool, need);
                let feeds: Vec<&[u32]> = feeds.iter().map(Vec::as_slice).collect();
                model.forward_decode(pool, &mut caches, &feeds)
            };
            // Every row's logits to the host in one transfer (a no-op on the CPU): sampling is
            // done there.
            let result = result.and_then(|l| l.to_device(&candle_core::Device::Cpu));
            match result {
                Ok(logits) => {
                    let mut row = 0;
                    for (i, _) in &feed {
                        let seq = &mut running[*i];
                        let rows = seq.draft.len() + 1;
                        seq.logits = logits.narrow(0, row, rows).ok();
                        row += rows;
                    }
                }
                Err(e) => {
                    for (i, _) in &feed {
                        let _ = fail(&mut running[*i], e.to_string());
                        ended.push((*i, FinishReason::Error));
                    }
                }
            }
        }
        // Finished sequences leave now, highest index first so the others keep their places.
        ended.sort_by_key(|e| std::cmp::Reverse(e.0));
        ended.dedup_by_key(|e| e.0);
        for (i, reason) in ended {
            let seq = running.swap_remove(i);
            reserved = reserved.saturating_sub(seq.reserved);
            finish(seq, reason, &mut prefixes, stats);
        }
        // swap_remove moved the last sequence into a freed place: keep arrival order for prefill.
        running.sort_by_key(|s| s.started);
    }
}

/// Samples the sequence's rows of logits in order: the first gives the token after the one it was
/// fed; each further row, computed with a drafted token, counts only while every sample so far
/// equals the draft (the sequence would have taken that token anyway). Positions computed for
/// drafted tokens not taken are forgotten.
fn take_rows(
    seq: &mut Seq,
    logits: &Tensor,
    info: &ModelInfo,
    stats: &EngineStats,
) -> candle_core::Result<Step> {
    let draft = std::mem::take(&mut seq.draft);
    let rows = draft.len() + 1;
    let mut taken = 0;
    let step = loop {
        let step = seq
            .seq
            .advance(&logits.get(taken)?, info, &seq.job.events, stats)?;
        match step {
            Step::Continue(next) if taken < draft.len() && next == draft[taken] => taken += 1,
            _ => break step,
        }
    };
    // Rows after the one that decided were computed from tokens not taken.
    seq.cache.truncate(seq.cache.len() - (rows - 1 - taken));
    if !draft.is_empty() {
        stats
            .draft_tokens
            .fetch_add(draft.len() as u64, Ordering::Relaxed);
        stats
            .draft_accepted
            .fetch_add(taken as u64, Ordering::Relaxed);
        seq.draft_length.update(draft.len(), taken);
    }
    Ok(step)
}

/// Tokens a sequence may draft after its next one: each drafted token yields one more sample, so
/// no more than its answer has left, and none past its context.
fn draft_room(seq: &Seq, info: &ModelInfo) -> usize {
    let request = &seq.job.request;
    // (`generated` counts the next token, not yet fed)
    let generated = seq.seq.tokens.len() - request.prompt.len();
    let answer_left = request.max_tokens.saturating_sub(generated + 1);
    let context_left = info.context_length.saturating_sub(seq.cache.len() + 1);
    answer_left.min(context_left)
}

/// KV-cache bytes a request reserves: room for its prompt and its longest answer, within the
/// context window.
fn kv_need(prompt: usize, max_tokens: usize, context: usize, per_token: usize) -> usize {
    (prompt + max_tokens).min(context) * per_token
}

/// Whether a request that needs `need` bytes joins `running` sequences that hold `reserved` of
/// the `budget`, with `max_batch` places: there must be a place and room in the budget — but a
/// request with nobody running always joins (the store holds at least one whole context).
fn admits(running: usize, max_batch: usize, reserved: usize, need: usize, budget: usize) -> bool {
    running < max_batch && (running == 0 || reserved + need <= budget)
}

fn finished(stats: &EngineStats) {
    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    stats.requests_finished.fetch_add(1, Ordering::Relaxed);
}

fn start<'a>(
    job: Job,
    info: &'a ModelInfo,
    pool: &KvPool,
    prefixes: &mut Prefixes,
    reserved: usize,
    max_draft: usize,
    stats: &EngineStats,
) -> Seq<'a> {
    stats.requests_started.fetch_add(1, Ordering::Relaxed);
    let _ = job.events.send(Event::Started);
    let cache = prefixes
        .lookup(pool, &job.request.prompt)
        .unwrap_or_default();
    let reused = cache.len();
    stats
        .prefix_tokens_reused
        .fetch_add(reused as u64, Ordering::Relaxed);
    Seq {
        seq: Sequence::new(&job.request, info),
        queued: job.submitted.elapsed(),
        job,
        cache,
        logits: None,
        draft: Vec::new(),
        draft_length: DraftLength::new(max_draft),
        failed: false,
        started: Instant::now(),
        prefill: None,
        decode_start: Instant::now(),
        reserved,
        reused,
    }
}

/// Reports a failure on the sequence's stream; the sequence then leaves.
fn fail(seq: &mut Seq, e: impl std::fmt::Display) -> Option<Tensor> {
    tracing::error!("generation failed: {e}");
    let _ = seq.job.events.send(Event::Error(e.to_string()));
    seq.prefill.get_or_insert(Duration::ZERO);
    seq.failed = true;
    None
}

fn finish(mut seq: Seq, reason: FinishReason, prefixes: &mut Prefixes, stats: &EngineStats) {
    if !seq.failed {
        seq.seq.flush(&seq.job.events);
        if reason == FinishReason::Cancelled {
            stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
        }
        let _ = seq.job.events.send(Event::Done {
            finish_reason: reason,
            usage: seq.seq.usage(),
            timings: Timings {
                queued: seq.queued,
                prefill: seq.prefill.unwrap_or_default(),
                decode: seq.decode_start.elapsed(),
            },
        });
        let fed = seq.cache.len();
        let mut tokens = seq.seq.tokens;
        if fed > seq.reused && fed <= tokens.len() {
            tokens.truncate(fed);
            prefixes.insert(tokens, seq.cache);
        }
    }
    finished(stats);
}

#[cfg(test)]
mod tests {
    use super::{admits, kv_need};

    #[test]
    fn a_request_joins_when_there_is_a_place_and_room() {
        // Places: the batch's size bounds it, however much memory is free.
        assert!(admits(0, 2, 0, 10, 100));
        assert!(admits(1, 2, 10, 10, 100));
        assert!(!admits(2, 2, 20, 10, 100));
        // Memory: a request that does not fit waits while others run …
        assert!(admits(1, 8, 60, 40, 100), "exactly full is still room");
        assert!(!admits(1, 8, 61, 40, 100));
        // … but alone it always runs, even past the budget (one whole context is always made).
        assert!(admits(0, 8, 0, 1_000, 100));
        assert!(!admits(0, 0, 0, 1, 100), "no places at all: nothing runs");
    }

    #[test]
    fn a_request_reserves_its_prompt_and_answer_within_the_context() {
        assert_eq!(kv_need(100, 50, 4096, 2), 300);
        assert_eq!(
            kv_need(4000, 512, 4096, 2),
            8192,
            "capped by the context window"
        );
    }
}
