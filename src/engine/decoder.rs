//! Qwen2, Llama (Mistral, TinyLlama, Mixtral-style mixtures of experts, …) and Gemma 3 decoders on candle with moss's quantized
//! kernels (`moss-kernels`): the same computation as candle-transformers' `quantized_qwen2` and
//! `quantized_llama` (dense models), and as llama.cpp's Gemma 3, except that
//! - Q5_0 / Q8_0 weight matrices multiply through moss's SIMD kernels (candle's own stay in use
//!   for the types where they are fast), and
//! - the token embedding stays quantized: only the rows looked up are dequantised (candle-
//!   transformers expands the whole table to f32, ~545 MB for the default model), and
//! - several sequences, each with its own KV cache, advance in one step (`forward_batch`).
//!
//! Qwen2 and Llama differ only in attention biases (Qwen2 has them) and the rotary embedding's
//! layout (Qwen2 rotates halves, GGUF Llama interleaved pairs). Gemma 3 adds: the embedding scaled
//! by √hidden; per-head norms of queries and keys; norms after attention and after the MLP; a
//! GELU (tanh) gate; a head size of its own; and five of every six layers attending only to a
//! sliding window of recent positions, with their own rotary base. (candle-transformers'
//! `quantized_gemma3` differs from the reference there: it gates with SiLU, and its window ignores
//! cached positions; moss follows llama.cpp and Hugging Face.)

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};

use super::kernels;

/// A weight matrix, multiplied through candle's `QMatMul` (moss's kernels where the type has
/// them).
#[derive(Clone)]
struct Weight {
    mm: QMatMul,
    /// Its kernel sums a lone row differently from several (`kernels::batch_sensitive`): in
    /// decoding steps it runs one row at a time (the fast one-row path, and a sequence's token
    /// comes out the same alone and in a batch); prompt chunks take the many-row path.
    row_by_row: bool,
}

impl Weight {
    /// `x` times the matrix; `decoding`: the rows are sequences' next tokens (one each), which
    /// must come out as each would alone.
    fn forward(&self, x: &Tensor, decoding: bool) -> Result<Tensor> {
        if decoding && self.row_by_row {
            kernels::forward_rows(&self.mm, x)
        } else {
            self.mm.forward(x)
        }
    }
}

/// Weight matrices that multiply the same input (a layer's queries, keys and values; an MLP's gate
/// and up projections). Those of one type and width are held as one matrix, their rows one after
/// another: one pass over the thread pool and one rounding of the input instead of one each, and
/// every output element is the same dot product as with the matrices apart.
struct Fused {
    /// Each held matrix with the row counts of the matrices it stands for, in order.
    parts: Vec<(Weight, Vec<usize>)>,
}

impl Fused {
    fn new(ts: Vec<QTensor>) -> Result<Self> {
        let mut groups: Vec<Vec<QTensor>> = Vec::new();
        for t in ts {
            let joins = groups.last().is_some_and(|g| {
                let last = &g[g.len() - 1];
                t.device().is_cpu()
                    && last.dtype() == t.dtype()
                    && last.shape().dims2().ok().map(|d| d.1) == t.shape().dims2().ok().map(|d| d.1)
            });
            match groups.last_mut() {
                Some(g) if joins => g.push(t),
                _ => groups.push(vec![t]),
            }
        }
        let parts = groups
            .into_iter()
            .map(|mut g| {
                let rows: Vec<usize> = g.iter().map(|t| t.shape().dims()[0]).collect();
                if g.len() == 1 {
                    if let Some(one) = g.pop() {
                        return Ok((matmul(one)?, rows));
                    }
                }
                let (dtype, cols, device) = (g[0].dtype(), g[0].shape().dims2()?.1, g[0].device());
                let mut bytes = Vec::new();
                for t in &g {
                    bytes.extend_from_slice(&t.data()?);
                }
                drop(g);
                let joined = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dtype,
                    &bytes,
                    vec![rows.iter().sum(), cols],
                    &device,
                )?;
                Ok((matmul(joined)?, rows))
            })
            .collect::<Result<_>>()?;
        Ok(Self { parts })
    }

    /// Each matrix's product with `x`, in order (see `Weight::forward`).
    fn forward(&self, x: &Tensor, decoding: bool) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for (w, rows) in &self.parts {
            let y = w.forward(x, decoding)?;
            if rows.len() == 1 {
                out.push(y);
                continue;
            }
            let last = y.rank() - 1;
            let mut start = 0;
            for &n in rows {
                out.push(y.narrow(last, start, n)?);
                start += n;
            }
        }
        Ok(out)
    }
}

