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
//!
//! Rooms: `load` (from GGUF), `weights` (matrices and layers), `kv` (the paged store and each
//! step's plan), `attention` (rotary embeddings, attention), `experts` (MLPs, mixtures).

mod attention;
mod experts;
mod kv;
mod load;
mod weights;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, IndexOp, Result, Tensor};

use attention::Rope;
pub use kv::{KvPool, SeqCache, KV_BLOCK};
use weights::{Ffn, Layer, Weight};

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

impl Decoder {
    pub fn clear_kv_cache(&mut self) {
        self.own = SeqCache::default();
    }

    /// Bytes of key/value cache one position takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers.len() * 2 * self.n_kv_head * self.head_dim * 4
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
}
