//! Log-probabilities of the sampled token and its most likely alternatives, from the model's own
//! distribution (the logits before any sampling setting or constraint changes them) — what
//! OpenAI's `logprobs` / `top_logprobs` report.

use super::grammar::Vocabulary;

/// Most alternatives a request may ask for (OpenAI's limit).
pub const MAX_TOP: usize = 20;

/// A token as a client sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenText {
    /// Its text (bytes that are not whole UTF-8 characters shown as U+FFFD).
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// One generated token's log-probability and the `top` most likely tokens at its place.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    #[serde(flatten)]
    pub chosen: TokenText,
    pub top_logprobs: Vec<TokenText>,
}

/// The log-softmax of `logits` at a few places, computed once per step.
pub struct Distribution<'a> {
    logits: &'a [f32],
    log_total: f32,
}

impl<'a> Distribution<'a> {
    pub fn new(logits: &'a [f32]) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
        Self {
            logits,
            log_total: max + sum.ln() as f32,
        }
    }

    pub fn logprob(&self, token: u32) -> f32 {
        self.logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - self.log_total)
    }

    /// The `k` most likely tokens, most likely first (ties by lower id).
    pub fn top(&self, k: usize) -> Vec<(u32, f32)> {
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        if k == 0 {
            return best;
        }
        for (i, &l) in self.logits.iter().enumerate() {
            if best.len() == k && l <= best[k - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(k);
        }
        best.into_iter()
            .map(|(i, l)| (i, l - self.log_total))
            .collect()
    }

    /// The entry for `chosen` with its `k` alternatives.
    pub fn entry(&self, vocab: &Vocabulary, chosen: u32, k: usize) -> TokenLogprob {
        let text = |id: u32, logprob: f32| {
            let (bytes, _) = vocab.token(id);
            TokenText {
                token: String::from_utf8_lossy(bytes).into_owned(),
                bytes: bytes.to_vec(),
                logprob,
            }
        };
        TokenLogprob {
            chosen: text(chosen, self.logprob(chosen)),
            top_logprobs: self
                .top(k)
                .into_iter()
                .map(|(id, lp)| text(id, lp))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_the_top_tokens() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NEG_INFINITY];
        let d = Distribution::new(&logits);
        let total: f32 = (0..5).map(|t| d.logprob(t).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        let top = d.top(3);
        assert_eq!(
            top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 2],
            "ties keep the lower id first"
        );
        assert!((top[0].1 - d.logprob(1)).abs() < 1e-7);
        assert!(d.top(0).is_empty());
        assert_eq!(d.top(10).len(), 5);
        assert_eq!(d.logprob(4), f32::NEG_INFINITY);
        assert_eq!(d.logprob(99), f32::NEG_INFINITY);
    }
}
