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
    /// Attention through candle's batched products and masks even on the CPU — the path a GPU
    /// takes — instead of moss's CPU kernels (tests compare the two).
    portable_attention: bool,
    pub context_length: usize,
    /// The sequence of the one-at-a-time interface (`forward`), and its store (made on first use).
    own: SeqCache,
    own_pool: Option<KvPool>,
}

impl Decoder {
    pub fn clear_kv_cache(&mut self) {
        self.own = SeqCache::default();
    }

    /// Runs attention the way it runs on a GPU (candle's batched products with additive masks),
    /// here on the CPU too: what a GPU computes with candle's kernels, checkable without one.
    pub fn set_portable_attention(&mut self, on: bool) {
        self.portable_attention = on;
    }

    /// Whether attention runs through moss's CPU kernels (in place for decoding rows, fused for
    /// prompt chunks).
    fn cpu_attention(&self) -> bool {
        self.device.is_cpu() && !self.portable_attention
    }

    /// Bytes of key/value cache one position takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers.len() * 2 * self.n_kv_head * self.head_dim * 4
    }

    /// Weight bytes one decoding step reads: every layer's matrices and the output projection
    /// (the embedding contributes one row per token). Memory bandwidth over this is the fastest a
    /// single stream can decode.
    pub fn step_bytes(&self) -> usize {
        self.layers.iter().map(Layer::step_bytes).sum::<usize>() + self.output.bytes()
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
        if t == 1 {
            let feeds: Vec<&[u32]> = tokens.chunks(1).collect();
            return self.forward_decode(pool, caches, &feeds);
        }
        self.make_room(pool, caches, &vec![t; b])?;
        let plan = self.plan(caches, t)?;
        let global = self.rope.at(caches, t)?;
        let local = match &self.local_rope {
            Some(r) => Some(r.at(caches, t)?),
            None => None,
        };
        let x = self.embed(tokens)?.reshape((b, t, self.hidden))?;
        let x = self.layers_forward(pool, &plan, (&global, local.as_ref()), x, false)?;
        for c in caches.iter_mut() {
            c.len += t;
        }
        // Only each sequence's last position is needed.
        self.head(&x.i((.., t - 1, ..))?.contiguous()?, false)
    }

    /// A decoding step in which sequence `i` takes the tokens `feeds[i]`: its next token, and
    /// possibly tokens drafted to follow it. Every token is a row computed exactly as a one-token
    /// step would compute it (the same bits: rows do not mix, and row `j` of a sequence sees its
    /// positions up to its own), so a drafted token's row gives the logits the sequence would have
    /// had if it had taken that token alone. Returns every row's logits, shape (rows, vocab), the
    /// sequences' rows in order; each cache grows by its feed.
    pub fn forward_decode(
        &self,
        pool: &KvPool,
        caches: &mut [&mut SeqCache],
        feeds: &[&[u32]],
    ) -> Result<Tensor> {
        if caches.is_empty() || caches.len() != feeds.len() || feeds.iter().any(|f| f.is_empty()) {
            candle_core::bail!("{} feeds for {} sequences", feeds.len(), caches.len());
        }
        let counts: Vec<usize> = feeds.iter().map(|f| f.len()).collect();
        self.make_room(pool, caches, &counts)?;
        // Row by row: (sequence, position).
        let rows: Vec<(usize, usize)> = caches
            .iter()
            .zip(&counts)
            .enumerate()
            .flat_map(|(i, (c, n))| (c.len..c.len + n).map(move |p| (i, p)))
            .collect();
        let positions: Vec<usize> = rows.iter().map(|r| r.1).collect();
        let plan = self.plan_rows(caches, &rows)?;
        let global = self.rope.at_positions(&positions)?;
        let local = match &self.local_rope {
            Some(r) => Some(r.at_positions(&positions)?),
            None => None,
        };
        let tokens: Vec<u32> = feeds.concat();
        let x = self.embed(&tokens)?.reshape((rows.len(), 1, self.hidden))?;
        let x = self.layers_forward(pool, &plan, (&global, local.as_ref()), x, true)?;
        for (c, n) in caches.iter_mut().zip(&counts) {
            c.len += n;
        }
        self.head(&x.squeeze(1)?, true)
    }

    /// Checks that the caches can take `counts` more positions each and gives them the blocks.
    fn make_room(
        &self,
        pool: &KvPool,
        caches: &mut [&mut SeqCache],
        counts: &[usize],
    ) -> Result<()> {
        for (c, n) in caches.iter().zip(counts) {
            if c.len + n > self.context_length {
                candle_core::bail!("position {} is past the context", c.len + n);
            }
        }
        if pool.layers.len() != self.layers.len() {
            candle_core::bail!("a key/value store made for another model");
        }
        for (c, n) in caches.iter_mut().zip(counts) {
            pool.grow(c, c.len + n)?;
        }
        Ok(())
    }

    /// Every layer on `x` (batch, t, hidden). `decoding`: the rows are tokens that must come out
    /// as each would alone.
    fn layers_forward(
        &self,
        pool: &KvPool,
        plan: &kv::StepPlan,
        (global, local): (&(Tensor, Tensor), Option<&(Tensor, Tensor)>),
        mut x: Tensor,
        decoding: bool,
    ) -> Result<Tensor> {
        for (layer, store) in self.layers.iter().zip(&pool.layers) {
            let rope = match (local, layer.sliding) {
                (Some(local), true) => local,
                _ => global,
            };
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.eps)?;
            let mut a = self.attention(layer, store, plan, &h, rope)?;
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
        Ok(x)
    }

    /// Logits of the rows of `x` (rows, hidden).
    fn head(&self, x: &Tensor, decoding: bool) -> Result<Tensor> {
        let logits = self.output.forward(
            &candle_nn::ops::rms_norm(x, &self.norm, self.eps)?,
            decoding,
        )?;
        match self.softcap {
            Some(c) => (logits / c)?.tanh()? * c,
            None => Ok(logits),
        }
    }
}
