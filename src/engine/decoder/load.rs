//! Loading a decoder from a GGUF file: architecture, hyper-parameters, weights (fused where
//! they share a type), Gemma 3's extra norms, experts per tensor or stacked.

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Result, Tensor};

use super::attention::Rope;
use super::kv::SeqCache;
use super::weights::{Ffn, Fused, Layer, Mlp, Weight};
use super::Decoder;

/// A pair of Gemma 3's norm weights (none in the other architectures).
pub(super) fn gemma_norms(
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

/// A layer's `n` experts: one tensor per expert and matrix (`ffn_gate.{j}`), or one 3-D tensor
/// per matrix holding all of them (`ffn_gate_exps`), split here into the experts' own matrices.
fn load_experts(t: &mut impl FnMut(&str) -> Result<QTensor>, n: usize) -> Result<Vec<Mlp>> {
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
                down: Weight::new(down)?,
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
        let embedding = Weight::new(get("token_embd.weight")?)?;
        let output = match get("output.weight") {
            Ok(t) => Weight::new(t)?,
            Err(_) => embedding.clone(), // tied embeddings: the same blocks, held once
        };
        let embedding = embedding.qmatmul().clone();
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
                wo: Weight::new(t("attn_output.weight")?)?,
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
                        experts: load_experts(&mut t, n_expert)?,
                        used: n_expert_used,
                    }
                } else {
                    Ffn::Dense(Mlp {
                        gate_up: Fused::new(vec![t("ffn_gate.weight")?, t("ffn_up.weight")?])?,
                        down: Weight::new(t("ffn_down.weight")?)?,
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
            portable_attention: false,
            context_length,
            own: SeqCache::default(),
            own_pool: None,
        })
    }
}
