//! Opens a GGUF file and checks it before any weight is read: magic, header, architecture, and
//! that every tensor's bytes lie inside the file. Every failure names the file and the problem.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

/// Architectures moss can run (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Qwen2,
    Llama,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read model file: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (the first bytes are not `GGUF`)")]
    NotGguf { path: PathBuf },
    #[error("{path}: corrupt or truncated GGUF header: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error("{path}: file is truncated: tensor `{tensor}` needs bytes up to {needed}, the file has {size}")]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        size: u64,
    },
    #[error("{path}: no `general.architecture` in the metadata")]
    NoArchitecture { path: PathBuf },
    #[error("{path}: unsupported architecture `{arch}` (supported: qwen2, llama, gemma3)")]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error("{path}: cannot build the model: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("{path}: cannot build the tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        source: super::tokenizer::TokenizerError,
    },
    #[error("device: {0}")]
    Device(String),
}

/// An opened, checked GGUF file.
pub struct ModelFile {
    pub path: PathBuf,
    pub content: Content,
    pub arch: Arch,
    pub reader: BufReader<File>,
}

impl ModelFile {
    /// Opens and checks `path`.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let io = |source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        if size < 4 || reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(LoadError::NotGguf {
                path: path.to_path_buf(),
            });
        }
        reader.seek(SeekFrom::Start(0)).map_err(io)?;
        let content = Content::read(&mut reader).map_err(|e| LoadError::BadHeader {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        check_tensor_bounds(path, &content, size)?;
        let arch = match content
            .metadata
            .get("general.architecture")
            .map(Value::to_string)
        {
            Some(Ok(a)) => a.clone(),
            _ => {
                return Err(LoadError::NoArchitecture {
                    path: path.to_path_buf(),
                })
            }
        };
        let arch = match arch.as_str() {
            "qwen2" => Arch::Qwen2,
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            _ => {
                return Err(LoadError::UnsupportedArch {
                    path: path.to_path_buf(),
                    arch,
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            content,
            arch,
            reader,
        })
    }

    /// A metadata value under the architecture's prefix, e.g. `context_length`.
    pub fn arch_u32(&self, key: &str) -> Option<u32> {
        self.content
            .metadata
            .get(&format!("{}.{key}", self.arch.name()))?
            .to_u32()
            .ok()
    }

    pub fn md_u32(&self, key: &str) -> Option<u32> {
        self.content.metadata.get(key)?.to_u32().ok()
    }

    pub fn md_bool(&self, key: &str) -> Option<bool> {
        self.content.metadata.get(key)?.to_bool().ok()
    }

    pub fn md_str(&self, key: &str) -> Option<&str> {
        self.content
            .metadata
            .get(key)?
            .to_string()
            .ok()
            .map(String::as_str)
    }
}

fn check_tensor_bounds(path: &Path, content: &Content, size: u64) -> Result<(), LoadError> {
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count() as u64;
        let block = info.ggml_dtype.block_size() as u64;
        let bytes = elems / block.max(1) * info.ggml_dtype.type_size() as u64;
        let needed = content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(bytes);
        if !elems.is_multiple_of(block.max(1)) || needed > size {
            return Err(LoadError::Truncated {
                path: path.to_path_buf(),
                tensor: name.clone(),
                needed,
                size,
            });
        }
    }
    Ok(())
}
