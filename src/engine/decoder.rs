//! Qwen2 and Llama (Mistral, TinyLlama, …) decoders on candle with moss's quantized kernels
//! (`moss-kernels`): the same computation as candle-transformers' `quantized_qwen2` and
//! `quantized_llama` (dense models), except that
//! - Q5_0 / Q8_0 weight matrices multiply through moss's SIMD kernels (candle's own stay in use
//!   for the types where they are fast), and
//! - the token embedding stays quantized: only the rows looked up are dequantised (candle-
//!   transformers expands the whole table to f32, ~545 MB for the default model), and
//! - several sequences, each with its own KV cache, advance in one step (`forward_batch`).
//!
//! The two architectures differ only in attention biases (Qwen2 has them) and the rotary
//! embedding's layout (Qwen2 rotates halves, GGUF Llama interleaved pairs).

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};

use super::kernels;

struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    /// Attention biases (Qwen2; none in Llama).
    bias: Option<(Tensor, Tensor, Tensor)>,
    attn_norm: Tensor,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// One sequence's keys and values for every layer, and how many positions they hold.
#[derive(Clone, Default)]
pub struct SeqCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl SeqCache {
    /// Positions held (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `n` positions only (a shared prefix another sequence can continue from).
    pub fn prefix(&self, n: usize) -> Result<SeqCache> {
        if n > self.len {
            candle_core::bail!("prefix of {n} positions from a cache of {}", self.len);
        }
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) if n > 0 => Ok(Some((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?))),
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(SeqCache { layers, len: n })
    }

    /// Bytes of key and value storage.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum()
    }
}

pub struct Decoder {
    /// The token embedding, kept quantized: candle's `embedding` dequantises only the rows looked
    /// up (through moss's kernels for Q5_0 / Q8_0).
    embedding: QMatMul,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    hidden: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    eps: f32,
    /// GGUF Llama rotates interleaved pairs (`rope_i`); Qwen2 rotates halves (`rope`).
    interleaved: bool,
    device: Device,
    pub context_length: usize,
    /// The sequence of the one-at-a-time interface (`forward`).
    own: SeqCache,
}

fn matmul(t: QTensor) -> Result<QMatMul> {
    QMatMul::from_qtensor(kernels::accelerate(t)?)
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
        if arch != "qwen2" && arch != "llama" {
            candle_core::bail!("moss's decoder runs qwen2 and llama, not {arch}");
        }
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
        if n_head == 0
            || n_kv_head == 0
            || !hidden.is_multiple_of(n_head)
            || !n_head.is_multiple_of(n_kv_head)
        {
            candle_core::bail!("inconsistent attention sizes");
        }
        let head_dim = hidden / n_head;
        if md("rope.dimension_count").is_ok_and(|v| v.to_u32().ok() != Some(head_dim as u32)) {
            candle_core::bail!("partial rotary embeddings are not supported");
        }
        if md("expert_count").is_ok_and(|v| v.to_u32().unwrap_or(0) > 1) {
            candle_core::bail!("mixture-of-experts models are not supported");
        }
        let mut get = |name: &str| ct.tensor(reader, name, device);
        let embedding = matmul(get("token_embd.weight")?)?;
        let output = match get("output.weight") {
            Ok(t) => matmul(t)?,
            Err(_) => embedding.clone(), // tied embeddings: the same blocks, held once
        };
        let norm = get("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut t = |n: &str| get(&format!("blk.{i}.{n}"));
            layers.push(Layer {
                wq: matmul(t("attn_q.weight")?)?,
                wk: matmul(t("attn_k.weight")?)?,
                wv: matmul(t("attn_v.weight")?)?,
                wo: matmul(t("attn_output.weight")?)?,
                bias: match t("attn_q.bias") {
                    Ok(bq) => Some((
                        bq.dequantize(device)?,
                        t("attn_k.bias")?.dequantize(device)?,
                        t("attn_v.bias")?.dequantize(device)?,
                    )),
                    Err(_) if arch == "llama" => None,
                    Err(e) => return Err(e),
                },
                attn_norm: t("attn_norm.weight")?.dequantize(device)?,
                ffn_norm: t("ffn_norm.weight")?.dequantize(device)?,
                gate: matmul(t("ffn_gate.weight")?)?,
                up: matmul(t("ffn_up.weight")?)?,
                down: matmul(t("ffn_down.weight")?)?,
            });
        }
        let theta: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
            .collect();
        let theta = Tensor::new(theta.as_slice(), device)?;
        let angles = Tensor::arange(0, context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((context_length, 1))?
            .matmul(&theta.reshape((1, head_dim / 2))?)?;
        Ok(Self {
            embedding,
            layers,
            norm,
            output,
            cos: angles.cos()?,
            sin: angles.sin()?,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            eps,
            interleaved: arch == "llama",
            device: device.clone(),
            context_length,
            own: SeqCache::default(),
        })
    }

    pub fn clear_kv_cache(&mut self) {
        self.own = SeqCache::default();
    }

    /// Bytes of key/value cache one position takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers.len() * 2 * self.n_kv_head * self.head_dim * 4
    }

    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        self.embedding
            .embedding(&Tensor::new(tokens, &self.device)?)?
            .to_dtype(DType::F32)
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
        let mut own = std::mem::take(&mut self.own);
        let out = self.forward_batch(&mut [&mut own], tokens);
        // A failed step may have appended to some layers only: start over rather than go on.
        self.own = if out.is_ok() {
            own
        } else {
            SeqCache::default()
        };
        out
    }

    /// One step for several sequences at once: `tokens` holds the same number of new tokens for
    /// each (one each when decoding; any number for a single sequence), each continuing at its
    /// own position. Every matrix is read once for the whole batch; only attention, whose keys
    /// and values differ per sequence, runs sequence by sequence. Returns each sequence's last
    /// logits, shape (batch, vocab).
    pub fn forward_batch(&self, caches: &mut [&mut SeqCache], tokens: &[u32]) -> Result<Tensor> {
        let b = caches.len();
        if b == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(b) {
            candle_core::bail!("{} tokens for {b} sequences", tokens.len());
        }
        let t = tokens.len() / b;
        if b > 1 && t != 1 {
            candle_core::bail!("batched steps take one token per sequence");
        }
        for c in caches.iter() {
            if c.len + t > self.context_length {
                candle_core::bail!("position {} is past the context", c.len + t);
            }
        }
        let (cos, sin) = if b == 1 {
            let pos = caches[0].len;
            (self.cos.narrow(0, pos, t)?, self.sin.narrow(0, pos, t)?)
        } else {
            let pos: Vec<u32> = caches.iter().map(|c| c.len as u32).collect();
            let pos = Tensor::new(pos.as_slice(), &self.device)?;
            let half = self.head_dim / 2;
            (
                self.cos.index_select(&pos, 0)?.reshape((b, 1, half))?,
                self.sin.index_select(&pos, 0)?.reshape((b, 1, half))?,
            )
        };
        let mask = if t > 1 {
            let pos = caches[0].len;
            let m: Vec<u8> = (0..t)
                .flat_map(|i| (0..pos + t).map(move |j| u8::from(j > pos + i)))
                .collect();
            Some(Tensor::from_slice(&m, (t, pos + t), &self.device)?)
        } else {
            None
        };
        for c in caches.iter_mut() {
            c.layers.resize(self.layers.len(), None);
        }
        let mut x = self.embed(tokens)?.reshape((b, t, self.hidden))?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.eps)?;
            let a = self.attention(layer, li, caches, &h, mask.as_ref(), (&cos, &sin))?;
            let x1 = (x + a)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, self.eps)?;
            let g = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
            let m = layer.down.forward(&(g * layer.up.forward(&h)?)?)?;
            x = (x1 + m)?;
        }
        for c in caches.iter_mut() {
            c.len += t;
        }
        // Only each sequence's last position is needed.
        let x = x.i((.., t - 1, ..))?.contiguous()?;
        self.output
            .forward(&candle_nn::ops::rms_norm(&x, &self.norm, self.eps)?)
    }
}

