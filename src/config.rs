//! One configuration tree: embedded defaults (config/default.toml), then an optional file, then
//! `MOSS_*` environment variables. Unknown keys are an error; loading never writes files.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::engine::SamplingParams;

/// The defaults, compiled into the binary so `moss` runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub engine: EngineConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub model: String,
    pub device: String,
    pub max_context: usize,
    pub queue_capacity: usize,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub system_prompt: String,
    pub token_delay_ms: u64,
    pub sampling: SamplingConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl SamplingConfig {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: (self.top_p > 0.0 && self.top_p < 1.0).then_some(self.top_p),
            top_k: (self.top_k > 0).then_some(self.top_k),
            repetition_penalty: self.repetition_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: (self.seed != 0).then_some(self.seed),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.is_file() {
                anyhow::bail!("config file {} does not exist", path.display());
            }
            fig = fig.merge(Toml::file(path));
        }
        // Only nested keys (`MOSS_SECTION__KEY`) are configuration; plain `MOSS_*` variables such as
        // MOSS_MODEL_DIR belong to scripts and tests.
        fig = fig.merge(
            Env::prefixed("MOSS_")
                .split("__")
                .filter(|k| k.as_str().contains('.')),
        );
        let cfg: Config = fig
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let e = &self.engine;
        anyhow::ensure!(
            e.max_context >= 16,
            "engine.max_context must be at least 16"
        );
        anyhow::ensure!(
            e.queue_capacity >= 1,
            "engine.queue_capacity must be at least 1"
        );
        anyhow::ensure!(e.max_tokens >= 1, "engine.max_tokens must be at least 1");
        let s = &e.sampling;
        anyhow::ensure!(
            (0.0..=5.0).contains(&s.temperature),
            "engine.sampling.temperature must be in 0..=5"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&s.top_p),
            "engine.sampling.top_p must be in 0..=1"
        );
        anyhow::ensure!(
            s.repetition_penalty > 0.0,
            "engine.sampling.repetition_penalty must be positive"
        );
        Ok(())
    }

    /// The model file: the configured path, else the default model in the cache.
    pub fn model_path(&self) -> Option<PathBuf> {
        (!self.engine.model.is_empty()).then(|| PathBuf::from(&self.engine.model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_validate() {
        let cfg: Config = Figment::from(Toml::string(DEFAULT_TOML)).extract().unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.engine.device, "auto");
        assert!(cfg.engine.system_prompt.contains("language"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let fig = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Toml::string("[engine]\nmodle = 'x'\n"));
        assert!(fig.extract::<Config>().is_err());
    }
}