struct Layer {
    /// Queries, keys, values.
    qkv: Fused,
    wo: Weight,
    /// Attention biases (Qwen2; none in Llama).
    bias: Option<(Tensor, Tensor, Tensor)>,
    attn_norm: Tensor,
    ffn_norm: Tensor,
    ffn: Ffn,
    /// Gemma 3: norms of each query and key head.
    qk_norm: Option<(Tensor, Tensor)>,
    /// Gemma 3: norms of the attention's and the MLP's outputs.
    post_norm: Option<(Tensor, Tensor)>,
    /// Gemma 3: this layer sees the last `Decoder::window` positions only (local rotary table).
    sliding: bool,
}

/// A gated MLP: down(act(gate(x)) · up(x)).
struct Mlp {
    /// Gate, up.
    gate_up: Fused,
    down: Weight,
}

/// A layer's feed-forward part.
enum Ffn {
    Dense(Mlp),
    /// A mixture of experts (Mixtral-style Llama): a router scores every expert for each token;
    /// the `used` best run, their outputs weighted by the router's softmax renormalised over them.
    Experts {
        /// The router's weights, (experts, hidden) row-major, in f32.
        router: Vec<f32>,
        experts: Vec<Mlp>,
        used: usize,
    },
}

/// Cosines and sines of the rotary embedding, one row per position.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(
        base: f32,
        scale: f32,
        head_dim: usize,
        positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let theta: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| scale / base.powf(i as f32 / head_dim as f32))
            .collect();
        let theta = Tensor::new(theta.as_slice(), device)?;
        let angles = Tensor::arange(0, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?
            .matmul(&theta.reshape((1, head_dim / 2))?)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// The rows for `t` new positions of each sequence: (t, d/2) for one, (b, t, d/2) for several.
    fn at(&self, caches: &[&mut SeqCache], t: usize) -> Result<(Tensor, Tensor)> {
        if let [c] = caches {
            return Ok((self.cos.narrow(0, c.len, t)?, self.sin.narrow(0, c.len, t)?));
        }
        let pos: Vec<u32> = caches
            .iter()
            .flat_map(|c| (c.len..c.len + t).map(|p| p as u32))
            .collect();
        let pos = Tensor::new(pos.as_slice(), self.cos.device())?;
        let half = self.cos.dim(1)?;
        let shape = (caches.len(), t, half);
        Ok((
            self.cos.index_select(&pos, 0)?.reshape(shape)?,
            self.sin.index_select(&pos, 0)?.reshape(shape)?,
        ))
    }
}

/// Positions per block of the paged key/value store.
pub const KV_BLOCK: usize = 16;

/// Which blocks of a `KvPool` are in use, and by how many caches (a block of a shared prefix
/// belongs to the prefix cache and to every sequence continuing from it).
struct BlockTable {
    refs: Vec<u32>,
    free: Vec<u32>,
}

type Blocks = std::sync::Arc<std::sync::Mutex<BlockTable>>;

fn lock(b: &Blocks) -> std::sync::MutexGuard<'_, BlockTable> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

/// The keys and values of every sequence a decoder runs, in blocks of `KV_BLOCK` positions (a
/// paged cache): per layer one key and one value tensor of shape
/// (kv heads, blocks × KV_BLOCK, head dim). A batched step writes the new positions of all its
/// sequences with one scatter and reads them back with one gather, so attention runs for the whole
/// batch at once; the memory in use is what the sequences hold, rounded up to a block each.
pub struct KvPool {
    layers: Vec<(Tensor, Tensor)>,
    blocks: Blocks,
    block_bytes: usize,
}

impl KvPool {
    /// Blocks not held by any cache.
    pub fn free_blocks(&self) -> usize {
        lock(&self.blocks).free.len()
    }

    /// Bytes of one block (keys and values of every layer).
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Blocks the caches still need to take `t` more positions each.
    pub fn blocks_needed(caches: &[&mut SeqCache], t: usize) -> usize {
        caches
            .iter()
            .map(|c| {
                (c.len + t)
                    .div_ceil(KV_BLOCK)
                    .saturating_sub(c.blocks.len())
            })
            .sum()
    }

    fn grow(&self, cache: &mut SeqCache, positions: usize) -> Result<()> {
        match &cache.owner {
            Some(o) if !std::sync::Arc::ptr_eq(o, &self.blocks) => {
                candle_core::bail!("a cache used with another key/value store")
            }
            Some(_) => {}
            None => cache.owner = Some(self.blocks.clone()),
        }
        let mut table = lock(&self.blocks);
        while cache.blocks.len() * KV_BLOCK < positions {
            let Some(b) = table.free.pop() else {
                candle_core::bail!("the key/value cache is full");
            };
            table.refs[b as usize] = 1;
            cache.blocks.push(b);
        }
        Ok(())
    }

