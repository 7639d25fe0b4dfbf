//! Weight matrices (one, or several multiplied as one) and what a layer is made of.

use candle_core::quantized::QTensor;
use candle_core::{Result, Tensor};

use crate::engine::kernels;

/// A weight matrix (moss's kernels where they take its type, else candle's `QMatMul`).
pub(super) type Weight = kernels::Matrix;

/// Weight matrices that multiply the same input (a layer's queries, keys and values; an MLP's gate
/// and up projections). Those of one type and width are held as one matrix, their rows one after
/// another: one pass over the thread pool and one rounding of the input instead of one each, and
/// every output element is the same dot product as with the matrices apart.
pub(super) struct Fused {
    /// Each held matrix with the row counts of the matrices it stands for, in order.
    pub(super) parts: Vec<(Weight, Vec<usize>)>,
}

impl Fused {
    pub(super) fn new(ts: Vec<QTensor>) -> Result<Self> {
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
                        return Ok((Weight::new(one)?, rows));
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
                Ok((Weight::new(joined)?, rows))
            })
            .collect::<Result<_>>()?;
        Ok(Self { parts })
    }

    /// Each matrix's product with `x`, in order (see `Weight::forward`).
    pub(super) fn forward(&self, x: &Tensor, decoding: bool) -> Result<Vec<Tensor>> {
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

pub(super) struct Layer {
    /// Queries, keys, values.
    pub(super) qkv: Fused,
    pub(super) wo: Weight,
    /// Attention biases (Qwen2; none in Llama).
    pub(super) bias: Option<(Tensor, Tensor, Tensor)>,
    pub(super) attn_norm: Tensor,
    pub(super) ffn_norm: Tensor,
    pub(super) ffn: Ffn,
    /// Gemma 3: norms of each query and key head.
    pub(super) qk_norm: Option<(Tensor, Tensor)>,
    /// Gemma 3: norms of the attention's and the MLP's outputs.
    pub(super) post_norm: Option<(Tensor, Tensor)>,
    /// Gemma 3: this layer sees the last `Decoder::window` positions only (local rotary table).
    pub(super) sliding: bool,
}

/// A gated MLP: down(act(gate(x)) · up(x)).
pub(super) struct Mlp {
    /// Gate, up.
    pub(super) gate_up: Fused,
    pub(super) down: Weight,
}

/// A layer's feed-forward part.
pub(super) enum Ffn {
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

impl Fused {
    pub(super) fn bytes(&self) -> usize {
        self.parts.iter().map(|(w, _)| w.bytes()).sum()
    }
}

impl Mlp {
    pub(super) fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }
}

impl Layer {
    /// Weight bytes one decoding step reads in this layer (a mixture: the router and, on average,
    /// the share of the experts a token uses).
    pub(super) fn step_bytes(&self) -> usize {
        let ffn = match &self.ffn {
            Ffn::Dense(mlp) => mlp.bytes(),
            Ffn::Experts {
                router,
                experts,
                used,
            } => {
                let all: usize = experts.iter().map(Mlp::bytes).sum();
                router.len() * 4 + all * used / experts.len().max(1)
            }
        };
        self.qkv.bytes() + self.wo.bytes() + ffn
    }
}
