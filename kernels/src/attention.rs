//! Decode-step attention over a paged key/value store, on the CPU.
//!
//! Every (sequence, query head) is computed on its own, reading its keys and values straight from
//! the store through the sequence's list of positions, and summing in position order with a fixed
//! 8-lane split: a sequence's result is bit for bit the same whatever else is in the batch (no
//! padding, no batch-dependent matrix shapes), and nothing is gathered or copied first.

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

struct SendPtr(*mut f32);
// SAFETY: every work item writes a disjoint range of the output (see `paged_decode_attention`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// One query position per sequence. `q` is (sequences, heads, d); `seqs[s]` lists the store
/// positions sequence `s` attends to, in order; `out` (same shape as `q`) receives the weighted
/// sums of values. Query head `h` uses kv head `h / (heads / kv_heads)`. Work is split over
/// (sequence, head) pairs on candle's thread pool.
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
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    candle_core::utils::barrier_pool().execute_chunked(units, |range| {
        let mut scores = Vec::new();
        for unit in range {
            let (s, h) = (unit / heads, unit % heads);
            let base = (h / rep) * store.positions * d;
            let qv = &q[unit * d..(unit + 1) * d];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for &p in seqs[s] {
                let k = &store.keys[base + p as usize * d..][..d];
                let sc = dot(qv, k) * scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            // SAFETY: unit `unit` alone writes out[unit*d .. (unit+1)*d], inside `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(unit * d), d) };
            o.fill(0.0);
            for (&p, &w) in seqs[s].iter().zip(&scores) {
                let v = &store.values[base + p as usize * d..][..d];
                let w = w * inv;
                for (o, v) in o.iter_mut().zip(v) {
                    *o += w * v;
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
