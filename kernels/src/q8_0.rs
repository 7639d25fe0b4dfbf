//! Q8_0 held as pairs of blocks, rearranged once at load so that a step needs one load, one
//! 8-bit dot-product instruction and one fused multiply-add per 64 weights (AVX-512 VNNI).
//!
//! A `Pair` holds two blocks a and b (64 values) in 64 bytes: byte i belongs to block a when its
//! group of four (i / 4) is even, to b when odd, at position p = (i / 8) * 4 + i % 4 of that
//! block (the same places as in a pair of `q5_0`). Once byte products are summed into 32-bit lanes, lane
//! l (bytes 4l..4l + 4) belongs to block l % 2: one vector [da, db, da, db, ...] (the two f16
//! scales broadcast and converted) scales all sixteen lanes.
//!
//! Weights are stored plus 128 (unsigned, the XOR of the sign bit), the form the unsigned-by-
//! signed multiply-add takes; the 128 · Σy that adds is taken away per lane with a sum the
//! activations carry (`Acts::neg`). Levels without VNNI undo the offset and multiply signed
//! bytes. Either way a lane's integer sum is exact, and every level (the scalar one too) runs the
//! same float steps on the same sixteen lanes in the same order, so all give the same bits; and a
//! row sums in the same order alone and in a batch.
//!
//! A row with an odd number of blocks ends with a pair padded by a zero block (scale 0).

use crate::blocks::{half, BlockQ8_0, QK};
use crate::cpu::Isa;
use crate::lanes::reduce16;
use crate::tiles::Unit;

/// Two Q8_0 blocks in the kernels' layout (see the module's documentation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    /// Scales of a and b (f16).
    pub d: [u16; 2],
    /// Values plus 128, interleaved by groups of four.
    pub qs: [u8; 64],
}
const _: () = assert!(std::mem::size_of::<Pair>() == 2 * std::mem::size_of::<BlockQ8_0>());

impl Default for Pair {
    fn default() -> Self {
        Self {
            d: [0; 2],
            qs: [128; 64],
        }
    }
}

/// A pair's activations (Q8_0), arranged like its weights.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct Acts {
    y: [i8; 64],
    /// Per 32-bit lane: -128 times the sum of the lane's four activations.
    neg: [i32; 16],
    /// Per lane: the activation scale of the lane's block.
    scale: [f32; 16],
}

/// Lanes of a pair: 32-bit sums of four byte products.
const LANES: usize = 16;

/// Which block of the pair (0: a, 1: b) byte `i` belongs to, and its position there.
fn place(i: usize) -> (usize, usize) {
    ((i / 4) % 2, (i / 8) * 4 + i % 4)
}

/// Rows of `kb` blocks as rows of `kb.div_ceil(2)` pairs.
pub fn pack(w: &[BlockQ8_0], kb: usize) -> Vec<Pair> {
    let mut out = Vec::with_capacity(w.len().div_ceil(2) + w.len() / kb.max(1));
    for row in w.chunks(kb.max(1)) {
        for two in row.chunks(2) {
            let blocks = [two[0], two.get(1).copied().unwrap_or_default()];
            let mut pair = Pair {
                d: [blocks[0].d, blocks[1].d],
                ..Pair::default()
            };
            for (i, q) in pair.qs.iter_mut().enumerate() {
                let (b, p) = place(i);
                *q = (blocks[b].qs[p] as u8) ^ 0x80;
            }
            out.push(pair);
        }
    }
    out
}

/// One packed row, dequantised into `out` (its `k` values; a padding block is dropped).
pub fn unpack(row: &[Pair], out: &mut [f32]) {
    for (n, pair) in row.iter().enumerate() {
        for (i, q) in pair.qs.iter().enumerate() {
            let (b, p) = place(i);
            let start = (2 * n + b) * QK;
            if start + QK > out.len() {
                continue;
            }
            out[start + p] = half(pair.d[b]) * (*q ^ 0x80) as i8 as f32;
        }
    }
}

/// A row of activations in blocks, arranged per pair.
fn arrange(xq: &[BlockQ8_0]) -> Vec<Acts> {
    xq.chunks(2)
        .map(|two| {
            let blocks = [two[0], two.get(1).copied().unwrap_or_default()];
            let mut a = Acts {
                y: [0; 64],
                neg: [0; LANES],
                scale: [0.0; LANES],
            };
            for (i, y) in a.y.iter_mut().enumerate() {
                let (b, p) = place(i);
                *y = blocks[b].qs[p];
            }
            for l in 0..LANES {
                let sum: i32 = a.y[4 * l..4 * l + 4].iter().map(|&y| y as i32).sum();
                a.neg[l] = -128 * sum;
                a.scale[l] = half(blocks[l % 2].d);
            }
            a
        })
        .collect()
}