    /// A cache holding the first `n` positions of `cache`: whole blocks are shared (they are never
    /// written again: a sequence only writes past its own length), a last partial block is copied
    /// so that the new cache can go on writing into it.
    pub fn share(&self, cache: &SeqCache, n: usize) -> Result<SeqCache> {
        if n > cache.len {
            candle_core::bail!("prefix of {n} positions from a cache of {}", cache.len);
        }
        let mut out = SeqCache {
            blocks: Vec::new(),
            len: n,
            owner: Some(self.blocks.clone()),
        };
        {
            let mut table = lock(&self.blocks);
            for &b in &cache.blocks[..n / KV_BLOCK] {
                table.refs[b as usize] += 1;
                out.blocks.push(b);
            }
        }
        if !n.is_multiple_of(KV_BLOCK) {
            let from = cache.blocks[n / KV_BLOCK] as usize * KV_BLOCK;
            self.grow(&mut out, n)?;
            let to = *out.blocks.last().expect("just grown") as usize * KV_BLOCK;
            for (k, v) in &self.layers {
                k.slice_set(&k.narrow(1, from, KV_BLOCK)?.force_contiguous()?, 1, to)?;
                v.slice_set(&v.narrow(1, from, KV_BLOCK)?.force_contiguous()?, 1, to)?;
            }
        }
        Ok(out)
    }
}

/// One sequence's keys and values: the blocks of a `KvPool` it holds, and how many positions are
/// filled (the next token's position). Dropping it gives its blocks back.
#[derive(Default)]
pub struct SeqCache {
    blocks: Vec<u32>,
    len: usize,
    owner: Option<Blocks>,
}

impl SeqCache {
    /// Positions held (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held (some may be shared with other caches).
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Where position `i` lives in the store.
    fn slot(&self, i: usize) -> u32 {
        self.blocks[i / KV_BLOCK] * KV_BLOCK as u32 + (i % KV_BLOCK) as u32
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        if let Some(owner) = &self.owner {
            let mut table = lock(owner);
            for &b in &self.blocks {
                let r = &mut table.refs[b as usize];
                *r = r.saturating_sub(1);
                if *r == 0 {
                    table.free.push(b);
                }
            }
        }
    }
}

/// Where a batched step writes and reads: computed once per step, used by every layer.
struct StepPlan {
    /// Store position of every new token, repeated over (kv heads, head dim) for `scatter_set`.
    write: Tensor,
    read: Read,
}

/// How attention reads the store in this step.
enum Read {
    /// Decoding on the CPU: each sequence's store positions, in order (the new one last), for
    /// moss's paged attention kernel, which reads the store in place.
    InPlace(Vec<Vec<u32>>),
    /// Otherwise one gather of `width` positions per sequence (padded with position 0) and one
    /// batched product.
    Gather {
        index: Tensor,
        width: usize,
        /// Additive mask (1, batch, 1, t, width): 0 where a query may look, -inf elsewhere
        /// (padding and later positions of the same step); none when nothing is hidden.
        mask: Option<Tensor>,
        /// The same for sliding-window layers, when the window hides something more.
        local_mask: Option<Tensor>,
    },
}

pub struct Decoder {
    /// The token embedding, kept quantized: candle's `embedding` dequantises only the rows looked
    /// up (through moss's kernels for Q5_0 / Q8_0).
    embedding: QMatMul,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Weight,
    rope: Rope,
    /// Gemma 3's sliding-window layers: their rotary table and window.
    local_rope: Option<Rope>,
    window: usize,
    /// Gemma 3: the embedding is scaled by √hidden, the MLP gate is GELU (else SiLU).
    embed_scale: Option<f64>,
    gelu: bool,
    /// Queries are multiplied by this before attention (1/√head size).
    attn_scale: f64,
    /// Final logits squashed to ±this with tanh (some Gemma conversions).
    softcap: Option<f64>,
    hidden: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    eps: f32,
    /// GGUF Llama rotates interleaved pairs (`rope_i`); Qwen2 rotates halves (`rope`).
    interleaved: bool,
    device: Device,
    pub context_length: usize,
    /// The sequence of the one-at-a-time interface (`forward`), and its store (made on first use).
    own: SeqCache,
    own_pool: Option<KvPool>,
}

/// A pair of Gemma 3's norm weights (none in the other architectures).
fn gemma_norms(
    gemma: bool,
    t: &mut impl FnMut(&str) -> Result<QTensor>,
    [a, b]: [&str; 2],
    device: &Device,
) -> Result<Option<(Tensor, Tensor)>> {
    if !gemma {
        return Ok(None);
    }
    Ok(Some((
        t(&format!("{a}.weight"))?.dequantize(device)?,
        t(&format!("{b}.weight"))?.dequantize(device)?,
    )))
}

