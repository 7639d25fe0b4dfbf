//! Qwen2 on candle with moss's quantized kernels (`kernels.rs`): the same computation as
//! candle-transformers' `quantized_qwen2`, except that
//! - Q5_0 / Q8_0 weight matrices multiply through moss's SIMD kernels (candle's own stay in use
//!   for the types where they are fast), and
//! - the token embedding stays quantized: only the rows looked up are dequantised (candle-
//!   transformers expands the whole table to f32, ~545 MB for the default model).

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};

use super::kernels::{self, BlockQ5_0, BlockQ8_0, FastBlocks};

/// The token embedding table.
enum Embedding {
    Q5_0(FastBlocks<BlockQ5_0>),
    Q8_0(FastBlocks<BlockQ8_0>),
    /// Any other type (or a GPU): dequantised once, as candle-transformers does.
    Dense(Tensor),
}

struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    bq: Tensor,
    bk: Tensor,
    bv: Tensor,
    attn_norm: Tensor,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    kv: Option<(Tensor, Tensor)>,
}

pub struct Qwen2 {
    embedding: Embedding,
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
    device: Device,
    pub context_length: usize,
}

fn matmul(t: QTensor) -> Result<QMatMul> {
    QMatMul::from_qtensor(kernels::accelerate(t)?)
}

impl Qwen2 {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let md = |k: &str| match ct.metadata.get(&format!("qwen2.{k}")) {
            Some(v) => Ok(v),
            None => candle_core::bail!("cannot find qwen2.{k} in metadata"),
        };
        let n_head = md("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("attention.head_count_kv")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let context_length = md("context_length")?.to_u32()? as usize;
        let blocks = md("block_count")?.to_u32()? as usize;
        let eps = md("attention.layer_norm_rms_epsilon")?.to_f32()?;
        let base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10000.0);
        if n_head == 0 || n_kv_head == 0 || hidden % n_head != 0 || n_head % n_kv_head != 0 {
            candle_core::bail!("inconsistent attention sizes");
        }
        let head_dim = hidden / n_head;
        let mut get = |name: &str| ct.tensor(reader, name, device);
        let embd = get("token_embd.weight")?;
        let output = match get("output.weight") {
            Ok(t) => matmul(t)?,
            Err(_) => matmul(get("token_embd.weight")?)?, // tied embeddings
        };
        let embedding = match (embd.dtype(), device.is_cpu()) {
            (GgmlDType::Q5_0, true) => Embedding::Q5_0(FastBlocks::from_bytes(&embd.data()?)?),
            (GgmlDType::Q8_0, true) => Embedding::Q8_0(FastBlocks::from_bytes(&embd.data()?)?),
            _ => Embedding::Dense(embd.dequantize(device)?),
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
                bq: t("attn_q.bias")?.dequantize(device)?,
                bk: t("attn_k.bias")?.dequantize(device)?,
                bv: t("attn_v.bias")?.dequantize(device)?,
                attn_norm: t("attn_norm.weight")?.dequantize(device)?,
                ffn_norm: t("ffn_norm.weight")?.dequantize(device)?,
                gate: matmul(t("ffn_gate.weight")?)?,
                up: matmul(t("ffn_up.weight")?)?,
                down: matmul(t("ffn_down.weight")?)?,
                kv: None,
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
            device: device.clone(),
            context_length,
        })
    }

    pub fn clear_kv_cache(&mut self) {
        for l in &mut self.layers {
            l.kv = None;
        }
    }

    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let rows = match &self.embedding {
            Embedding::Q5_0(b) => b.rows(tokens, self.hidden)?,
            Embedding::Q8_0(b) => b.rows(tokens, self.hidden)?,
            Embedding::Dense(t) => {
                let ids = Tensor::new(tokens, &self.device)?;
                return t.index_select(&ids, 0)?.unsqueeze(0);
            }
        };
        Tensor::from_vec(rows, (1, tokens.len(), self.hidden), &self.device)
    }

    /// Runs `tokens` at positions `pos..` of the one sequence held; returns the last token's
    /// logits, shape (1, vocab).
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor> {
        let t = tokens.len();
        if pos + t > self.context_length {
            candle_core::bail!("position {} is past the context", pos + t);
        }
        let mask = if t > 1 {
            let m: Vec<u8> = (0..t)
                .flat_map(|i| (0..pos + t).map(move |j| u8::from(j > pos + i)))
                .collect();
            Some(Tensor::from_slice(&m, (t, pos + t), &self.device)?)
        } else {
            None
        };
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let mut x = self.embed(tokens)?;
        for layer in &mut self.layers {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.eps)?;
            let a = attention(
                layer,
                &h,
                mask.as_ref(),
                pos,
                (&cos, &sin),
                (self.n_head, self.n_kv_head, self.head_dim),
            )?;
            let x1 = (x + a)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, self.eps)?;
            let g = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
            let m = layer.down.forward(&(g * layer.up.forward(&h)?)?)?;
            x = (x1 + m)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.eps)?;
        self.output.forward(&x.i((.., t - 1, ..))?)
    }
}

fn attention(
    l: &mut Layer,
    x: &Tensor,
    mask: Option<&Tensor>,
    pos: usize,
    (cos, sin): (&Tensor, &Tensor),
    (n_head, n_kv_head, head_dim): (usize, usize, usize),
) -> Result<Tensor> {
    let (b, t, hidden) = x.dims3()?;
    let heads = |y: Tensor, n: usize| -> Result<Tensor> {
        y.reshape((b, t, n, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = heads(l.wq.forward(x)?.broadcast_add(&l.bq)?, n_head)?;
    let k = heads(l.wk.forward(x)?.broadcast_add(&l.bk)?, n_kv_head)?;
    let v = heads(l.wv.forward(x)?.broadcast_add(&l.bv)?, n_kv_head)?;
    let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
    let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
    let (k, v) = match (&l.kv, pos) {
        (Some((kc, vc)), p) if p > 0 => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
        _ => (k, v),
    };
    l.kv = Some((k.clone(), v.clone()));
    let rep = n_head / n_kv_head;
    let k = candle_transformers::utils::repeat_kv(k, rep)?;
    let v = candle_transformers::utils::repeat_kv(v, rep)?;
    let att = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
    let att = match mask {
        None => att,
        Some(m) => {
            let m = m.broadcast_as(att.shape())?;
            let neg = Tensor::new(f32::NEG_INFINITY, x.device())?.broadcast_as(att.shape())?;
            m.where_cond(&neg, &att)?
        }
    };
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    let y = att.matmul(&v.contiguous()?)?;
    let y = y.transpose(1, 2)?.reshape((b, t, hidden))?;
    l.wo.forward(&y)
}
