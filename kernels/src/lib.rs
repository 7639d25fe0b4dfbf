//! moss-kernels: quantized matrix products for the GGUF block types of the default Q4_K_M model,
//! where they beat candle 0.11's: Q5_0 (which candle leaves scalar on x86; more than half the
//! bytes) and Q8_0 (its output projection, a third of the bytes a decoding step reads; see
//! `candle` for the shapes that stay with candle's own repacked kernels).
//!
//! `W` is a GGUF weight matrix of `n` rows of `k` values; `X` is `m` rows of `k` f32 activations.
//! `matmul` quantises each row of X to Q8_0 once, then computes every output with integer dot
//! products: AVX-512 (with or without VNNI) or AVX2 when the CPU has it (checked at run time, so a
//! portable build is fast too), else a plain scalar loop that takes the same float steps (every
//! level gives the same bits). The weights are held rearranged in groups of blocks (`q5_0`:
//! four, `q8_0`: two), which the kernels read with less work. Work is split over weight
//! rows on candle's own thread pool; each weight row is read once for all rows of X (prefill and
//! batched decode), a row summing in the same order alone and in a batch.
//!
//! `QuantizedType` lets a candle `QTensor` hold these blocks (embedding rows, sizes); `Product`
//! multiplies by them (see `candle`).
//!
//! A crate of its own so that it is compiled optimised even in test builds (see the root
//! Cargo.toml's `[profile.dev.package."*"]`): SIMD intrinsics unoptimised are slower than the
//! scalar loop. Its tests are in the root package (`tests/kernels.rs`).

pub mod attention;
mod blocks;
mod candle;
mod cpu;
mod lanes;
pub mod prefill;
pub mod q5_0;
pub mod q8_0;
#[cfg(target_arch = "x86_64")]
mod simd;
pub mod softmax;
mod tiles;

pub use blocks::{quantize_q8_0, Block, BlockQ5_0, BlockQ8_0, QK};
pub use candle::{batch_sensitive, forward_rows, FastBlocks, Matrix};
pub use cpu::{available, isa, supported, Isa};
pub use tiles::matmul;