fn matmul(t: QTensor) -> Result<Weight> {
    let row_by_row = t.device().is_cpu() && kernels::batch_sensitive(t.dtype());
    Ok(Weight {
        mm: QMatMul::from_qtensor(kernels::accelerate(t)?)?,
        row_by_row,
    })
}

/// The `used` experts a token goes to, best first (ties: the lower index), and their weights: the
/// router's softmax over all experts, renormalised over the chosen ones. Computed row by row in a
/// fixed order, so a token is routed the same whatever else is in the batch.
fn route(router: &[f32], x: &[f32], used: usize) -> (Vec<usize>, Vec<f32>) {
    let logits: Vec<f32> = router
        .chunks_exact(x.len())
        .map(|w| kernels::attention::dot(w, x))
        .collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]));
    order.truncate(used);
    // softmax(l)[e] / Σ_chosen softmax(l) = exp(l_e - max) / Σ_chosen exp(l_c - max).
    let max = logits[order[0]];
    let p: Vec<f32> = order.iter().map(|&e| (logits[e] - max).exp()).collect();
    let sum: f32 = p.iter().sum();
    (order, p.into_iter().map(|v| v / sum).collect())
}

/// A layer's `n` experts: one tensor per expert and matrix (`ffn_gate.{j}`), or one 3-D tensor
/// per matrix holding all of them (`ffn_gate_exps`), split here into the experts' own matrices.
fn experts(t: &mut impl FnMut(&str) -> Result<QTensor>, n: usize) -> Result<Vec<Mlp>> {
    let mut split = |name: &str| -> Result<Vec<QTensor>> {
        if let Ok(all) = t(&format!("ffn_{name}_exps.weight")) {
            let (count, rows, cols) = all.shape().dims3()?;
            if count != n {
                candle_core::bail!("ffn_{name}_exps holds {count} experts, not {n}");
            }
            let data = all.data()?;
            let per = data.len() / n;
            let device = all.device();
            return (0..n)
                .map(|j| {
                    candle_core::quantized::ggml_file::qtensor_from_ggml(
                        all.dtype(),
                        &data[j * per..(j + 1) * per],
                        vec![rows, cols],
                        &device,
                    )
                })
                .collect();
        }
        (0..n)
            .map(|j| t(&format!("ffn_{name}.{j}.weight")))
            .collect()
    };
    let (gate, up, down) = (split("gate")?, split("up")?, split("down")?);
    gate.into_iter()
        .zip(up)
        .zip(down)
        .map(|((gate, up), down)| {
            Ok(Mlp {
                gate_up: Fused::new(vec![gate, up])?,
                down: matmul(down)?,
            })
        })
        .collect()
}

