//! Picks the next token from logits: repetition penalty, then greedy or temperature / top-k /
//! top-p sampling with a seeded generator (candle-transformers' `LogitsProcessor`).

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// How to sample. `temperature <= 0` means greedy (argmax) and is fully deterministic.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: f32,
    /// How many of the latest tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: Some(0.9),
            top_k: Some(40),
            repetition_penalty: 1.1,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            repetition_penalty: 1.0,
            repeat_last_n: 0,
            seed: Some(0),
        }
    }
}

/// A sampler for one sequence.
pub struct Sampler {
    processor: LogitsProcessor,
    penalty: f32,
    last_n: usize,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let sampling = if p.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            let temperature = p.temperature;
            match (
                p.top_k.filter(|k| *k > 0),
                p.top_p.filter(|v| *v > 0.0 && *v < 1.0),
            ) {
                (None, None) => Sampling::All { temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            }
        };
        let seed = p.seed.unwrap_or_else(rand_seed);
        Self {
            processor: LogitsProcessor::from_sampling(seed, sampling),
            penalty: p.repetition_penalty,
            last_n: p.repeat_last_n,
        }
    }

    /// Samples the next token given the 1-D `logits` and every token of the sequence so far.
    pub fn sample(&mut self, logits: &Tensor, context: &[u32]) -> candle_core::Result<u32> {
        if self.penalty != 1.0 && self.last_n > 0 && !context.is_empty() {
            let start = context.len().saturating_sub(self.last_n);
            let logits = candle_transformers::utils::apply_repeat_penalty(
                logits,
                self.penalty,
                &context[start..],
            )?;
            return self.processor.sample(&logits);
        }
        self.processor.sample(logits)
    }
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