impl Decoder {
    /// One layer's attention for the batch; keys and values go into each sequence's cache.
    fn attention(
        &self,
        l: &Layer,
        li: usize,
        caches: &mut [&mut SeqCache],
        x: &Tensor,
        mask: Option<&Tensor>,
        (cos, sin): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let (n_head, n_kv_head, head_dim) = (self.n_head, self.n_kv_head, self.head_dim);
        let interleaved = self.interleaved;
        let (b, t, hidden) = x.dims3()?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (mut q, mut k, mut v) = (l.wq.forward(x)?, l.wk.forward(x)?, l.wv.forward(x)?);
        if let Some((bq, bk, bv)) = &l.bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        let (q, k, v) = (
            heads(q, n_head)?,
            heads(k, n_kv_head)?,
            heads(v, n_kv_head)?,
        );
        let rope = if interleaved {
            candle_nn::rotary_emb::rope_i
        } else {
            candle_nn::rotary_emb::rope
        };
        let q = rope(&q, cos, sin)?;
        let k = rope(&k, cos, sin)?;
        let rep = n_head / n_kv_head;
        let mut ys = Vec::with_capacity(b);
        for (s, cache) in caches.iter_mut().enumerate() {
            let (ks, vs) = (k.narrow(0, s, 1)?, v.narrow(0, s, 1)?);
            let (ks, vs) = match &cache.layers[li] {
                Some((kc, vc)) if cache.len > 0 => {
                    (Tensor::cat(&[kc, &ks], 2)?, Tensor::cat(&[vc, &vs], 2)?)
                }
                _ => (ks, vs),
            };
            cache.layers[li] = Some((ks.clone(), vs.clone()));
            let ks = candle_transformers::utils::repeat_kv(ks, rep)?;
            let vs = candle_transformers::utils::repeat_kv(vs, rep)?;
            let qs = q.narrow(0, s, 1)?;
            let att = (qs.matmul(&ks.t()?)? / (head_dim as f64).sqrt())?;
            let att = match mask {
                None => att,
                Some(m) => {
                    let m = m.broadcast_as(att.shape())?;
                    let neg =
                        Tensor::new(f32::NEG_INFINITY, x.device())?.broadcast_as(att.shape())?;
                    m.where_cond(&neg, &att)?
                }
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            ys.push(att.matmul(&vs.contiguous()?)?);
        }
        let y = Tensor::cat(&ys, 0)?;
        let y = y.transpose(1, 2)?.reshape((b, t, hidden))?;
        l.wo.forward(&y)
    }
}
