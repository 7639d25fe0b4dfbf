//! Decode-step attention over a paged key/value store, on the CPU.
//!
//! Every (sequence, query head) is computed on its own, reading its keys and values straight from
//! the store through the sequence's list of positions, and summing in position order with a fixed
//! 8-lane split: a sequence's result is bit for bit the same whatever else is in the batch (no
//! padding, no batch-dependent matrix shapes), and nothing is gathered or copied first. The query
//! heads that share a kv head are computed together, so each key and value is read once for all of
//! them; that changes no head's order of summation.

/// Where the store is and how it is laid out: keys and values of shape (kv heads, positions, d),
/// row-major.
#[derive(Clone, Copy)]
pub struct Store<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    /// Positions per kv head in the store.
    pub positions: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The output of a product split over the thread pool, shared by its work items.
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the kernels that use it give every work item a disjoint range of the output
// (`paged_decode_attention`, `prefill::chunk_attention`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// One query position per sequence. `q` is (sequences, heads, d); `seqs[s]` lists the store
/// positions sequence `s` attends to, in order; `out` (same shape as `q`) receives the weighted
/// sums of values. Query head `h` uses kv head `h / (heads / kv_heads)`. Work is split over
/// (sequence, kv head, group of its query heads) on candle's thread pool.
pub fn paged_decode_attention(
    q: &[f32],
    store: Store<'_>,
    heads: usize,
    scale: f32,
    seqs: &[&[u32]],
    out: &mut [f32],
) -> candle_core::Result<()> {
    let d = store.head_dim;
    let units = seqs.len() * heads;
    let kv_size = store.kv_heads * store.positions * d;
    if heads == 0
        || store.kv_heads == 0
        || !heads.is_multiple_of(store.kv_heads)
        || q.len() != units * d
        || out.len() != units * d
        || store.keys.len() < kv_size
        || store.values.len() < kv_size
    {
        candle_core::bail!("paged attention: inconsistent sizes");
    }
    if let Some(p) = seqs
        .iter()
        .flat_map(|s| s.iter())
        .find(|&&p| p as usize >= store.positions)
    {
        candle_core::bail!("paged attention: position {p} is outside the store");
    }
    if seqs.iter().any(|s| s.is_empty()) {
        candle_core::bail!("paged attention: a sequence with nothing to attend to");
    }
    let rep = heads / store.kv_heads;
    // Work items: (sequence, kv head, group of the query heads sharing it). A group reads each of
    // its keys and values once for all its heads (grouped-query attention: the default model has
    // seven query heads per kv head); groups are split finer only to give every thread work.
    let threads = candle_core::utils::get_num_threads().max(1);
    let pairs = seqs.len() * store.kv_heads;
    let groups = (threads.div_ceil(pairs)).clamp(1, rep);
    let per_group = rep.div_ceil(groups);
    let units = pairs * groups;
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    candle_core::utils::barrier_pool().execute_chunked(units, |range| {
        let mut scores: Vec<f32> = Vec::new();
        let mut inv = vec![0f32; per_group];
        for unit in range {
            let (pair, g) = (unit / groups, unit % groups);
            let (s, kvh) = (pair / store.kv_heads, pair % store.kv_heads);
            let first = kvh * rep + g * per_group;
            let last = (kvh * rep + rep).min(first + per_group);
            if first >= last {
                continue;
            }
            let hs = last - first;
            let n = seqs[s].len();
            let base = kvh * store.positions * d;
            // Scores: head-major, `n` positions per head.
            scores.clear();
            scores.resize(hs * n, 0.0);
            for (i, &p) in seqs[s].iter().enumerate() {
                let k = &store.keys[base + p as usize * d..][..d];
                for j in 0..hs {
                    let unit_q = (s * heads + first + j) * d;
                    scores[j * n + i] = dot(&q[unit_q..unit_q + d], k) * scale;
                }
            }
            // libm's exponential and a running sum in position order: a decoding step's
            // attention, and with it every perplexity and greedy answer measured token by token,
            // stays what it was when these were held to llama.cpp (a sum's last bit moves a
            // short perplexity estimate by up to a percent through the 8-bit rounding that
            // follows).
            for (j, row) in scores.chunks_exact_mut(n).enumerate() {
                let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut sum = 0f32;
                for v in row.iter_mut() {
                    *v = (*v - m).exp();
                    sum += *v;
                }
                inv[j] = 1.0 / sum;
            }
            // SAFETY: this unit alone writes the rows of heads first..last of sequence `s`,
            // contiguous in `out` and inside it (checked sizes above).
            let o = unsafe {
                std::slice::from_raw_parts_mut(dst.0.add((s * heads + first) * d), hs * d)
            };
            o.fill(0.0);
            for (i, &p) in seqs[s].iter().enumerate() {
                let v = &store.values[base + p as usize * d..][..d];
                for j in 0..hs {
                    let w = scores[j * n + i] * inv[j];
                    for (o, v) in o[j * d..(j + 1) * d].iter_mut().zip(v) {
                        *o += w * v;
                    }
                }
            }
        }
    });
    Ok(())
}

/// A dot product in a fixed order: eight running sums (which the compiler keeps in one SIMD
/// register), then the remainder, then the eight added pairwise. The same inputs always give the
/// same bits, whatever else is computed alongside (the decoder's expert router uses it too).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for i in chunks * 8..a.len() {
        acc[i % 8] += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}
