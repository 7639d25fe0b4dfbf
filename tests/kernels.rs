//! moss's quantized kernels (crate `moss-kernels`) against a plain dequantise-then-multiply
//! reference on random data, at every SIMD level this CPU has, and the pieces around them.

use half::f16;
use moss_kernels::*;
use rand::{Rng, SeedableRng};

fn half(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

fn random_q5_0(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<BlockQ5_0> {
    (0..n)
        .map(|_| BlockQ5_0 {
            d: f16::from_f32(rng.random_range(-0.05..0.05)).to_bits(),
            qh: rng.random(),
            qs: rng.random(),
        })
        .collect()
}

fn random_q8_0(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<BlockQ8_0> {
    (0..n)
        .map(|_| BlockQ8_0 {
            d: f16::from_f32(rng.random_range(-0.05..0.05)).to_bits(),
            // Activations never hold -128 (quantize_q8_0 maps to -127..=127), and the SIMD
            // sign trick relies on it.
            qs: std::array::from_fn(|_| rng.random_range(-127..=127)),
        })
        .collect()
}

/// Dequantise W, multiply in f64: the reference every kernel is held to.
fn reference<B: Block>(m: usize, k: usize, n: usize, x: &[f32], w: &[B]) -> Vec<f32> {
    let mut wf = vec![0f32; n * k];
    B::dequantize(w, &mut wf);
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|t| x[i * k + t] as f64 * wf[j * k + t] as f64)
                .sum();
            out[i * n + j] = s as f32;
        }
    }
    out
}

fn check<B: Block>(w: &[B], m: usize, k: usize, n: usize, rng: &mut rand::rngs::StdRng) {
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
    let want = reference(m, k, n, &x, w);
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(scale > 0.0, "non-trivial data");
    // The kernels round X to 8 bits per block (half a step, step = block max / 127, its
    // scale kept in f16): the error of each output is at most sum |w| * that.
    let mut wf = vec![0f32; n * k];
    B::dequantize(w, &mut wf);
    let bound = |i: usize, j: usize| -> f32 {
        (0..k / QK)
            .map(|b| {
                let xs = &x[i * k + b * QK..i * k + (b + 1) * QK];
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let ws: f32 = wf[j * k + b * QK..j * k + (b + 1) * QK]
                    .iter()
                    .map(|v| v.abs())
                    .sum();
                ws * (amax / 127.0 * 0.5 + amax * 2e-3)
            })
            .sum::<f32>()
            + 1e-5
    };
    for isa in available() {
        let mut got = vec![0f32; m * n];
        matmul(isa, (m, k, n), &x, w, &mut got).unwrap();
        for i in 0..m {
            for j in 0..n {
                let (g, r) = (got[i * n + j], want[i * n + j]);
                assert!(
                    (g - r).abs() <= bound(i, j),
                    "{:?} {isa:?} m={m} [{i},{j}]: {g} vs {r} (bound {})",
                    B::DTYPE,
                    bound(i, j)
                );
            }
        }
    }
}

#[test]
fn q5_0_kernels_match_the_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (m, k, n) in [(1, 64, 3), (1, 896, 37), (3, 896, 16), (8, 4864, 9)] {
        let w = random_q5_0(&mut rng, n * k / QK);
        check(&w, m, k, n, &mut rng);
    }
}

#[test]
fn q8_0_kernels_match_the_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    for (m, k, n) in [(1, 64, 3), (1, 896, 37), (5, 896, 16)] {
        let w = random_q8_0(&mut rng, n * k / QK);
        check(&w, m, k, n, &mut rng);
    }
}

#[test]
fn simd_and_scalar_dot_products_agree_exactly_on_integers() {
    // Same integer sums, same per-block scaling: only the float summation order differs.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let x = random_q5_0(&mut rng, 28);
    let y = random_q8_0(&mut rng, 28);
    let a = BlockQ5_0::dot(Isa::Scalar, &x, &y);
    for isa in available() {
        let b = BlockQ5_0::dot(isa, &x, &y);
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "{isa:?}: {a} vs {b}"
        );
    }
}

#[test]
fn q5_0_quantize_round_trips_within_a_step() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let x: Vec<f32> = (0..256).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut b = vec![random_q5_0(&mut rng, 1)[0]; 8];
    BlockQ5_0::quantize(&x, &mut b);
    let mut back = vec![0f32; 256];
    BlockQ5_0::dequantize(&b, &mut back);
    for (blk, (xs, ys)) in x.chunks(QK).zip(back.chunks(QK)).enumerate() {
        let step = half(b[blk].d).abs();
        for (a, r) in xs.iter().zip(ys) {
            // Half a step, except the far end opposite the largest value, which GGML's
            // scheme clamps (+16 is not representable): one step there.
            assert!(
                (a - r).abs() <= step * 1.01 + 1e-6,
                "{a} vs {r} (step {step})"
            );
        }
    }
}

#[test]
fn embedding_rows_are_the_dequantized_rows() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let blocks = random_q5_0(&mut rng, 4 * 2); // 4 rows of 64
    let bytes: Vec<u8> = blocks
        .iter()
        .flat_map(|b| {
            let mut v = b.d.to_le_bytes().to_vec();
            v.extend(b.qh);
            v.extend(b.qs);
            v
        })
        .collect();
    let fast = FastBlocks::<BlockQ5_0>::from_bytes(&bytes).unwrap();
    let rows = fast.rows(&[2, 0], 64).unwrap();
    let mut all = vec![0f32; 256];
    BlockQ5_0::dequantize(&blocks, &mut all);
    assert_eq!(&rows[..64], &all[128..192]);
    assert_eq!(&rows[64..], &all[..64]);
    assert!(fast.rows(&[4], 64).is_err());
}
