//! The GGUF block types these kernels handle, how each is laid out for them (`Block::Packed`),
//! and rounding activations to Q8_0.

use candle_core::quantized::GgmlDType;
use candle_core::Result;
use half::f16;

use crate::cpu::Isa;
use crate::tiles::matmul_units;
use crate::{q5_0, q8_0};

/// Values per block (Q5_0 and Q8_0).
pub const QK: usize = 32;

/// GGUF Q5_0: 32 values `d * (q - 16)`, q 5 bits: low 4 bits in `qs` (value j in the low nibble
/// of byte j, value j+16 in its high nibble), 5th bit j in bit j of `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ5_0 {
    pub d: u16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

/// GGUF Q8_0: 32 values `d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

#[inline]
pub(crate) fn half(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// A block type these kernels handle.
pub trait Block: Copy + Default + Send + Sync + 'static {
    const DTYPE: GgmlDType;
    /// The layout the kernels read, which `FastBlocks` holds: groups of blocks rearranged so that
    /// each step does less unpacking (`q5_0::Quad`, `q8_0::Pair`).
    type Packed: Copy + Send + Sync + 'static;
    fn dequantize(blocks: &[Self], out: &mut [f32]);
    fn quantize(xs: &[f32], out: &mut [Self]);
    /// Rows of `kb` blocks in the kernels' layout.
    fn pack(w: Vec<Self>, kb: usize) -> Vec<Self::Packed>;
    /// Packed units in a row of `kb` blocks.
    fn packed_len(kb: usize) -> usize;
    /// One packed row, dequantised into `out` (the row's values).
    fn unpack(row: &[Self::Packed], out: &mut [f32]);
    /// `matmul` on packed weights (rows of `packed_len(k / QK)` units).
    fn matmul_packed(
        isa: Isa,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        w: &[Self::Packed],
        dst: &mut [f32],
    ) -> Result<()>;
}

impl Block for BlockQ5_0 {
    const DTYPE: GgmlDType = GgmlDType::Q5_0;
    type Packed = q5_0::Quad;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        for (b, out) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = half(b.d);
            let qh = u32::from_le_bytes(b.qh);
            for j in 0..16 {
                let lo = (b.qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
                let hi = (b.qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                out[j] = d * (lo as i32 - 16) as f32;
                out[j + 16] = d * (hi as i32 - 16) as f32;
            }
        }
    }

    fn quantize(xs: &[f32], out: &mut [Self]) {
        for (x, b) in xs.chunks_exact(QK).zip(out.iter_mut()) {
            // The value of largest magnitude maps to -16, as GGML does.
            let max = x
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qh = 0u32;
            for j in 0..16 {
                let q0 = ((x[j] * id + 16.5) as i32).clamp(0, 31) as u32;
                let q1 = ((x[j + 16] * id + 16.5) as i32).clamp(0, 31) as u32;
                b.qs[j] = (q0 & 0x0F) as u8 | ((q1 & 0x0F) as u8) << 4;
                qh |= ((q0 >> 4) & 1) << j | ((q1 >> 4) & 1) << (j + 16);
            }
            b.qh = qh.to_le_bytes();
            b.d = f16::from_f32(d).to_bits();
        }
    }

    fn pack(w: Vec<Self>, kb: usize) -> Vec<q5_0::Quad> {
        q5_0::pack(&w, kb)
    }

    fn packed_len(kb: usize) -> usize {
        kb.div_ceil(4)
    }

    fn unpack(row: &[q5_0::Quad], out: &mut [f32]) {
        q5_0::unpack(row, out)
    }

    fn matmul_packed(
        isa: Isa,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        w: &[q5_0::Quad],
        dst: &mut [f32],
    ) -> Result<()> {
        matmul_units(isa, mkn, lhs, w, dst)
    }
}

impl Block for BlockQ8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    type Packed = q8_0::Pair;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        for (b, out) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = half(b.d);
            for (o, q) in out.iter_mut().zip(b.qs) {
                *o = d * q as f32;
            }
        }
    }

    fn quantize(xs: &[f32], out: &mut [Self]) {
        quantize_q8_0(xs, out)
    }

    fn pack(w: Vec<Self>, kb: usize) -> Vec<q8_0::Pair> {
        q8_0::pack(&w, kb)
    }

    fn packed_len(kb: usize) -> usize {
        kb.div_ceil(2)
    }

    fn unpack(row: &[q8_0::Pair], out: &mut [f32]) {
        q8_0::unpack(row, out)
    }

    fn matmul_packed(
        isa: Isa,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        w: &[q8_0::Pair],
        dst: &mut [f32],
    ) -> Result<()> {
        matmul_units(isa, mkn, lhs, w, dst)
    }
}

/// Rounds activations to Q8_0 blocks (the other operand of every dot product).
pub fn quantize_q8_0(xs: &[f32], out: &mut [BlockQ8_0]) {
    for (x, b) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in b.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
        b.d = f16::from_f32(d).to_bits();
    }
}
