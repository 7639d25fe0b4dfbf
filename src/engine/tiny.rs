//! Writes tiny GGUF models (random weights, a small real vocabulary, the same metadata keys as
//! real files) with candle's GGUF writer. Tests, load scripts and `moss debug tiny-model` use them
//! to exercise the real loading code without a 500 MB download.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::gguf::Arch;

/// Words whose BPE merges the tiny vocabulary contains, so common text makes multi-byte tokens.
const WORDS: &[&str] = &[
    "hello", "world", "the", "capital", "of", "france", "paris", "what", "is", "and", "you",
    "moss", "你好", "世界", "北京", "是", "的",
];

/// Sizes of a tiny model. Matrix dimensions are multiples of 32 so they can be Q8_0.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    pub arch: Arch,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub layers: usize,
    pub context: usize,
    pub seed: u64,
    /// The type of the embedding and layer matrices (Q8_0 by default; Q5_0 exercises moss's
    /// kernels the way the default model does).
    pub matrices: GgmlDType,
    /// Llama only: a mixture of this many experts per layer (0: one dense MLP), of which
    /// `experts_used` run for each token.
    pub experts: usize,
    pub experts_used: usize,
    /// Experts as one 3-D tensor per matrix (`ffn_gate_exps`, llama.cpp's current layout) rather
    /// than one tensor per expert (`ffn_gate.{j}`, the older one candle-transformers reads).
    pub stacked_experts: bool,
}

impl TinySpec {
    pub fn new(arch: Arch) -> Self {
        Self {
            arch,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            layers: 2,
            context: 512,
            seed: 42,
            matrices: GgmlDType::Q8_0,
            experts: 0,
            experts_used: 0,
            stacked_experts: false,
        }
    }
}

/// A deterministic generator (splitmix64) so the same spec always gives the same file.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn tensor(
        &mut self,
        dims: &[usize],
        scale: f32,
        dtype: GgmlDType,
    ) -> candle_core::Result<QTensor> {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.next_f32() * scale).collect();
        QTensor::quantize(&Tensor::from_vec(data, dims, &Device::Cpu)?, dtype)
    }

    fn ones(&mut self, n: usize) -> candle_core::Result<QTensor> {
        let data: Vec<f32> = (0..n).map(|_| 1.0 + 0.1 * self.next_f32()).collect();
        QTensor::quantize(&Tensor::from_vec(data, n, &Device::Cpu)?, GgmlDType::F32)
    }
}

/// GPT-2's byte → printable character table (byte-level BPE).
pub fn byte_to_char() -> Vec<char> {
    let mut direct: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut table = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        if !direct.contains(&b) {
            direct.push(b);
            table[b as usize] = char::from_u32(256 + extra).expect("valid char");
            extra += 1;
        } else {
            table[b as usize] = char::from_u32(b).expect("valid char");
        }
    }
    table
}

struct TinyVocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Vec<f32>,
    merges: Vec<String>,
}

impl TinyVocab {
    fn push(&mut self, t: String, ty: i32) {
        if !self.tokens.contains(&t) {
            let score = -(self.tokens.len() as f32);
            self.tokens.push(t);
            self.types.push(ty);
            self.scores.push(score);
        }
    }

    fn id(&self, t: &str) -> u32 {
        self.tokens
            .iter()
            .position(|x| x == t)
            .expect("token present") as u32
    }
}

fn byte_level_vocab() -> TinyVocab {
    let table = byte_to_char();
    let mut v = TinyVocab {
        tokens: vec![],
        types: vec![],
        scores: vec![],
        merges: vec![],
    };
    for c in &table {
        v.push(c.to_string(), 1);
    }
    for word in WORDS {
        // The word's own merges first, then the leading space joins the whole word, so that
        // " word" becomes one token like "word" does (merges apply in rank order).
        let chars: Vec<String> = word
            .bytes()
            .map(|b| table[b as usize].to_string())
            .collect();
        let mut acc = chars[0].clone();
        for c in &chars[1..] {
            v.merges.push(format!("{acc} {c}"));
            acc.push_str(c);
            v.push(acc.clone(), 1);
        }
        let space = table[b' ' as usize];
        v.merges.push(format!("{space} {acc}"));
        v.push(format!("{space}{acc}"), 1);
    }
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        v.push(special.to_string(), 3);
    }
    // User-defined tokens, as Qwen2.5 has for function calls.
    for tag in ["<tool_call>", "</tool_call>"] {
        v.push(tag.to_string(), 4);
    }
    v
}