impl Decoder {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let arch = match ct.metadata.get("general.architecture") {
            Some(v) => v.to_string()?.clone(),
            None => candle_core::bail!("cannot find general.architecture in metadata"),
        };
        if !matches!(arch.as_str(), "qwen2" | "llama" | "gemma3") {
            candle_core::bail!("moss's decoder runs qwen2, llama and gemma3, not {arch}");
        }
        let gemma = arch == "gemma3";
        let md = |k: &str| match ct.metadata.get(&format!("{arch}.{k}")) {
            Some(v) => Ok(v),
            None => candle_core::bail!("cannot find {arch}.{k} in metadata"),
        };
        let n_head = md("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("attention.head_count_kv")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let context_length = md("context_length")
            .and_then(|v| v.to_u32())
            .unwrap_or(4096) as usize;
        let blocks = md("block_count")?.to_u32()? as usize;
        let eps = md("attention.layer_norm_rms_epsilon")?.to_f32()?;
        let base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10000.0);
        if n_head == 0 || n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            candle_core::bail!("inconsistent attention sizes");
        }
        // Gemma 3's head size is its own; the others divide the hidden size.
        let head_dim = match md("attention.key_length") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) if hidden.is_multiple_of(n_head) => hidden / n_head,
            Err(_) => candle_core::bail!("inconsistent attention sizes"),
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            candle_core::bail!("inconsistent attention sizes");
        }
        if md("rope.dimension_count").is_ok_and(|v| v.to_u32().ok() != Some(head_dim as u32)) {
            candle_core::bail!("partial rotary embeddings are not supported");
        }
        let n_expert = md("expert_count").and_then(|v| v.to_u32()).unwrap_or(0) as usize;
        let n_expert_used = md("expert_used_count")
            .and_then(|v| v.to_u32())
            .unwrap_or(0) as usize;
        if n_expert > 1 && (arch != "llama" || n_expert_used == 0 || n_expert_used > n_expert) {
            candle_core::bail!(
                "{arch} with {n_expert} experts, {n_expert_used} used per token, is not supported"
            );
        }
        let mut get = |name: &str| ct.tensor(reader, name, device);
        let embedding = matmul(get("token_embd.weight")?)?;
        let output = match get("output.weight") {
            Ok(t) => matmul(t)?,
            Err(_) => embedding.clone(), // tied embeddings: the same blocks, held once
        };
        let embedding = embedding.mm;
        let norm = get("output_norm.weight")?.dequantize(device)?;
        // Gemma 3: every sixth layer (by default) attends globally, the others to a window; the
        // pattern may also be given layer by layer (llama.cpp's keys, then candle's).
        let pattern = md("attention.sliding_window_pattern")
            .or_else(|_| md("attention.sliding_window_type"))
            .ok();
        let sliding = |i: usize| -> bool {
            match pattern {
                Some(gguf_file::Value::Array(layers)) => layers
                    .get(i)
                    .and_then(|v| v.to_bool().ok())
                    .unwrap_or(false),
                Some(v) => {
                    let n = v.to_u32().unwrap_or(6) as usize;
                    n == 0 || i % n < n - 1
                }
                None => i % 6 < 5,
            }
        };
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut t = |n: &str| get(&format!("blk.{i}.{n}"));
            layers.push(Layer {
                qkv: Fused::new(vec![
                    t("attn_q.weight")?,
                    t("attn_k.weight")?,
                    t("attn_v.weight")?,
                ])?,
                wo: matmul(t("attn_output.weight")?)?,
                bias: match t("attn_q.bias") {
                    Ok(bq) => Some((
                        bq.dequantize(device)?,
                        t("attn_k.bias")?.dequantize(device)?,
                        t("attn_v.bias")?.dequantize(device)?,
                    )),
                    Err(_) if arch != "qwen2" => None,
                    Err(e) => return Err(e),
                },
                attn_norm: t("attn_norm.weight")?.dequantize(device)?,
                ffn_norm: t("ffn_norm.weight")?.dequantize(device)?,
                ffn: if n_expert > 1 {
                    Ffn::Experts {
                        router: t("ffn_gate_inp.weight")?
                            .dequantize(&Device::Cpu)?
                            .flatten_all()?
                            .to_vec1()?,
                        experts: experts(&mut t, n_expert)?,
                        used: n_expert_used,
                    }
                } else {
                    Ffn::Dense(Mlp {
                        gate_up: Fused::new(vec![t("ffn_gate.weight")?, t("ffn_up.weight")?])?,
                        down: matmul(t("ffn_down.weight")?)?,
                    })
                },
                qk_norm: gemma_norms(gemma, &mut t, ["attn_q_norm", "attn_k_norm"], device)?,
                post_norm: gemma_norms(
                    gemma,
                    &mut t,
                    ["post_attention_norm", "post_ffw_norm"],
                    device,
                )?,
                sliding: gemma && sliding(i),
            });
        }
        // Gemma 3's global layers may stretch positions (linear rope scaling); local ones do not.
        let scale = match md("rope.scaling.factor").and_then(|v| v.to_f32()) {
            Ok(f) if gemma && f > 0.0 => 1.0 / f,
            _ => 1.0,
        };
        let rope = Rope::new(base, scale, head_dim, context_length, device)?;
        let (local_rope, window) = if gemma {
            let local = md("rope.freq_base_swa")
                .or_else(|_| md("rope.local_freq_base"))
                .and_then(|v| v.to_f32())
                .unwrap_or(10_000.0);
            let window = md("attention.sliding_window")?.to_u32()? as usize;
            (
                Some(Rope::new(local, 1.0, head_dim, context_length, device)?),
                window.max(1),
            )
        } else {
            (None, usize::MAX)
        };
        Ok(Self {
            embedding,
            layers,
            norm,
            output,
            rope,
            local_rope,
            window,
            embed_scale: gemma.then(|| (hidden as f64).sqrt()),
            // Gemma 3 27B scales queries by its hidden size per head (llama.cpp, gemma_pytorch).
            attn_scale: if gemma && blocks == 62 {
                1.0 / ((hidden / n_head) as f64).sqrt()
            } else {
                1.0 / (head_dim as f64).sqrt()
            },
            softcap: md("final_logit_softcapping")
                .and_then(|v| v.to_f32())
                .ok()
                .filter(|c| *c > 0.0)
                .map(f64::from),
            gelu: gemma,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            eps,
            interleaved: arch == "llama",
            device: device.clone(),
            context_length,
            own: SeqCache::default(),
            own_pool: None,
        })
    }

    pub fn clear_kv_cache(&mut self) {
        self.own = SeqCache::default();
    }

    /// Bytes of key/value cache one position takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers.len() * 2 * self.n_kv_head * self.head_dim * 4
    }

    /// A key/value store of about `bytes` (at least one block). Its memory is zeroed lazily by the
    /// operating system: only blocks that have been used take room.
    pub fn kv_pool(&self, bytes: usize) -> Result<KvPool> {
        let block_bytes = self.kv_bytes_per_token() * KV_BLOCK;
        let n = (bytes / block_bytes).max(1);
        let shape = (self.n_kv_head, n * KV_BLOCK, self.head_dim);
        let layers = (0..self.layers.len())
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, DType::F32, &self.device)?,
                    Tensor::zeros(shape, DType::F32, &self.device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(KvPool {
            layers,
            blocks: std::sync::Arc::new(std::sync::Mutex::new(BlockTable {
                refs: vec![0; n],
                // Handed out lowest first, so a lightly used store touches little memory.
                free: (0..n as u32).rev().collect(),
            })),
            block_bytes,
        })
    }

    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let x = self
            .embedding
            .embedding(&Tensor::new(tokens, &self.device)?)?
            .to_dtype(DType::F32)?;
        match self.embed_scale {
            Some(s) => x * s,
            None => Ok(x),
        }
    }

    /// Runs `tokens` at positions `pos..` of the one sequence held; returns the last token's
    /// logits, shape (1, vocab).
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor> {
        if pos == 0 {
            self.own = SeqCache::default();
        }
        if pos != self.own.len {
            candle_core::bail!("position {pos} does not follow the {} held", self.own.len);
        }
        if self.own_pool.is_none() {
            let bytes =
                self.context_length.div_ceil(KV_BLOCK) * KV_BLOCK * self.kv_bytes_per_token();
            self.own_pool = Some(self.kv_pool(bytes)?);
        }
        let mut own = std::mem::take(&mut self.own);
        let pool = self.own_pool.as_ref().expect("made above");
        let out = self.forward_batch(pool, &mut [&mut own], tokens);
        // A failed step may have appended to some layers only: start over rather than go on.
        self.own = if out.is_ok() {
            own
        } else {
            SeqCache::default()
        };
        out
    }

    /// One step for several sequences at once: `tokens` holds the same number `t` of new tokens
    /// for each sequence (one each when decoding), each continuing at its own position. Every
    /// matrix is read once for the whole batch, and attention too runs for the whole batch: the new
    /// keys and values go into `pool` with one scatter, and each sequence's are gathered back,
    /// padded to the longest, with one gather per layer. Returns each sequence's last logits,
    /// shape (batch, vocab).
    pub fn forward_batch(
        &self,
        pool: &KvPool,
        caches: &mut [&mut SeqCache],
        tokens: &[u32],
    ) -> Result<Tensor> {
        let b = caches.len();
        if b == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(b) {
            candle_core::bail!("{} tokens for {b} sequences", tokens.len());
        }
        let t = tokens.len() / b;
        for c in caches.iter() {
            if c.len + t > self.context_length {
                candle_core::bail!("position {} is past the context", c.len + t);
            }
        }
        if pool.layers.len() != self.layers.len() {
            candle_core::bail!("a key/value store made for another model");
        }
        for c in caches.iter_mut() {
            pool.grow(c, c.len + t)?;
        }
        let plan = self.plan(caches, t)?;
        let global = self.rope.at(caches, t)?;
        let local = match &self.local_rope {
            Some(r) => Some(r.at(caches, t)?),
            None => None,
        };
        // Each sequence's next token: rows that must come out as they would alone.
        let decoding = t == 1;
        let mut x = self.embed(tokens)?.reshape((b, t, self.hidden))?;
        for (layer, store) in self.layers.iter().zip(&pool.layers) {
            let rope = match (&local, layer.sliding) {
                (Some(local), true) => local,
                _ => &global,
            };
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.eps)?;
            let mut a = self.attention(layer, store, &plan, &h, rope)?;
            if let Some((after, _)) = &layer.post_norm {
                a = candle_nn::ops::rms_norm(&a, after, self.eps)?;
            }
            let x1 = (x + a)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, self.eps)?;
            let mut m = match &layer.ffn {
                Ffn::Dense(mlp) => self.mlp(mlp, &h, decoding)?,
                Ffn::Experts {
                    router,
                    experts,
                    used,
                } => self.experts(router, experts, *used, &h, decoding)?,
            };
            if let Some((_, after)) = &layer.post_norm {
                m = candle_nn::ops::rms_norm(&m, after, self.eps)?;
            }
            x = (x1 + m)?;
        }
        for c in caches.iter_mut() {
            c.len += t;
        }
        // Only each sequence's last position is needed.
        let x = x.i((.., t - 1, ..))?.contiguous()?;
        let logits = self.output.forward(
            &candle_nn::ops::rms_norm(&x, &self.norm, self.eps)?,
            decoding,
        )?;
        match self.softcap {
            Some(c) => (logits / c)?.tanh()? * c,
            None => Ok(logits),
        }
    }

    /// Where this step's keys and values go and come from (the caches already hold the blocks).
    fn plan(&self, caches: &[&mut SeqCache], t: usize) -> Result<StepPlan> {
        let b = caches.len();
        let write: Vec<u32> = caches
            .iter()
            .flat_map(|c| (c.len..c.len + t).map(|p| c.slot(p)))
            .collect();
        let write = Tensor::new(write.as_slice(), &self.device)?
            .reshape((1, b * t, 1))?
            .broadcast_as((self.n_kv_head, b * t, self.head_dim))?
            .contiguous()?;
        if t == 1 && self.device.is_cpu() {
            let slots = caches
                .iter()
                .map(|c| (0..=c.len).map(|p| c.slot(p)).collect())
                .collect();
            return Ok(StepPlan {
                write,
                read: Read::InPlace(slots),
            });
        }
        let width = caches.iter().map(|c| c.len + t).max().unwrap_or(t);
        let index: Vec<u32> = caches
            .iter()
            .flat_map(|c| (0..width).map(|p| if p < c.len + t { c.slot(p) } else { 0 }))
            .collect();
        let index = Tensor::new(index.as_slice(), &self.device)?;
        // Query i of a sequence at length `len` sees positions 0..=len+i, and in a sliding-window
        // layer only the last `window` of those: len+i-window < j.
        let mask = |window: usize| -> Result<Tensor> {
            let m: Vec<f32> = caches
                .iter()
                .flat_map(|c| {
                    (0..t).flat_map(move |i| {
                        (0..width).map(move |j| {
                            let q = c.len + i;
                            if j <= q && q - j < window {
                                0.0
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                    })
                })
                .collect();
            Tensor::from_vec(m, (1, b, 1, t, width), &self.device)
        };
        let hidden = caches.iter().any(|c| c.len + t < width) || t > 1;
        let local = self.local_rope.is_some() && width > self.window;
        Ok(StepPlan {
            write,
            read: Read::Gather {
                index,
                width,
                mask: hidden.then(|| mask(usize::MAX)).transpose()?,
                local_mask: local.then(|| mask(self.window)).transpose()?,
            },
        })
    }
}

impl Decoder {
    fn mlp(&self, mlp: &Mlp, x: &Tensor, decoding: bool) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = mlp
            .gate_up
            .forward(x, decoding)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("an MLP without gate and up".into()))?;
        let g = if self.gelu {
            gate.gelu()?
        } else {
            candle_nn::ops::silu(&gate)?
        };
        mlp.down.forward(&(g * up)?, decoding)
    }

    /// The mixture of experts for every token of the batch at once: each expert runs once per
    /// step, on the rows (of any sequences) routed to it, so its weights are read once for all of
    /// them. A row's result depends on that row alone (its experts' outputs are added in expert
    /// order), so batching cannot change it.
    fn experts(
        &self,
        router: &[f32],
        experts: &[Mlp],
        used: usize,
        x: &Tensor,
        decoding: bool,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let hidden = dims[dims.len() - 1];
        let xs = x.reshape(((), hidden))?;
        let mut rows = vec![Vec::<u32>::new(); experts.len()];
        let mut weights = vec![Vec::<f32>::new(); experts.len()];
        for (r, x) in xs
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?
            .iter()
            .enumerate()
        {
            let (chosen, w) = route(router, x, used);
            for (e, w) in chosen.into_iter().zip(w) {
                rows[e].push(r as u32);
                weights[e].push(w);
            }
        }
        let mut ys = xs.zeros_like()?;
        for (e, mlp) in experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(rows[e].as_slice(), x.device())?;
            let w = Tensor::new(weights[e].as_slice(), x.device())?.reshape(((), 1))?;
            let y = self.mlp(mlp, &xs.index_select(&idx, 0)?, decoding)?;
            ys = ys.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        ys.reshape(dims)
    }

    /// One layer's attention for the whole batch. Grouped queries are not expanded: the query heads
    /// sharing a key/value head become rows of one matrix product with it.
    fn attention(
        &self,
        l: &Layer,
        (ks, vs): &(Tensor, Tensor),
        plan: &StepPlan,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (n_head, n_kv_head, head_dim) = (self.n_head, self.n_kv_head, self.head_dim);
        let rep = n_head / n_kv_head;
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let decoding = t == 1;
        let [mut q, mut k, mut v]: [Tensor; 3] =
            l.qkv.forward(x, decoding)?.try_into().map_err(|_| {
                candle_core::Error::Msg("attention without queries, keys, values".into())
            })?;
        if let Some((bq, bk, bv)) = &l.bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        let rope = if self.interleaved {
            candle_nn::rotary_emb::rope_i
        } else {
            candle_nn::rotary_emb::rope
        };
        let (mut q, mut k) = (heads(q, n_head)?, heads(k, n_kv_head)?);
        if let Some((qn, kn)) = &l.qk_norm {
            q = candle_nn::ops::rms_norm(&q, qn, self.eps)?;
            k = candle_nn::ops::rms_norm(&k, kn, self.eps)?;
        }
        // (b, heads, t, d), rotated.
        let q = rope(&q, cos, sin)?;
        let k = rope(&k, cos, sin)?;
        // New keys and values into the store: (kv heads, b·t, d), one scatter each.
        let k = k
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n_kv_head, b * t, head_dim))?;
        let v = v
            .reshape((b * t, n_kv_head, head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        ks.scatter_set(&plan.write, &k, 1)?;
        vs.scatter_set(&plan.write, &v, 1)?;
        let (index, w, mask) = match &plan.read {
            Read::Gather {
                index,
                width,
                mask,
                local_mask,
            } => {
                let mask = match l.sliding {
                    true => local_mask.as_ref().or(mask.as_ref()),
                    false => mask.as_ref(),
                };
                (index, *width, mask)
            }
            Read::InPlace(slots) => {
                // Decoding on the CPU: moss's kernel reads each sequence's positions in place.
                let window = if l.sliding { self.window } else { usize::MAX };
                return self.attend_in_place(l, (ks, vs), slots, window, &q);
            }
        };
        // Every sequence's keys and values, padded to the same width: (kv heads, b, width, d).
        let keys = ks
            .index_select(index, 1)?
            .reshape((n_kv_head, b, w, head_dim))?;
        let values = vs
            .index_select(index, 1)?
            .reshape((n_kv_head, b, w, head_dim))?;
        // Queries grouped by their key/value head: (kv heads, b, rep·t, d).
        let q = (q
            .reshape((b, n_kv_head, rep * t, head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            * self.attn_scale)?;
        let att = q.matmul(&keys.t()?)?;
        let att = match mask {
            None => att,
            Some(m) => att
                .reshape((n_kv_head, b, rep, t, w))?
                .broadcast_add(m)?
                .reshape((n_kv_head, b, rep * t, w))?,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&values)?; // (kv heads, b, rep·t, d)
        let y = y
            .transpose(0, 1)?
            .contiguous()?
            .reshape((b, n_head, t, head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, n_head * head_dim))?;
        l.wo.forward(&y, decoding)
    }

    /// Decode attention through moss's kernel, reading the store in place; `q` is
    /// (b, heads, 1, d), rotated.
    fn attend_in_place(
        &self,
        l: &Layer,
        (ks, vs): (&Tensor, &Tensor),
        slots: &[Vec<u32>],
        window: usize,
        q: &Tensor,
    ) -> Result<Tensor> {
        let seqs: Vec<&[u32]> = slots
            .iter()
            .map(|s| &s[s.len().saturating_sub(window)..])
            .collect();
        let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; q.len()];
        {
            let (kst, kl) = ks.storage_and_layout();
            let (vst, vl) = vs.storage_and_layout();
            let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*kst, &*vst)
            else {
                candle_core::bail!("the key/value store is not on the CPU");
            };
            if !kl.is_contiguous() || !vl.is_contiguous() {
                candle_core::bail!("the key/value store is not contiguous");
            }
            let store = kernels::attention::Store {
                keys: &kc.as_slice::<f32>()?[kl.start_offset()..],
                values: &vc.as_slice::<f32>()?[vl.start_offset()..],
                positions: ks.dims()[1],
                kv_heads: self.n_kv_head,
                head_dim: self.head_dim,
            };
            kernels::attention::paged_decode_attention(
                &q,
                store,
                self.n_head,
                self.attn_scale as f32,
                &seqs,
                &mut out,
            )?;
        }
        let y = Tensor::from_vec(
            out,
            (slots.len(), 1, self.n_head * self.head_dim),
            &self.device,
        )?;
        l.wo.forward(&y, true)
    }
}
