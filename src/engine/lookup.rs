//! Prompt-lookup drafting: answers often repeat what the conversation holds (code to fix, text to
//! correct, a passage quoted), so the tokens that followed the last earlier occurrence of the
//! answer's latest few tokens are a cheap guess at what comes next. The engine feeds the guess
//! with the sequence's next token in one step (`Decoder::forward_decode`), each drafted token a row
//! computed as it would be alone, and keeps the drafted tokens only as far as sampling the rows'
//! logits in order reproduces them: the answer is exactly the one without drafting (greedy or
//! sampled), only sooner when guesses hold.
//!
//! Drafting costs a row per guessed token whether it holds or not, so it runs only while few
//! sequences decode (`LookupOptions::max_batch`), and each sequence's draft length follows how
//! its guesses have fared: doubled after a draft held whole, cut to what held (at least one)
//! otherwise.

/// Longest run of latest tokens looked for.
const MAX_NGRAM: usize = 3;
/// Shortest: a lone token recurs too often to predict much.
const MIN_NGRAM: usize = 2;

/// When and how much to draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupOptions {
    /// Draft only while at most this many sequences decode (0: never).
    pub max_batch: usize,
    /// Most tokens drafted in one step.
    pub max_draft: usize,
}

impl Default for LookupOptions {
    fn default() -> Self {
        Self {
            max_batch: 2,
            max_draft: 8,
        }
    }
}

/// Up to `max` tokens that followed the most recent earlier occurrence of the last `n` tokens of
/// `tokens` (the longest `n` from `MAX_NGRAM` down to `MIN_NGRAM` that occurs); empty when none
/// does.
pub(super) fn draft(tokens: &[u32], max: usize) -> Vec<u32> {
    if max == 0 {
        return Vec::new();
    }
    let len = tokens.len();
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if len <= n {
            continue;
        }
        let tail = &tokens[len - n..];
        // Earlier windows only: the one at `len - n` is the tail itself.
        if let Some(start) = (0..len - n).rev().find(|&s| &tokens[s..s + n] == tail) {
            let from = start + n;
            return tokens[from..(from + max).min(len)].to_vec();
        }
    }
    Vec::new()
}

/// A sequence's draft length, adapted to how its drafts fare.
#[derive(Debug, Clone, Copy)]
pub(super) struct DraftLength {
    current: usize,
    max: usize,
}

impl DraftLength {
    /// Starts at 4 (or `max`, if smaller); never above `max`.
    pub(super) fn new(max: usize) -> Self {
        Self {
            current: max.min(4),
            max,
        }
    }

    pub(super) fn get(&self) -> usize {
        self.current
    }

    /// `accepted` of `drafted` tokens held.
    pub(super) fn update(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.current = if accepted == drafted {
            (self.current * 2).min(self.max)
        } else {
            accepted.max(1)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::{draft, DraftLength};

    #[test]
    fn drafts_what_followed_the_latest_earlier_occurrence() {
        // "a b c d e … a b" → "c d e"
        let t = [1, 2, 3, 4, 5, 9, 1, 2];
        assert_eq!(draft(&t, 3), vec![3, 4, 5]);
        assert_eq!(draft(&t, 10), vec![3, 4, 5, 9, 1, 2], "up to the end");
        // The most recent occurrence wins; a three-token match before a two-token one.
        let t = [7, 1, 2, 5, 8, 1, 2, 6, 9, 7, 1, 2];
        assert_eq!(draft(&t, 2), vec![5, 8], "7 1 2 matched at the start");
        let t = [1, 2, 5, 1, 2, 6, 0, 1, 2];
        assert_eq!(draft(&t, 1), vec![6], "the latest 1 2");
        // Nothing repeats, or nothing asked for.
        assert!(draft(&[1, 2, 3, 4], 4).is_empty());
        assert!(draft(&[1, 2, 1, 2], 0).is_empty());
        assert!(draft(&[1], 4).is_empty());
        // A lone repeated token is no match.
        assert!(draft(&[5, 1, 6, 1], 4).is_empty());
    }

    #[test]
    fn draft_length_grows_while_drafts_hold_and_shrinks_when_they_fail() {
        let mut d = DraftLength::new(8);
        assert_eq!(d.get(), 4);
        d.update(4, 4);
        assert_eq!(d.get(), 8);
        d.update(8, 8);
        assert_eq!(d.get(), 8, "capped");
        d.update(8, 3);
        assert_eq!(d.get(), 3);
        d.update(3, 0);
        assert_eq!(d.get(), 1, "never zero: one guess is always tried");
        d.update(0, 0);
        assert_eq!(d.get(), 1, "no draft, no change");
    }
}
