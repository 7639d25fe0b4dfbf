//! The transformer itself, picked by `general.architecture`, behind one small interface (reset,
//! forward → last-token logits): moss's own decoder for Qwen2, Llama and Gemma 3 (`decoder.rs`,
//! with moss's kernels, a quantized embedding and batched steps) or one of candle-transformers'
//! quantized implementations (to compare).

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{quantized_gemma3, quantized_llama, quantized_qwen2};

use super::gguf::{Arch, LoadError, ModelFile};

/// Which implementation runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Implementation {
    /// moss's (`decoder.rs`): SIMD kernels, embedding kept quantized, batching (mixtures of
    /// experts included).
    #[default]
    Moss,
    /// candle-transformers' `quantized_qwen2` / `quantized_llama` / `quantized_gemma3`, unchanged
    /// (the baseline in benchmarks and tests; its Gemma 3 gates with SiLU where the model uses
    /// GELU, so its answers differ from moss's and llama.cpp's).
    Candle,
}

enum Weights {
    Moss(super::decoder::Decoder),
    Qwen2(quantized_qwen2::ModelWeights),
    Llama(quantized_llama::ModelWeights),
    /// Gemma 3 has no way to clear its KV cache, so a pristine copy (tensors are shared,
    /// only the empty caches are copied) replaces the live one between sequences.
    Gemma3 {
        pristine: quantized_gemma3::ModelWeights,
        live: quantized_gemma3::ModelWeights,
    },
}

/// A loaded model holding one sequence's KV cache.
pub struct Model {
    weights: Weights,
    device: Device,
    /// Positions the implementation can address (its rotary tables' length).
    pub max_positions: usize,
}

impl Model {
    /// Reads every weight of `file` onto `device` (consuming the file's header).
    pub fn load(
        file: ModelFile,
        device: &Device,
        implementation: Implementation,
    ) -> Result<Self, LoadError> {
        let ModelFile {
            path,
            content,
            arch,
            mut reader,
        } = file;
        let err = |reason: String| LoadError::Model {
            path: path.clone(),
            reason,
        };
        // A hand-made file can have tensor shapes that make the implementation panic;
        // that must be an error naming the file, not a crash.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            load_weights(arch, content, &mut reader, device, implementation)
        }));
        let (weights, max_positions) = match result {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => return Err(err(e.to_string())),
            Err(_) => return Err(err("the model's tensors do not fit its architecture".into())),
        };
        Ok(Self {
            weights,
            device: device.clone(),
            max_positions,
        })
    }

    /// moss's decoder, which can advance several sequences in one step.
    pub fn batched(&self) -> Option<&super::decoder::Decoder> {
        match &self.weights {
            Weights::Moss(m) => Some(m),
            _ => None,
        }
    }

    /// moss's decoder, to change how it runs (see `Decoder::set_portable_attention`).
    pub fn batched_mut(&mut self) -> Option<&mut super::decoder::Decoder> {
        match &mut self.weights {
            Weights::Moss(m) => Some(m),
            _ => None,
        }
    }

    /// Forgets the current sequence (empties the KV cache).
    pub fn reset(&mut self) {
        match &mut self.weights {
            Weights::Moss(m) => m.clear_kv_cache(),
            Weights::Qwen2(m) => m.clear_kv_cache(),
            Weights::Llama(m) => m.clear_kv_cache(),
            Weights::Gemma3 { pristine, live } => *live = pristine.clone(),
        }
    }

    /// Runs `tokens` at positions `pos..` and returns the logits of the last one (f32, 1-D).
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Tensor> {
        if let Weights::Moss(m) = &mut self.weights {
            return m.forward(tokens, pos)?.squeeze(0)?.to_dtype(DType::F32);
        }
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = match &mut self.weights {
            Weights::Moss(_) => unreachable!("handled above"),
            Weights::Qwen2(m) => m.forward(&input, pos)?,
            Weights::Llama(m) => m.forward(&input, pos)?,
            Weights::Gemma3 { live, .. } => live.forward(&input, pos)?,
        };
        logits.squeeze(0)?.to_dtype(DType::F32)
    }
}

fn load_weights(
    arch: Arch,
    content: candle_core::quantized::gguf_file::Content,
    reader: &mut std::io::BufReader<std::fs::File>,
    device: &Device,
    implementation: Implementation,
) -> candle_core::Result<(Weights, usize)> {
    Ok(match arch {
        Arch::Qwen2 | Arch::Llama | Arch::Gemma3 if implementation == Implementation::Moss => {
            let m = super::decoder::Decoder::from_gguf(&content, reader, device)?;
            let ctx = m.context_length;
            (Weights::Moss(m), ctx)
        }
        Arch::Qwen2 => {
            let ctx = content
                .metadata
                .get("qwen2.context_length")
                .and_then(|v| v.to_u32().ok())
                .unwrap_or(4096) as usize;
            (
                Weights::Qwen2(quantized_qwen2::ModelWeights::from_gguf(
                    content, reader, device,
                )?),
                ctx,
            )
        }
        Arch::Llama => (
            Weights::Llama(quantized_llama::ModelWeights::from_gguf(
                content, reader, device,
            )?),
            quantized_llama::MAX_SEQ_LEN,
        ),
        Arch::Gemma3 => {
            let m = quantized_gemma3::ModelWeights::from_gguf(content, reader, device)?;
            (
                Weights::Gemma3 {
                    pristine: m.clone(),
                    live: m,
                },
                quantized_gemma3::MAX_SEQ_LEN,
            )
        }
    })
}
