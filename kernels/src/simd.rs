//! The x86-64 kernels: AVX2, AVX-512 and AVX-512 VNNI integer dot products for Q8_0, and the
//! horizontal sums and scale conversions the Q5_0 pair kernels share.

use crate::blocks::BlockQ8_0;
use std::arch::x86_64::*;

/// An f16 block scale as f32, with F16C (inlined into the kernels).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn half(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_q8_0(b: &BlockQ8_0) -> __m256i {
    _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i)
}

/// One weight row against N activation rows: each weight block is unpacked once for all N.
/// `$dot` turns (|x| unsigned, y with x's sign) bytes into 8 lanes of i32 sums.
macro_rules! rows_kernel {
    ($features:literal, $name:ident, $unpack:ident, $W:ty, $dot:ident) => {
        #[inline]
        #[target_feature(enable = $features)]
        pub unsafe fn $name<const N: usize>(
            w: &[$W],
            ys: [&[BlockQ8_0]; N],
            yd: [&[f32]; N],
        ) -> [f32; N] {
            for r in 0..N {
                assert!(ys[r].len() >= w.len() && yd[r].len() >= w.len());
            }
            // Blocks go in pairs, even ones into one running sum and odd ones into another,
            // so that two chains of fused multiply-adds run at once. The order is the same
            // for every N, so a row sums alike alone and in a batch.
            let mut acc = [_mm256_setzero_ps(); N];
            let mut odd = [_mm256_setzero_ps(); N];
            let pairs = w.len() / 2;
            for p in 0..pairs {
                let (b0, b1) = (2 * p, 2 * p + 1);
                let (x0, x1) = (w.get_unchecked(b0), w.get_unchecked(b1));
                let (q0, q1) = ($unpack(x0), $unpack(x1));
                // maddubs / dpbusd multiply unsigned by signed bytes: |x| and y with x's sign
                // (activations never hold -128, so the sign flip cannot overflow).
                let (a0, a1) = (_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(q1, q1));
                let (d0, d1) = (half(x0.d), half(x1.d));
                for r in 0..N {
                    let y0 = ys[r].get_unchecked(b0);
                    let y1 = ys[r].get_unchecked(b1);
                    let s0 =
                        _mm256_sign_epi8(_mm256_loadu_si256(y0.qs.as_ptr() as *const __m256i), q0);
                    let s1 =
                        _mm256_sign_epi8(_mm256_loadu_si256(y1.qs.as_ptr() as *const __m256i), q1);
                    let p0 = _mm256_cvtepi32_ps($dot(a0, s0));
                    let p1 = _mm256_cvtepi32_ps($dot(a1, s1));
                    let c0 = _mm256_set1_ps(d0 * *yd[r].get_unchecked(b0));
                    let c1 = _mm256_set1_ps(d1 * *yd[r].get_unchecked(b1));
                    acc[r] = _mm256_fmadd_ps(c0, p0, acc[r]);
                    odd[r] = _mm256_fmadd_ps(c1, p1, odd[r]);
                }
            }
            if w.len() % 2 == 1 {
                let b = w.len() - 1;
                let x = w.get_unchecked(b);
                let qx = $unpack(x);
                let ax = _mm256_sign_epi8(qx, qx);
                let dw = half(x.d);
                for r in 0..N {
                    let y = ys[r].get_unchecked(b);
                    let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                    let p = _mm256_cvtepi32_ps($dot(ax, _mm256_sign_epi8(qy, qx)));
                    let scale = _mm256_set1_ps(dw * *yd[r].get_unchecked(b));
                    acc[r] = _mm256_fmadd_ps(scale, p, acc[r]);
                }
            }
            let mut out = [0f32; N];
            for r in 0..N {
                out[r] = hsum(_mm256_add_ps(acc[r], odd[r]));
            }
            out
        }
    };
}

pub mod avx2 {
    use super::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot(ax: __m256i, sy: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
    }

    rows_kernel!("avx2,fma,f16c", rows_q8_0, unpack_q8_0, BlockQ8_0, dot);
}

/// Two blocks per 512-bit register (AVX-512 BW); activations as plain bytes. `$dot` and
/// `$dot256` turn (|x| unsigned, y with x's sign) bytes into i32 lane sums, 512 and 256 bits.
macro_rules! wide_kernel {
    ($features:literal, $name:ident, $unpack:ident, $W:ty, $dot:ident, $dot256:ident) => {
        #[inline]
        #[target_feature(enable = $features)]
        pub unsafe fn $name<const N: usize>(w: &[$W], ys: [&[i8]; N], yd: [&[f32]; N]) -> [f32; N] {
            let kb = w.len();
            for r in 0..N {
                assert!(ys[r].len() >= kb * 32 && yd[r].len() >= kb);
            }
            // Lanes 0-7 take element 0, lanes 8-15 element 1.
            let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
            let zero = _mm512_setzero_si512();
            let mut acc = [_mm512_setzero_ps(); N];
            for p in 0..kb / 2 {
                let (a, b) = (&w[2 * p], &w[2 * p + 1]);
                let qx = _mm512_inserti64x4(_mm512_castsi256_si512($unpack(a)), $unpack(b), 1);
                let ax = _mm512_abs_epi8(qx);
                let negative = _mm512_movepi8_mask(qx);
                let dw = _mm512_permutexvar_ps(
                    halves,
                    _mm512_castps128_ps512(_mm_setr_ps(half(a.d), half(b.d), 0.0, 0.0)),
                );
                for r in 0..N {
                    let qy = _mm512_loadu_si512(ys[r].as_ptr().add(64 * p) as *const __m512i);
                    // y takes x's sign, so |x| (unsigned) times it is x times y.
                    let sy = _mm512_mask_sub_epi8(qy, negative, zero, qy);
                    let d = _mm512_cvtepi32_ps($dot(ax, sy));
                    let two = _mm_setr_ps(
                        *yd[r].get_unchecked(2 * p),
                        *yd[r].get_unchecked(2 * p + 1),
                        0.0,
                        0.0,
                    );
                    let dy = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(two));
                    acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dy), d, acc[r]);
                }
            }
            let mut out = [0f32; N];
            for r in 0..N {
                out[r] = _mm512_reduce_add_ps(acc[r]);
            }
            if kb % 2 == 1 {
                // The odd last block, 256 bits wide.
                let x = &w[kb - 1];
                let qx = $unpack(x);
                let ax = _mm256_sign_epi8(qx, qx);
                for r in 0..N {
                    let qy =
                        _mm256_loadu_si256(ys[r].as_ptr().add(32 * (kb - 1)) as *const __m256i);
                    let sy = _mm256_sign_epi8(qy, qx);
                    let v = _mm256_cvtepi32_ps($dot256(ax, sy));
                    out[r] += half(x.d) * yd[r][kb - 1] * hsum(v);
                }
            }
            out
        }
    };
}

/// AVX-512 with VNNI: one instruction per 8-bit dot product.
pub mod vnni {
    use super::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot(ax: __m512i, sy: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sy)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot256(ax: __m256i, sy: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
    }

    wide_kernel!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        rows_q8_0,
        unpack_q8_0,
        BlockQ8_0,
        dot,
        dot256
    );
}
