//! Q5_0 held as pairs of blocks, rearranged once at load so that each step unpacks less.
//!
//! A `Pair` holds two blocks a and b (64 values): 32 bytes of nibbles and two 32-bit masks of
//! 5th bits. Byte i belongs to block a when its group of four (i / 4) is even, to b when odd, at
//! position p = (i / 8) * 4 + i % 4 of that block: it is that block's GGUF byte `qs[p]` (low
//! nibble value p, high nibble value p + 16); bit i of `lo` is the 5th bit of value p, bit i of
//! `hi` that of value p + 16. So the low nibbles of the 32 bytes make one vector of values and the
//! high nibbles another, and once byte products are summed into 32-bit lanes, lane l belongs to
//! block l % 2: one vector [da, db, da, db, ...] (the two f16 scales broadcast and converted)
//! scales all lanes.
//!
//! Values stay unsigned (q = 0..31 stands for q - 16): the unsigned-by-signed byte multiply-adds
//! take them as they are, and the -16 · Σy they leave out is added per lane from a sum the
//! activations carry (`Acts::neg`). The integer sums are exact, and every level (the scalar one
//! too) runs the same float steps in the same order, so all give the same bits; and a row sums
//! in the same order alone and in a batch.
//!
//! A row with an odd number of blocks ends with a pair padded by a zero block (scale 0).

use crate::blocks::{half, BlockQ5_0, BlockQ8_0, QK};
use crate::cpu::{supported, Isa};
use crate::lanes::reduce8;
use crate::tiles::{prepare, run, Out, Tiles};
use candle_core::Result;

/// Two Q5_0 blocks in the kernels' layout (see the module's documentation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pair {
    /// Scales of a and b (f16).
    pub d: [u16; 2],
    pub lo: u32,
    pub hi: u32,
    pub qs: [u8; 32],
}
const _: () = assert!(std::mem::size_of::<Pair>() == 2 * std::mem::size_of::<BlockQ5_0>());

/// A pair's activations (Q8_0), arranged like its weights.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug)]
pub struct Acts {
    /// The values matching the low nibbles, then those matching the high nibbles.
    y: [i8; 64],
    /// Per 32-bit lane: -16 times the sum of the lane's eight activations.
    neg: [i32; 8],
    /// Per lane: the activation scale of the lane's block.
    scale: [f32; 8],
}

/// Which block of the pair (0: a, 1: b) byte `i` belongs to, and its position there.
fn place(i: usize) -> (usize, usize) {
    ((i / 4) % 2, (i / 8) * 4 + i % 4)
}

/// Rows of `kb` blocks as rows of `kb.div_ceil(2)` pairs.
pub fn pack(w: &[BlockQ5_0], kb: usize) -> Vec<Pair> {
    let mut out = Vec::with_capacity(w.len().div_ceil(2) + w.len() / kb.max(1));
    for row in w.chunks(kb.max(1)) {
        for two in row.chunks(2) {
            let blocks = [two[0], two.get(1).copied().unwrap_or_default()];
            let mut pair = Pair {
                d: [blocks[0].d, blocks[1].d],
                ..Pair::default()
            };
            for i in 0..32 {
                let (b, p) = place(i);
                let qh = u32::from_le_bytes(blocks[b].qh);
                pair.qs[i] = blocks[b].qs[p];
                pair.lo |= ((qh >> p) & 1) << i;
                pair.hi |= ((qh >> (p + 16)) & 1) << i;
            }
            out.push(pair);
        }
    }
    out
}

/// One packed row, dequantised into `out` (its `k` values; a padding block is dropped).
pub fn unpack(row: &[Pair], out: &mut [f32]) {
    for (n, pair) in row.iter().enumerate() {
        for i in 0..32 {
            let (b, p) = place(i);
            let start = (2 * n + b) * QK;
            if start + QK > out.len() {
                continue;
            }
            let d = half(pair.d[b]);
            let lo = (pair.qs[i] & 0x0F) as u32 | ((pair.lo >> i) & 1) << 4;
            let hi = (pair.qs[i] >> 4) as u32 | ((pair.hi >> i) & 1) << 4;
            out[start + p] = d * (lo as i32 - 16) as f32;
            out[start + p + 16] = d * (hi as i32 - 16) as f32;
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
                neg: [0; 8],
                scale: [0.0; 8],
            };
            for i in 0..32 {
                let (b, p) = place(i);
                a.y[i] = blocks[b].qs[p];
                a.y[32 + i] = blocks[b].qs[p + 16];
            }
            for l in 0..8 {
                let sum: i32 = (4 * l..4 * l + 4)
                    .map(|i| a.y[i] as i32 + a.y[32 + i] as i32)
                    .sum();
                a.neg[l] = -16 * sum;
                a.scale[l] = half(blocks[l % 2].d);
            }
            a
        })
        .collect()
}

