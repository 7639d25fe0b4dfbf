//! moss-kernels: quantized matrix products for the GGUF block types candle 0.11 leaves scalar on x86: Q5_0
//! (two thirds of the bytes of the default Q4_K_M model) and, for completeness, Q8_0.
//!
//! `W` is a GGUF weight matrix of `n` rows of `k` values (blocks of 32); `X` is `m` rows of `k`
//! f32 activations. `matmul` quantises each row of X to Q8_0 once, then computes every output
//! with an integer dot product: AVX-512 (with or without VNNI) or AVX2 when the CPU has it
//! (checked at run time, so a portable build is fast too), else a plain scalar loop. Q5_0 is held
//! rearranged in pairs of blocks (`q5_0`), which the kernels unpack with less work. Work is split over weight rows on candle's own thread
//! pool; each weight row is read once for all rows of X (prefill and batched decode).
//!
//! `QuantizedType` lets a candle `QTensor` hold these blocks, so `QMatMul` uses them unchanged.
//!
//! A crate of its own so that it is compiled optimised even in test builds (see the root
//! Cargo.toml's `[profile.dev.package."*"]`): SIMD intrinsics unoptimised are slower than the
//! scalar loop. Its tests are in the root package (`tests/kernels.rs`).

pub mod attention;
mod blocks;
mod candle;
mod cpu;
pub mod prefill;
pub mod q5_0;
#[cfg(target_arch = "x86_64")]
mod simd;
pub mod softmax;
mod tiles;

pub use blocks::{quantize_q8_0, Block, BlockQ5_0, BlockQ8_0, QK};
pub use candle::{accelerate, batch_sensitive, forward_rows, FastBlocks};
pub use cpu::{available, isa, supported, Isa};
pub use tiles::matmul;
