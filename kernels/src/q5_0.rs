//! Q5_0 held as quads of blocks (two pairs), rearranged once at load so that each step unpacks
//! less.
//!
//! A pair holds two blocks a and b (64 values): 32 bytes of nibbles and two 32-bit masks of 5th
//! bits. Byte i belongs to block a when its group of four (i / 4) is even, to b when odd, at
//! position p = (i / 8) * 4 + i % 4 of that block: it is that block's GGUF byte `qs[p]` (low
//! nibble value p, high nibble value p + 16); bit i of `lo` is the 5th bit of value p, bit i of
//! `hi` that of value p + 16. So the low nibbles of the 32 bytes make one vector of values and the
//! high nibbles another, and once byte products are summed into 32-bit lanes, lane l belongs to
//! block l % 2: one vector [da, db, da, db, ...] (the two f16 scales broadcast and converted)
//! scales all lanes. A `Quad` holds two consecutive pairs of a row side by side (their nibbles one
//! after the other, their masks as 64-bit masks), so that AVX-512 takes both in one register:
//! its lower eight lanes are the even pairs' running sums, its upper eight the odd pairs'.
//!
//! Values stay unsigned (q = 0..31 stands for q - 16): the unsigned-by-signed byte multiply-adds
//! take them as they are, and the -16 · Σy they leave out is added per lane from a sum the
//! activations carry (`Acts::neg`). The integer sums are exact, and every level (the scalar one
//! too) runs the same float steps in the same order, so all give the same bits; and a row sums
//! in the same order alone and in a batch.
//!
//! A row whose block count is not a multiple of four ends with a quad padded by zero blocks
//! (scale 0), which add zero.

use crate::blocks::{half, BlockQ5_0, BlockQ8_0, QK};
use crate::cpu::Isa;
use crate::lanes::reduce8;
use crate::tiles::Unit;

/// Four Q5_0 blocks (two pairs) in the kernels' layout (see the module's documentation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quad {
    /// Scales of the first pair's a and b, then the second's (f16).
    pub d: [u16; 4],
    pub lo: u64,
    pub hi: u64,
    pub qs: [u8; 64],
}
const _: () = assert!(std::mem::size_of::<Quad>() == 4 * std::mem::size_of::<BlockQ5_0>());

impl Default for Quad {
    fn default() -> Self {
        Self {
            d: [0; 4],
            lo: 0,
            hi: 0,
            qs: [0; 64],
        }
    }
}

/// A quad's activations (Q8_0), arranged like its weights.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct Acts {
    /// The values matching the low nibbles (first pair, then second).
    ylo: [i8; 64],
    /// The values matching the high nibbles.
    yhi: [i8; 64],
    /// Per 32-bit lane: -16 times the sum of the lane's eight activations.
    neg: [i32; 16],
    /// Per lane: the activation scale of the lane's block.
    scale: [f32; 16],
}

/// Which block of its pair (0: a, 1: b) byte `i` of a pair belongs to, and its position there.
fn place(i: usize) -> (usize, usize) {
    ((i / 4) % 2, (i / 8) * 4 + i % 4)
}

/// Rows of `kb` blocks as rows of `kb.div_ceil(4)` quads.
pub fn pack(w: &[BlockQ5_0], kb: usize) -> Vec<Quad> {
    let mut out = Vec::with_capacity(w.len().div_ceil(4) + w.len() / kb.max(1));
    for row in w.chunks(kb.max(1)) {
        for four in row.chunks(4) {
            let block = |b: usize| four.get(b).copied().unwrap_or_default();
            let mut quad = Quad::default();
            for h in 0..2 {
                let blocks = [block(2 * h), block(2 * h + 1)];
                quad.d[2 * h] = blocks[0].d;
                quad.d[2 * h + 1] = blocks[1].d;
                for i in 0..32 {
                    let (b, p) = place(i);
                    let qh = u32::from_le_bytes(blocks[b].qh) as u64;
                    quad.qs[32 * h + i] = blocks[b].qs[p];
                    quad.lo |= ((qh >> p) & 1) << (32 * h + i);
                    quad.hi |= ((qh >> (p + 16)) & 1) << (32 * h + i);
                }
            }
            out.push(quad);
        }
    }
    out
}

