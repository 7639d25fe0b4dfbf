//! Bad model files give clear errors that name the file and the problem, never a panic.

mod common;

use std::io::Write;

use candle_core::quantized::gguf_file::{self, Value};
use common::tiny_model;
use moss::engine::{Arch, EngineHandle, EngineOptions, LoadError};

fn load(path: &std::path::Path) -> LoadError {
    let mut opts = EngineOptions::new(path);
    opts.device = "cpu".into();
    match EngineHandle::start(opts) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_file_names_the_path() {
    let e = load(std::path::Path::new("/nonexistent/model.gguf"));
    assert!(matches!(e, LoadError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/model.gguf"), "{e}");
}

#[test]
fn non_gguf_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, b"this is a text file, not a model\n").unwrap();
    let e = load(&path);
    assert!(matches!(e, LoadError::NotGguf { .. }), "{e:?}");
    assert!(
        e.to_string().contains("notes.gguf") && e.to_string().contains("not a GGUF"),
        "{e}"
    );
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(load(&path), LoadError::NotGguf { .. }));
}

#[test]
fn truncated_files_are_rejected_at_any_cut() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(tiny_model(dir.path(), Arch::Qwen2)).unwrap();
    let path = dir.path().join("cut.gguf");
    for cut in [5, 24, 100, full.len() / 4, full.len() / 2, full.len() - 1] {
        std::fs::write(&path, &full[..cut]).unwrap();
        let e = load(&path);
        assert!(
            matches!(e, LoadError::BadHeader { .. } | LoadError::Truncated { .. }),
            "cut at {cut}: {e:?}"
        );
        assert!(e.to_string().contains("cut.gguf"), "{e}");
    }
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    let arch = Value::String("mamba".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[]).unwrap();
    f.flush().unwrap();
    let e = load(&path);
    assert!(matches!(e, LoadError::UnsupportedArch { .. }), "{e:?}");
    assert!(
        e.to_string().contains("`mamba`") && e.to_string().contains("mamba.gguf"),
        "{e}"
    );
}

#[test]
fn gguf_without_weights_is_a_model_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty-qwen.gguf");
    let arch = Value::String("qwen2".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[]).unwrap();
    f.flush().unwrap();
    let e = load(&path);
    assert!(
        matches!(e, LoadError::Tokenizer { .. } | LoadError::Model { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("empty-qwen.gguf"), "{e}");
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    if candle_core::utils::cuda_is_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut opts = EngineOptions::new(tiny_model(dir.path(), Arch::Qwen2));
    opts.device = "cuda:0".into();
    let e = EngineHandle::start(opts).err().expect("cuda refused");
    assert!(e.to_string().contains("cuda"), "{e}");
    let mut opts = EngineOptions::new(dir.path().join("tiny-qwen2.gguf"));
    opts.device = "tpu".into();
    assert!(EngineHandle::start(opts)
        .err()
        .unwrap()
        .to_string()
        .contains("bad device"));
}