/// The scalar level: the SIMD kernels' steps lane by lane (the same bits).
fn row_scalar(w: &[Pair], ys: &[Acts]) -> f32 {
    let mut acc = [[0f32; LANES]; 2];
    for (n, (x, y)) in w.iter().zip(ys).enumerate() {
        for l in 0..LANES {
            let dot: i32 = (4 * l..4 * l + 4)
                .map(|i| (x.qs[i] ^ 0x80) as i8 as i32 * y.y[i] as i32)
                .sum();
            let s = half(x.d[l % 2]) * y.scale[l];
            acc[n % 2][l] = s.mul_add(dot as f32, acc[n % 2][l]);
        }
    }
    reduce16(std::array::from_fn(|l| acc[0][l] + acc[1][l]))
}

impl Unit for Pair {
    const BLOCKS: usize = 2;
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
            // SAFETY: as above (the AVX-512 levels imply AVX2).
            Isa::Avx512 | Isa::Avx2 => unsafe { simd::rows_avx2(w, ys) },
            _ => std::array::from_fn(|r| row_scalar(w, ys[r])),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Acts, Pair};
    use crate::lanes::alternate;
    use crate::simd::{hsum, hsum16};
    use std::arch::x86_64::*;

    /// One weight row of pairs against N rows of activations, sixteen lanes in one register.
    /// Pairs alternate between two running sums, in the same order for every N.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn rows_vnni<const N: usize>(w: &[Pair], ys: [&[Acts]; N]) -> [f32; N] {
        for r in 0..N {
            assert!(ys[r].len() >= w.len());
        }
        let mut acc = [[_mm512_setzero_ps(); N]; 2];
        let step = |x: &Pair, p: usize, acc: &mut [__m512; N]| {
            let u = _mm512_loadu_si512(x.qs.as_ptr() as *const __m512i);
            let d = x.d[0] as u32 | (x.d[1] as u32) << 16;
            // [da, db, da, db, ...]
            let dw = _mm512_cvtph_ps(_mm256_set1_epi32(d as i32));
            for r in 0..N {
                let y = ys[r].get_unchecked(p);
                let dot = _mm512_dpbusd_epi32(
                    _mm512_load_si512(y.neg.as_ptr() as *const __m512i),
                    u,
                    _mm512_load_si512(y.y.as_ptr() as *const __m512i),
                );
                let s = _mm512_mul_ps(dw, _mm512_load_ps(y.scale.as_ptr()));
                acc[r] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(dot), acc[r]);
            }
        };
        alternate(w, &mut acc, step);
        std::array::from_fn(|r| hsum16(_mm512_add_ps(acc[0][r], acc[1][r])))
    }

    /// The same lanes as two 256-bit halves, signed bytes by maddubs (each 16-bit sum is at most
    /// 2 · 128 · 127, no saturation).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_avx2<const N: usize>(w: &[Pair], ys: [&[Acts]; N]) -> [f32; N] {
        for r in 0..N {
            assert!(ys[r].len() >= w.len());
        }
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        // [parity][half][row]
        let mut acc = [[[_mm256_setzero_ps(); N]; 2]; 2];
        let step = |x: &Pair, p: usize, acc: &mut [[__m256; N]; 2]| {
            let q = x.qs.as_ptr() as *const __m256i;
            let wq = [
                _mm256_xor_si256(_mm256_loadu_si256(q), flip),
                _mm256_xor_si256(_mm256_loadu_si256(q.add(1)), flip),
            ];
            let aw = [
                _mm256_sign_epi8(wq[0], wq[0]),
                _mm256_sign_epi8(wq[1], wq[1]),
            ];
            let d = x.d[0] as u32 | (x.d[1] as u32) << 16;
            let dw = _mm256_cvtph_ps(_mm_set1_epi32(d as i32));
            for r in 0..N {
                let y = ys[r].get_unchecked(p);
                let yv = y.y.as_ptr() as *const __m256i;
                for h in 0..2 {
                    let sy = _mm256_sign_epi8(_mm256_load_si256(yv.add(h)), wq[h]);
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[h], sy), ones);
                    let s = _mm256_mul_ps(dw, _mm256_load_ps(y.scale.as_ptr().add(8 * h)));
                    acc[h][r] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(dot), acc[h][r]);
                }
            }
        };
        alternate(w, &mut acc, step);
        std::array::from_fn(|r| {
            let lo = _mm256_add_ps(acc[0][0][r], acc[1][0][r]);
            let hi = _mm256_add_ps(acc[0][1][r], acc[1][1][r]);
            hsum(_mm256_add_ps(lo, hi))
        })
    }
}