/// One packed row, dequantised into `out` (its `k` values; padding blocks are dropped).
pub fn unpack(row: &[Quad], out: &mut [f32]) {
    for (n, quad) in row.iter().enumerate() {
        for j in 0..64 {
            let (h, i) = (j / 32, j % 32);
            let (b, p) = place(i);
            let start = (4 * n + 2 * h + b) * QK;
            if start + QK > out.len() {
                continue;
            }
            let d = half(quad.d[2 * h + b]);
            let lo = (quad.qs[j] & 0x0F) as u32 | (((quad.lo >> j) & 1) as u32) << 4;
            let hi = (quad.qs[j] >> 4) as u32 | (((quad.hi >> j) & 1) as u32) << 4;
            out[start + p] = d * (lo as i32 - 16) as f32;
            out[start + p + 16] = d * (hi as i32 - 16) as f32;
        }
    }
}

/// A row of activations in blocks, arranged per quad.
fn arrange(xq: &[BlockQ8_0]) -> Vec<Acts> {
    xq.chunks(4)
        .map(|four| {
            let block = |b: usize| {
                four.get(b)
                    .copied()
                    .unwrap_or(BlockQ8_0 { d: 0, qs: [0; 32] })
            };
            let mut a = Acts {
                ylo: [0; 64],
                yhi: [0; 64],
                neg: [0; 16],
                scale: [0.0; 16],
            };
            for h in 0..2 {
                let blocks = [block(2 * h), block(2 * h + 1)];
                for i in 0..32 {
                    let (b, p) = place(i);
                    a.ylo[32 * h + i] = blocks[b].qs[p];
                    a.yhi[32 * h + i] = blocks[b].qs[p + 16];
                }
                for l in 0..8 {
                    let sum: i32 = (32 * h + 4 * l..32 * h + 4 * l + 4)
                        .map(|i| a.ylo[i] as i32 + a.yhi[i] as i32)
                        .sum();
                    a.neg[8 * h + l] = -16 * sum;
                    a.scale[8 * h + l] = half(blocks[l % 2].d);
                }
            }
            a
        })
        .collect()
}

/// The scalar level: the SIMD kernels' steps lane by lane (the same bits). Lane l of a quad's
/// sixteen belongs to its pair l / 8 and sums into that parity's running sums.
fn row_scalar(w: &[Quad], ys: &[Acts]) -> f32 {
    let mut acc = [[0f32; 8]; 2];
    for (x, y) in w.iter().zip(ys) {
        for lane in 0..16 {
            let (h, l) = (lane / 8, lane % 8);
            let mut dot = y.neg[lane];
            for i in 32 * h + 4 * l..32 * h + 4 * l + 4 {
                let lo = (x.qs[i] & 0x0F) as i32 | ((x.lo >> i) & 1) as i32 * 16;
                let hi = (x.qs[i] >> 4) as i32 | ((x.hi >> i) & 1) as i32 * 16;
                dot += lo * y.ylo[i] as i32 + hi * y.yhi[i] as i32;
            }
            let s = half(x.d[2 * h + l % 2]) * y.scale[lane];
            acc[h][l] = s.mul_add(dot as f32, acc[h][l]);
        }
    }
    reduce8(std::array::from_fn(|l| acc[0][l] + acc[1][l]))
}

impl Unit for Quad {
    const BLOCKS: usize = 4;
    type Acts = Acts;

    fn arrange(xq: &[BlockQ8_0]) -> Vec<Acts> {
        arrange(xq)
    }