fn sentencepiece_vocab() -> TinyVocab {
    let mut v = TinyVocab {
        tokens: vec![],
        types: vec![],
        scores: vec![],
        merges: vec![],
    };
    for (t, ty) in [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2)] {
        v.push(t.to_string(), ty);
    }
    for b in 0..256 {
        v.push(format!("<0x{b:02X}>"), 6);
    }
    v.push("▁".to_string(), 1);
    for word in WORDS.iter().flat_map(|w| [w.to_string(), format!("▁{w}")]) {
        let mut acc = String::new();
        for c in word.chars() {
            v.push(c.to_string(), 1);
            acc.push(c);
            v.push(acc.clone(), 1);
        }
    }
    for t in ["<start_of_turn>", "<end_of_turn>"] {
        v.push(t.to_string(), 3);
    }
    v.push("\n\n".to_string(), 4);
    v
}

/// A Qwen-style ChatML template with a default system prompt, as real chat GGUFs carry.
/// Qwen2.5's turn format in brief, functions included (shown in the system turn, calls written as
/// `<tool_call>` blocks, results given back as `<tool_response>` in a user turn).
const TINY_TEMPLATE: &str = r#"{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- else %}{%- set system = 'You are a tiny test model.' %}{%- endif %}{{- '<|im_start|>system\n' + system }}{%- if tools %}{{- '\n\n# Tools\n<tools>' }}{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}{{- '\n</tools>' }}{%- endif %}{{- '<|im_end|>\n' }}{%- for message in messages %}{%- if message.role == 'assistant' and message.tool_calls %}{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\n' + message.content }}{%- endif %}{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}{{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}{%- elif message.role == 'tool' %}{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}{%- elif message.role != 'system' %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"#;

