//! What the x86-64 kernels share: horizontal sums in `lanes`' order.

use std::arch::x86_64::*;

/// The sum of the eight lanes, in the order every level of a pair kernel reproduces:
/// ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The sum of sixteen lanes: the upper eight onto the lower, then `hsum`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub(crate) unsafe fn hsum16(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    hsum(_mm256_add_ps(lo, hi))
}