/// The scalar level: the SIMD kernels' steps lane by lane (the same bits).
fn row_scalar(w: &[Pair], ys: &[Acts]) -> f32 {
    let mut acc = [[0f32; 8]; 2];
    for (n, (x, y)) in w.iter().zip(ys).enumerate() {
        for l in 0..8 {
            let mut dot = y.neg[l];
            for i in 4 * l..4 * l + 4 {
                let lo = (x.qs[i] & 0x0F) as i32 | ((x.lo >> i) & 1) as i32 * 16;
                let hi = (x.qs[i] >> 4) as i32 | ((x.hi >> i) & 1) as i32 * 16;
                dot += lo * y.y[i] as i32 + hi * y.y[32 + i] as i32;
            }
            let s = half(x.d[l % 2]) * y.scale[l];
            acc[n % 2][l] = s.mul_add(dot as f32, acc[n % 2][l]);
        }
    }
    reduce8(std::array::from_fn(|l| acc[0][l] + acc[1][l]))
}

/// `dst[i][j] = X[i] · W[j]` (see `crate::matmul`) with W in pairs.
pub fn matmul(
    isa: Isa,
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    w: &[Pair],
    dst: &mut [f32],
) -> Result<()> {
    let isa = supported(isa);
    let xq = prepare((m, k, n), lhs, w.len(), |kb| kb.div_ceil(2), dst)?;
    let kb = k / QK;
    let acts: Vec<Acts> = xq.chunks_exact(kb).flat_map(arrange).collect();
    let job = Job {
        isa,
        per_row: kb.div_ceil(2),
        w,
        acts: &acts,
        out: Out::new(m, n, dst),
    };
    run(isa, &job);
    Ok(())
}

struct Job<'a> {
    isa: Isa,
    per_row: usize,
    w: &'a [Pair],
    acts: &'a [Acts],
    out: Out,
}

impl Tiles for Job<'_> {
    fn out(&self) -> &Out {
        &self.out
    }

    #[inline(always)]
    fn tile<const N: usize>(&self, j: usize, i: usize) -> [f32; N] {
        let per = self.per_row;
        let w = &self.w[j * per..(j + 1) * per];
        let ys: [&[Acts]; N] =
            std::array::from_fn(|t| &self.acts[(i + t) * per..(i + t + 1) * per]);
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `matmul` took `isa` through `supported`: the CPU has its features.
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
    use super::{Acts, Pair};
    use crate::simd::hsum;
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

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot_vnni(
        lo: __m256i,
        ylo: __m256i,
        hi: __m256i,
        yhi: __m256i,
        neg: __m256i,
    ) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(neg, lo, ylo), hi, yhi)
    }

    /// One weight row of pairs against N rows of activations. Pairs alternate between two
    /// running sums (two chains of fused multiply-adds at once), in the same order for every N.
    macro_rules! pair_kernel {
        ($features:literal, $name:ident, $high:ident, $dot:ident) => {
            #[inline]
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const N: usize>(w: &[Pair], ys: [&[Acts]; N]) -> [f32; N] {
                for r in 0..N {
                    assert!(ys[r].len() >= w.len());
                }
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = [[_mm256_setzero_ps(); N]; 2];
                let step = |x: &Pair, p: usize, acc: &mut [__m256; N]| {
                    let raw = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
                    let lo = $high(x.lo, _mm256_and_si256(raw, mask));
                    let hi = $high(x.hi, _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask));
                    let d = x.d[0] as u32 | (x.d[1] as u32) << 16;
                    // [da, db, da, db, ...]
                    let dw = _mm256_cvtph_ps(_mm_set1_epi32(d as i32));
                    for r in 0..N {
                        let y = ys[r].get_unchecked(p);
                        let v = y.y.as_ptr() as *const __m256i;
                        let dot = $dot(
                            lo,
                            _mm256_load_si256(v),
                            hi,
                            _mm256_load_si256(v.add(1)),
                            _mm256_load_si256(y.neg.as_ptr() as *const __m256i),
                        );
                        let s = _mm256_mul_ps(dw, _mm256_load_ps(y.scale.as_ptr()));
                        acc[r] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(dot), acc[r]);
                    }
                };
                let [even, odd] = &mut acc;
                for (p, two) in w.chunks_exact(2).enumerate() {
                    step(&two[0], 2 * p, even);
                    step(&two[1], 2 * p + 1, odd);
                }
                if w.len() % 2 == 1 {
                    step(&w[w.len() - 1], w.len() - 1, even);
                }
                std::array::from_fn(|r| hsum(_mm256_add_ps(acc[0][r], acc[1][r])))
            }
        };
    }

    pair_kernel!("avx2,fma,f16c", rows_avx2, high_avx2, dot_avx2);
    pair_kernel!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl",
        rows_avx512,
        high_mask,
        dot_avx2
    );
    pair_kernel!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        rows_vnni,
        high_mask,
        dot_vnni
    );
}
