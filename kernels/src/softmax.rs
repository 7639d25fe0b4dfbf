//! Softmax over a row of attention scores whose visible columns are one range (a causal mask,
//! with a sliding window, without a mask tensor), with an exponential the compiler vectorises:
//! at long contexts a prompt chunk's scores number heads × chunk × context, and a libm `exp` per
//! score would cost more than the two matrix products around it.

/// e^x, within 2e-7 relative for x in [-87, 88] (clamped outside): 2^n · e^r with r in
/// [-ln2/2, ln2/2] and a degree-6 polynomial for e^r. Branch-free, so a loop of it vectorises.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n · LN2_HI is exact (Cody and Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and taking away 1.5 · 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// Writes softmax(`row[lo..hi]`) into `out[lo..hi]` and zeros elsewhere; sums in a fixed order.
pub fn softmax_range(row: &[f32], (lo, hi): (usize, usize), out: &mut [f32]) {
    out.fill(0.0);
    if lo >= hi {
        return;
    }
    let (src, dst) = (&row[lo..hi], &mut out[lo..hi]);
    let max = src.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = exp(s - max);
    }
    let mut acc = [0f32; 8];
    let chunks = dst.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    for (i, v) in rest.iter().enumerate() {
        acc[i] += v;
    }
    let sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}