/// Writes a tiny model of `spec` to `path`.
pub fn write_tiny_model(path: &Path, spec: &TinySpec) -> anyhow::Result<()> {
    let mut rng = Rng(spec.seed);
    let arch = spec.arch.name();
    let vocab = match spec.arch {
        Arch::Gemma3 => sentencepiece_vocab(),
        _ => byte_level_vocab(),
    };
    let head_dim = spec.hidden / spec.heads;
    let kv_dim = head_dim * spec.kv_heads;
    let h = spec.hidden;
    let u32v = |x: usize| Value::U32(x as u32);
    let strs = |xs: &[String]| Value::Array(xs.iter().map(|s| Value::String(s.clone())).collect());
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(format!("tiny-{arch}"))),
        (format!("{arch}.context_length"), u32v(spec.context)),
        (format!("{arch}.embedding_length"), u32v(h)),
        (format!("{arch}.block_count"), u32v(spec.layers)),
        (format!("{arch}.feed_forward_length"), u32v(spec.ffn)),
        (format!("{arch}.attention.head_count"), u32v(spec.heads)),
        (
            format!("{arch}.attention.head_count_kv"),
            u32v(spec.kv_heads),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        ("tokenizer.ggml.tokens".into(), strs(&vocab.tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.types.iter().map(|t| Value::I32(*t)).collect()),
        ),
    ];
    match spec.arch {
        Arch::Gemma3 => {
            md.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
            md.push((
                "tokenizer.ggml.scores".into(),
                Value::Array(vocab.scores.iter().map(|s| Value::F32(*s)).collect()),
            ));
            md.push((
                "tokenizer.ggml.bos_token_id".into(),
                u32v(vocab.id("<bos>") as usize),
            ));
            md.push((
                "tokenizer.ggml.eos_token_id".into(),
                u32v(vocab.id("<eos>") as usize),
            ));
            md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)));
            md.push((format!("{arch}.attention.key_length"), u32v(head_dim)));
            md.push((format!("{arch}.attention.value_length"), u32v(head_dim)));
            md.push((format!("{arch}.attention.sliding_window"), u32v(64)));
        }
        _ => {
            md.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
            md.push(("tokenizer.ggml.pre".into(), Value::String("qwen2".into())));
            md.push(("tokenizer.ggml.merges".into(), strs(&vocab.merges)));
            md.push((
                "tokenizer.ggml.bos_token_id".into(),
                u32v(vocab.id("<|endoftext|>") as usize),
            ));
            md.push((
                "tokenizer.ggml.eos_token_id".into(),
                u32v(vocab.id("<|im_end|>") as usize),
            ));
            md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
            md.push((
                "tokenizer.chat_template".into(),
                Value::String(TINY_TEMPLATE.into()),
            ));
            if spec.arch == Arch::Llama {
                md.push((format!("{arch}.rope.dimension_count"), u32v(head_dim)));
            }
            if spec.experts > 1 {
                md.push((format!("{arch}.expert_count"), u32v(spec.experts)));
                md.push((format!("{arch}.expert_used_count"), u32v(spec.experts_used)));
            }
        }
    }

    let q8 = spec.matrices;
    let n_vocab = vocab.tokens.len();
    let q_dim = head_dim * spec.heads;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            rng.tensor(&[n_vocab, h], 1.0, q8)?,
        ),
        ("output_norm.weight".into(), rng.ones(h)?),
        ("output.weight".into(), output_weights(&mut rng, &vocab, h)?),
    ];
    for l in 0..spec.layers {
        let p = format!("blk.{l}");
        let s = 0.5 / (h as f32).sqrt();
        tensors.push((
            format!("{p}.attn_q.weight"),
            rng.tensor(&[q_dim, h], s, q8)?,
        ));
        tensors.push((
            format!("{p}.attn_k.weight"),
            rng.tensor(&[kv_dim, h], s, q8)?,
        ));
        tensors.push((
            format!("{p}.attn_v.weight"),
            rng.tensor(&[kv_dim, h], s, q8)?,
        ));
        tensors.push((
            format!("{p}.attn_output.weight"),
            rng.tensor(&[h, q_dim], s, q8)?,
        ));
        if spec.experts > 1 {
            // The router (F32, as llama.cpp writes it), then the experts' matrices.
            tensors.push((
                format!("{p}.ffn_gate_inp.weight"),
                rng.tensor(&[spec.experts, h], 1.0, GgmlDType::F32)?,
            ));
            let (n, f) = (spec.experts, spec.ffn);
            for (name, dims) in [("gate", [f, h]), ("up", [f, h]), ("down", [h, f])] {
                if spec.stacked_experts {
                    tensors.push((
                        format!("{p}.ffn_{name}_exps.weight"),
                        rng.tensor(&[n, dims[0], dims[1]], s, q8)?,
                    ));
                } else {
                    for j in 0..n {
                        tensors.push((
                            format!("{p}.ffn_{name}.{j}.weight"),
                            rng.tensor(&dims, s, q8)?,
                        ));
                    }
                }
            }
        } else {
            tensors.push((
                format!("{p}.ffn_gate.weight"),
                rng.tensor(&[spec.ffn, h], s, q8)?,
            ));
            tensors.push((
                format!("{p}.ffn_up.weight"),
                rng.tensor(&[spec.ffn, h], s, q8)?,
            ));
            tensors.push((
                format!("{p}.ffn_down.weight"),
                rng.tensor(&[h, spec.ffn], s, q8)?,
            ));
        }
        tensors.push((format!("{p}.attn_norm.weight"), rng.ones(h)?));
        tensors.push((format!("{p}.ffn_norm.weight"), rng.ones(h)?));
        match spec.arch {
            Arch::Qwen2 => {
                for (name, n) in [("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)] {
                    tensors.push((
                        format!("{p}.{name}.bias"),
                        rng.tensor(&[n], 0.1, GgmlDType::F32)?,
                    ));
                }
            }
            Arch::Gemma3 => {
                tensors.push((format!("{p}.attn_q_norm.weight"), rng.ones(head_dim)?));
                tensors.push((format!("{p}.attn_k_norm.weight"), rng.ones(head_dim)?));
                tensors.push((format!("{p}.post_attention_norm.weight"), rng.ones(h)?));
                tensors.push((format!("{p}.post_ffw_norm.weight"), rng.ones(h)?));
            }
            Arch::Llama => {}
        }
    }

    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = path.with_extension("gguf.tmp");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    gguf_file::write(&mut file, &md_refs, &t_refs)?;
    std::io::Write::flush(&mut file)?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Output projection with zero rows for control tokens, so that random weights rarely end a turn
/// and generations are long enough to test streaming, stop strings and cancellation.
fn output_weights(rng: &mut Rng, vocab: &TinyVocab, h: usize) -> candle_core::Result<QTensor> {
    let mut data = Vec::with_capacity(vocab.tokens.len() * h);
    for ty in &vocab.types {
        for _ in 0..h {
            let x = rng.next_f32();
            // Control and user-defined tokens: only written when a grammar asks for them.
            data.push(if *ty == 3 || *ty == 4 { 0.0 } else { x });
        }
    }
    QTensor::quantize(
        &Tensor::from_vec(data, (vocab.tokens.len(), h), &Device::Cpu)?,
        GgmlDType::Q8_0,
    )
}
