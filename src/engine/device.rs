//! The model's device: a GPU's memory, read when the model loads (to refuse one that does not
//! fit, clearly, before anything is allocated) and by `/metrics`.

use candle_core::Device;

use super::LoadError;

/// A GPU's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub free: usize,
    pub total: usize,
}

/// The memory of `device` when it is a GPU (`None` on the CPU, or when the driver cannot say).
pub fn memory(device: &Device) -> Option<Memory> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::result;
            d.cuda_stream().context().bind_to_thread().ok()?;
            let (free, total) = result::mem_get_info().ok()?;
            Some(Memory { free, total })
        }
        _ => None,
    }
}

/// Refuses, naming the sizes, a model whose weights and key/value cache need more than the GPU
/// has free; logs the GPU's memory. Nothing to check on the CPU.
pub fn check_fits(
    device: &Device,
    weights: usize,
    kv_cache: usize,
) -> Result<Option<Memory>, LoadError> {
    let Some(m) = memory(device) else {
        return Ok(None);
    };
    const MB: usize = 1 << 20;
    tracing::info!(
        device = ?device,
        free_mb = m.free / MB,
        total_mb = m.total / MB,
        "GPU memory"
    );
    let need = weights + kv_cache;
    if need > m.free {
        return Err(LoadError::Device(format!(
            "the model ({} MB) and its key/value cache ({} MB) need {} MB on {device:?}, which has {} MB free \
             of {} MB; lower engine.kv_cache_mb or choose a smaller model",
            weights / MB,
            kv_cache / MB,
            need / MB,
            m.free / MB,
            m.total / MB
        )));
    }
    Ok(Some(m))
}