    #[inline(always)]
    fn rows<const N: usize>(isa: Isa, w: &[Self], ys: [&[Acts]; N]) -> [f32; N] {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` came through `supported`: the CPU has its features.
            Isa::Avx512Vnni => unsafe { simd::rows_vnni(w, ys) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx512 => unsafe { simd::rows_avx512(w, ys) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { simd::rows_avx2(w, ys) },
            _ => std::array::from_fn(|r| row_scalar(w, ys[r])),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Acts, Quad};
    use crate::simd::{hsum, hsum16};
    use std::arch::x86_64::*;

    /// `nib` with 16 added to the bytes whose bit is set in `bits` (AVX2: spread the bits to
    /// bytes and compare).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn high_avx2(bits: u32, nib: __m256i) -> __m256i {
        // Byte i of `bytes` holds byte i / 8 of the bits (lanes are 16 bytes: lane 1 reads 2, 3).
        let pick = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), pick);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
        _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
    }

    /// The same with AVX-512's byte masks: one masked add.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn high_mask(bits: u32, nib: __m256i) -> __m256i {
        _mm256_mask_add_epi8(nib, bits, nib, _mm256_set1_epi8(0x10))
    }

    /// Lane sums of lo·ylo + hi·yhi + neg (unsigned by signed bytes; each 16-bit sum is at most
    /// 4 · 31 · 127, no saturation).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(
        lo: __m256i,
        ylo: __m256i,
        hi: __m256i,
        yhi: __m256i,
        neg: __m256i,
    ) -> __m256i {
        let s = _mm256_add_epi16(_mm256_maddubs_epi16(lo, ylo), _mm256_maddubs_epi16(hi, yhi));
        _mm256_add_epi32(_mm256_madd_epi16(s, _mm256_set1_epi16(1)), neg)
    }

    /// One weight row of quads against N rows of activations, each quad as its two pairs in
    /// 256-bit registers, the first pair's lanes summing into one running sum and the second's
    /// into another, in the same order for every N.
    macro_rules! pair_kernel {
        ($features:literal, $name:ident, $high:ident) => {
            #[inline]
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const N: usize>(w: &[Quad], ys: [&[Acts]; N]) -> [f32; N] {
                for r in 0..N {
                    assert!(ys[r].len() >= w.len());
                }
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = [[_mm256_setzero_ps(); N]; 2];
                for (p, x) in w.iter().enumerate() {
                    for h in 0..2 {
                        let raw = _mm256_loadu_si256(x.qs.as_ptr().add(32 * h) as *const __m256i);
                        let lo = $high((x.lo >> (32 * h)) as u32, _mm256_and_si256(raw, mask));
                        let hi = $high(
                            (x.hi >> (32 * h)) as u32,
                            _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask),
                        );
                        let d = x.d[2 * h] as u32 | (x.d[2 * h + 1] as u32) << 16;
                        // [da, db, da, db, ...]
                        let dw = _mm256_cvtph_ps(_mm_set1_epi32(d as i32));
                        for r in 0..N {
                            let y = ys[r].get_unchecked(p);
                            let dot = dot_avx2(
                                lo,
                                _mm256_load_si256(y.ylo.as_ptr().add(32 * h) as *const __m256i),
                                hi,
                                _mm256_load_si256(y.yhi.as_ptr().add(32 * h) as *const __m256i),
                                _mm256_load_si256(y.neg.as_ptr().add(8 * h) as *const __m256i),
                            );
                            let s = _mm256_mul_ps(dw, _mm256_load_ps(y.scale.as_ptr().add(8 * h)));
                            acc[h][r] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(dot), acc[h][r]);
                        }
                    }
                }
                std::array::from_fn(|r| hsum(_mm256_add_ps(acc[0][r], acc[1][r])))
            }
        };
    }

    pair_kernel!("avx2,fma,f16c", rows_avx2, high_avx2);
    pair_kernel!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl",
        rows_avx512,
        high_mask
    );

    /// AVX-512 with VNNI: a whole quad in one register, its sixteen lanes the two pairs' running
    /// sums side by side.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn rows_vnni<const N: usize>(w: &[Quad], ys: [&[Acts]; N]) -> [f32; N] {
        for r in 0..N {
            assert!(ys[r].len() >= w.len());
        }
        let mask = _mm512_set1_epi8(0x0F);
        let sixteen = _mm512_set1_epi8(0x10);
        // The first pair's two scales for lanes 0-7, the second's for 8-15.
        let spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        let mut acc = [_mm512_setzero_ps(); N];
        for (p, x) in w.iter().enumerate() {
            let raw = _mm512_loadu_si512(x.qs.as_ptr() as *const __m512i);
            let nib = _mm512_and_si512(raw, mask);
            let lo = _mm512_mask_add_epi8(nib, x.lo, nib, sixteen);
            let nib = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
            let hi = _mm512_mask_add_epi8(nib, x.hi, nib, sixteen);
            let d = _mm256_castsi128_si256(_mm_loadl_epi64(x.d.as_ptr() as *const __m128i));
            // [da, db, da, db, ... | dc, dd, dc, dd, ...]
            let dw = _mm512_cvtph_ps(_mm256_permutevar8x32_epi32(d, spread));
            for r in 0..N {
                let y = ys[r].get_unchecked(p);
                let dot = _mm512_dpbusd_epi32(
                    _mm512_dpbusd_epi32(
                        _mm512_load_si512(y.neg.as_ptr() as *const __m512i),
                        lo,
                        _mm512_load_si512(y.ylo.as_ptr() as *const __m512i),
                    ),
                    hi,
                    _mm512_load_si512(y.yhi.as_ptr() as *const __m512i),
                );
                let s = _mm512_mul_ps(dw, _mm512_load_ps(y.scale.as_ptr()));
                acc[r] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(dot), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum16(acc[r]))
    }
}
