//! Rotary embeddings and attention over the paged store: one batched product, or moss's
//! in-place kernel when decoding on the CPU.

use candle_core::{DType, Device, Result, Tensor};

use super::kv::{Read, SeqCache, StepPlan};
use super::weights::Layer;
use super::Decoder;
use crate::engine::kernels;

/// Cosines and sines of the rotary embedding, one row per position.
pub(super) struct Rope {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

impl Rope {
    pub(super) fn new(
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

    /// The rows for the given positions, one token each: (positions, 1, d/2).
    pub(super) fn at_positions(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let shape = (pos.len(), 1, self.cos.dim(1)?);
        let pos = Tensor::new(pos.as_slice(), self.cos.device())?;
        Ok((
            self.cos.index_select(&pos, 0)?.reshape(shape)?,
            self.sin.index_select(&pos, 0)?.reshape(shape)?,
        ))
    }

    /// The rows for `t` new positions of each sequence: (t, d/2) for one, (b, t, d/2) for several.
    pub(super) fn at(&self, caches: &[&mut SeqCache], t: usize) -> Result<(Tensor, Tensor)> {
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

impl Decoder {
    /// One layer's attention for the whole batch. Grouped queries are not expanded: the query heads
    /// sharing a key/value head become rows of one matrix product with it.
    pub(super) fn attention(
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
        let (index, w, mask, ranges) = match &plan.read {
            Read::Gather {
                index,
                width,
                mask,
                local_mask,
                ranges,
            } => {
                let mask = match l.sliding {
                    true => local_mask.as_ref().or(mask.as_ref()),
                    false => mask.as_ref(),
                };
                let ranges = ranges.as_ref().map(|(global, local)| match l.sliding {
                    true => local.as_ref().unwrap_or(global),
                    false => global,
                });
                (index, *width, mask, ranges)
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
        if let Some(ranges) = ranges {
            let y = self.chunk_attention(&q, &keys, &values, w, ranges)?;
            return l.wo.forward(&y, decoding);
        }
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

    /// A prompt chunk's attention through moss's fused CPU kernel: `q` (b, heads, t, d), rotated;
    /// `keys` and `values` (kv heads, b, width, d); `ranges` the columns each (sequence,
    /// position) sees. Returns (b, t, heads · d).
    fn chunk_attention(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        width: usize,
        ranges: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (b, n_head, t, d) = q.dims4()?;
        let (kv, rep) = (self.n_kv_head, self.n_head / self.n_kv_head);
        // Rows grouped by kv head, then sequence, position and query head: (kv, b, t, rep, d).
        let q = (q
            .reshape((b, kv, rep, t, d))?
            .permute((1, 0, 3, 2, 4))?
            .contiguous()?
            * self.attn_scale)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let keys = keys.flatten_all()?.to_vec1::<f32>()?;
        let values = values.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; q.len()];
        let dims = kernels::prefill::ChunkDims {
            kv_heads: kv,
            seqs: b,
            positions: t,
            group: rep,
            width,
            head_dim: d,
        };
        kernels::prefill::chunk_attention(&q, &keys, &values, dims, ranges, &mut out)?;
        Tensor::from_vec(out, (kv, b, t, rep, d), &self.device)?
            .permute((1, 2, 0, 3, 4))?
            .reshape((b, t, n_head * d))
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
