//! Attention for a prompt chunk on the CPU: every query row of the chunk against the keys and
//! values of its sequence (gathered from the paged store), fused — scores, softmax over the row's
//! causal window, weighted values — one block of query positions at a time, blocks spread over
//! candle's thread pool. Only the columns a block can see are computed (the chunk's upper
//! triangle and, in sliding-window layers, what lies outside the window are skipped), and the
//! scores never exist for the whole chunk at once (for a 512-token chunk at 6,000 positions of
//! context that would be 88 MB per key/value head and layer).

use candle_core::Result;

use crate::attention::SendPtr;
use crate::softmax::softmax_range;

/// Query positions per work item.
const BLOCK: usize = 16;

/// The shapes of one chunk's attention.
#[derive(Debug, Clone, Copy)]
pub struct ChunkDims {
    pub kv_heads: usize,
    /// Sequences in the step.
    pub seqs: usize,
    /// Query positions per sequence (the chunk).
    pub positions: usize,
    /// Query heads per key/value head.
    pub group: usize,
    /// Key/value positions gathered per sequence.
    pub width: usize,
    pub head_dim: usize,
}

/// `q` (kv heads, sequences, positions, group, d), already scaled; `keys` and `values` (kv heads,
/// sequences, width, d); `ranges[s * positions + p]` the columns position `p` of sequence `s`
/// sees. Writes softmax(q·kᵀ)·v into `out`, shaped like `q`.
pub fn chunk_attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    dims: ChunkDims,
    ranges: &[(usize, usize)],
    out: &mut [f32],
) -> Result<()> {
    let ChunkDims {
        kv_heads,
        seqs,
        positions,
        group,
        width,
        head_dim: d,
    } = dims;
    let rows = kv_heads * seqs * positions * group;
    if q.len() != rows * d
        || out.len() != q.len()
        || keys.len() != kv_heads * seqs * width * d
        || values.len() != keys.len()
        || ranges.len() != seqs * positions
        || ranges.iter().any(|&(lo, hi)| lo >= hi || hi > width)
    {
        candle_core::bail!("chunk attention: inconsistent sizes");
    }
    let blocks = positions.div_ceil(BLOCK);
    let units = kv_heads * seqs * blocks;
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    candle_core::utils::barrier_pool().execute_chunked(units, |range| {
        let mut scores: Vec<f32> = Vec::new();
        let mut probs: Vec<f32> = Vec::new();
        for unit in range {
            let (pair, blk) = (unit / blocks, unit % blocks);
            let s = pair % seqs;
            let (p0, p1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(positions));
            let seen = &ranges[s * positions + p0..s * positions + p1];
            let lo = seen.iter().map(|r| r.0).min().unwrap_or(0);
            let hi = seen.iter().map(|r| r.1).max().unwrap_or(0);
            let span = hi - lo;
            let m = (p1 - p0) * group;
            let row0 = (pair * positions + p0) * group;
            let kv = (pair * width + lo) * d;
            // (every value is written below: no need to clear what a previous unit left)
            scores.resize(m * span, 0.0);
            probs.resize(m * span, 0.0);
            // SAFETY: the pointers cover m × d queries, span × d keys and m × span scores, all
            // inside their slices (sizes checked above), with the strides given.
            unsafe {
                product(
                    (m, span, d),
                    scores.as_mut_ptr(),
                    span,
                    q.as_ptr().add(row0 * d),
                    d,
                    keys.as_ptr().add(kv),
                    (1, d),
                );
            }
            for (r, (src, dst)) in scores
                .chunks_exact(span)
                .zip(probs.chunks_exact_mut(span))
                .enumerate()
            {
                let (a, b) = seen[r / group];
                softmax_range(src, (a - lo, b - lo), dst);
            }
            // SAFETY: rows row0 .. row0 + m of `out` belong to this unit alone; `probs` is
            // m × span and the values span × d, inside their slices.
            unsafe {
                product(
                    (m, d, span),
                    dst.0.add(row0 * d),
                    d,
                    probs.as_ptr(),
                    span,
                    values.as_ptr().add(kv),
                    (d, 1),
                );
            }
        }
    });
    Ok(())
}

/// `dst` (m × n, rows `dst_rs` apart) = `lhs` (m × k, rows `lhs_rs` apart) · `rhs`, whose element
/// (i, j) lies at `rhs + i · rhs_rs + j · rhs_cs`; on the calling thread (the caller is one work
/// item of the pool).
///
/// # Safety
/// Every element addressed lies inside its allocation, and `dst` overlaps neither operand.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        1,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}
