//! Softmax over rows of attention scores whose visible columns are one range per row (a causal
//! mask, with a sliding window or padding, without a mask tensor), with an exponential the
//! compiler vectorises. Prompt chunks spend most of their attention time here at long contexts:
//! the scores are (heads × chunk × context), and a libm `exp` per score costs more than the two
//! matrix products around it.

use candle_core::{CpuStorage, Layout, Result, Shape};

/// e^x, within 2e-7 relative for x in [-87, 88] (clamped outside): 2^n · e^r with r in
/// [-ln2/2, ln2/2] and a degree-6 polynomial for e^r. Branch-free, so a loop of it vectorises.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n · LN2_HI is exact (Cody and Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and taking away 1.5 · 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// Writes softmax(`row[lo..hi]`) into `out[lo..hi]` and zeros elsewhere; sums in a fixed order.
pub fn softmax_range(row: &[f32], (lo, hi): (usize, usize), out: &mut [f32]) {
    out.fill(0.0);
    if lo >= hi {
        return;
    }
    let (src, dst) = (&row[lo..hi], &mut out[lo..hi]);
    let max = src.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = exp(s - max);
    }
    let mut acc = [0f32; 8];
    let chunks = dst.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    for (i, v) in rest.iter().enumerate() {
        acc[i] += v;
    }
    let sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

/// Softmax of attention scores shaped (kv heads, sequences, query heads per kv head, positions,
/// width), seen as rows: a row of sequence `s` at query position `p` sees the columns
/// `ranges[s * positions + p]` (its causal window); the other columns come out 0.
pub struct RangeSoftmax {
    /// Per sequence, per query position: visible columns.
    pub ranges: Vec<(usize, usize)>,
    /// Sequences in the batch.
    pub seqs: usize,
    /// Query positions per sequence (the chunk).
    pub positions: usize,
    /// Query heads per kv head: rows per sequence are heads × positions.
    pub heads: usize,
}

impl RangeSoftmax {
    /// The visible columns of row `row` of the flattened scores.
    fn range(&self, row: usize) -> (usize, usize) {
        let per_seq = self.heads * self.positions;
        let s = (row / per_seq) % self.seqs;
        self.ranges[s * self.positions + row % self.positions]
    }
}

struct SendPtr(*mut f32);
// SAFETY: every work item writes disjoint rows of the output.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl candle_core::CustomOp1 for RangeSoftmax {
    fn name(&self) -> &'static str {
        "range-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(all) = storage else {
            candle_core::bail!("range softmax: f32 scores only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("range softmax: scores not contiguous");
        };
        let src = &all[start..end];
        let width = layout.dims().last().copied().unwrap_or(0);
        if width == 0 || self.ranges.len() != self.seqs * self.positions {
            candle_core::bail!("range softmax: inconsistent sizes");
        }
        let rows = src.len() / width;
        if rows % (self.seqs * self.heads * self.positions) != 0
            || self.ranges.iter().any(|&(lo, hi)| lo > hi || hi > width)
        {
            candle_core::bail!("range softmax: ranges do not fit the scores");
        }
        let mut out = vec![0f32; src.len()];
        let dst = SendPtr(out.as_mut_ptr());
        let dst = &dst;
        candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
            for row in range {
                // SAFETY: row `row` alone is written here, inside `out`.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(row * width), width) };
                softmax_range(&src[row * width..][..width], self.range(row), o);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}
