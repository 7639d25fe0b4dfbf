//! The feed-forward part: a gated MLP, or a mixture of experts routed token by token.

use candle_core::{DType, Result, Tensor};

use super::weights::Mlp;
use super::Decoder;
use crate::engine::kernels;

/// The `used` experts a token goes to, best first (ties: the lower index), and their weights: the
/// router's softmax over all experts, renormalised over the chosen ones. Computed row by row in a
/// fixed order, so a token is routed the same whatever else is in the batch.
pub(super) fn route(router: &[f32], x: &[f32], used: usize) -> (Vec<usize>, Vec<f32>) {
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

impl Decoder {
    pub(super) fn mlp(&self, mlp: &Mlp, x: &Tensor, decoding: bool) -> Result<Tensor> {
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
    pub(super) fn experts(
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
}
