//! How the kernels' lanes of partial sums are kept and added up at the end of a row, written out
//! for the scalar levels too (the SIMD kernels add in exactly this order, so every level gives the
//! same bits).

/// Eight lanes: ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), `simd::hsum`'s order.
pub(crate) fn reduce8(h: [f32; 8]) -> f32 {
    ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]))
}

/// Sixteen lanes: the upper eight onto the lower, then `reduce8`.
pub(crate) fn reduce16(v: [f32; 16]) -> f32 {
    reduce8(std::array::from_fn(|l| v[l] + v[l + 8]))
}

/// Each unit of `w` in turn with its index, even ones into `acc[0]` and odd ones into `acc[1]`
/// (two chains of fused multiply-adds at once), in the same order for every batch size.
#[inline(always)]
pub(crate) fn alternate<W, A>(w: &[W], acc: &mut [A; 2], mut step: impl FnMut(&W, usize, &mut A)) {
    let [even, odd] = acc;
    for (p, two) in w.chunks_exact(2).enumerate() {
        step(&two[0], 2 * p, even);
        step(&two[1], 2 * p + 1, odd);
    }
    if w.len() % 2 == 1 {
        step(&w[w.len() - 1], w.len() - 1, even);
    }
}
