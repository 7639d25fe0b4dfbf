//! How the kernels' lanes of partial sums are added up at the end of a row, written out for the
//! scalar levels (the SIMD kernels add in exactly this order, so every level gives the same bits).

/// Eight lanes: ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), `simd::hsum`'s order.
pub(crate) fn reduce8(h: [f32; 8]) -> f32 {
    ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]))
}

/// Sixteen lanes: the upper eight onto the lower, then `reduce8`.
pub(crate) fn reduce16(v: [f32; 16]) -> f32 {
    reduce8(std::array::from_fn(|l| v[l] + v[l + 8]))
}
