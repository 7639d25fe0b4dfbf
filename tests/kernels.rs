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
            // Weights may hold -128 (a GGUF writer may round there); activations never do
            // (quantize_q8_0 maps to -127..=127), which the kernels' sign trick relies on.
            qs: std::array::from_fn(|_| rng.random_range(-128..=127)),
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
    for (m, k, n) in [(1, 64, 3), (1, 896, 37), (5, 896, 16), (9, 96, 7)] {
        let w = random_q8_0(&mut rng, n * k / QK);
        check(&w, m, k, n, &mut rng);
    }
}

/// `n` × `k` random weights in `dtype`.
fn random_matrix(
    rng: &mut rand::rngs::StdRng,
    dtype: candle_core::quantized::GgmlDType,
    n: usize,
    k: usize,
) -> candle_core::quantized::QTensor {
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1..0.1)).collect();
    let w = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
    candle_core::quantized::QTensor::quantize(&w, dtype).unwrap()
}

/// `m` rows of `k` activations times a matrix through `product`, flattened.
fn multiply(
    product: impl Fn(&candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>,
    rows: &[f32],
    m: usize,
    k: usize,
) -> Vec<f32> {
    let x = candle_core::Tensor::from_vec(rows.to_vec(), (m, k), &candle_core::Device::Cpu);
    product(&x.unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Every type real GGUFs use: candle's kernels (Q4_0, Q4_K, Q5_K, Q6_K, whose SIMD path candle
/// also chooses at run time) and moss's (Q5_0, Q8_0; candle dequantises the weights for the
/// reference here), held to the same dequantise-then-multiply reference on random data through
/// the path the decoder takes (`Matrix`), as prompt chunks and as decoding steps, for one row, a
/// few and many, with column counts that leave remainders and a shape candle's x86 matmul would
/// send to its own repacked kernels by the type's name (rows a multiple of 16, columns of 256).
#[test]
fn every_gguf_type_matches_the_reference_on_the_decoders_path() {
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        for (k, n) in [(256, 5), (768, 37), (4864, 9), (512, 32)] {
            let q = random_matrix(&mut rng, dtype, n, k);
            assert_eq!(q.dtype(), dtype);
            let wf: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(wf.iter().any(|v| *v != 0.0));
            let mm = Matrix::new(q).unwrap();
            for m in [1, 3, 8, 17] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                for decoding in [false, true] {
                    let got = multiply(|x| mm.forward(x, decoding), &x, m, k);
                    assert_eq!(got.len(), m * n);
                    for i in 0..m {
                        let xs = &x[i * k..(i + 1) * k];
                        // Activations are rounded to 8 bits (half a step of max/127 per block, the
                        // row's max bounding every block's; Q4_0's activation scale is an f16, which
                        // adds up to 127 × 2⁻¹¹ of a step).
                        let step = xs.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                        for j in 0..n {
                            let ws = &wf[j * k..(j + 1) * k];
                            let want: f64 =
                                xs.iter().zip(ws).map(|(a, b)| *a as f64 * *b as f64).sum();
                            let bound = ws.iter().map(|v| v.abs()).sum::<f32>() * step * 0.6 + 1e-4;
                            let g = got[i * n + j];
                            assert!(
                            (g as f64 - want).abs() <= bound as f64,
                            "{dtype:?} m={m} k={k} decoding {decoding} [{i},{j}]: {g} vs {want} (bound {bound})"
                        );
                        }
                    }
                }
            }
        }
    }
}

/// What batching relies on: through the path the decoder takes, a row multiplied together with
/// others gives bit for bit what it gives alone, for every type real GGUFs use (the types whose
/// candle kernel is `batch_sensitive` go one row at a time, as the decoder runs them when
/// decoding; the others must not need it).
#[test]
fn a_row_multiplies_the_same_alone_and_in_a_batch() {
    use candle_core::quantized::GgmlDType;
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::F32,
    ] {
        // An odd shape, and the default model's feed-forward down projection (candle repacks
        // k-quant matrices of such sizes for its multi-row kernels).
        for (k, n) in [(768, 37), (4864, 896)] {
            let q = random_matrix(&mut rng, dtype, n, k);
            let mm = Matrix::new(q).unwrap();
            for m in [2, 4, 5, 8, 13] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let run = |rows: &[f32], m: usize| -> Vec<u32> {
                    let product = |x: &candle_core::Tensor| mm.forward(x, true);
                    let y = multiply(product, rows, m, k);
                    y.into_iter().map(f32::to_bits).collect()
                };
                let together = run(&x, m);
                for i in 0..m {
                    let alone = run(&x[i * k..(i + 1) * k], 1);
                    assert_eq!(
                        alone,
                        together[i * n..(i + 1) * n],
                        "{dtype:?} {n}x{k}: row {i} of {m} differs from the row alone"
                    );
                }
            }
        }
    }
}

/// Every level's product equals the scalar level's bit for bit: both types run on pairs of blocks
/// with exact integer sums and the same float steps at every level, so any difference is a bug in
/// one of them.
fn same_bits_at_every_level<B: Block>(random: fn(&mut rand::rngs::StdRng, usize) -> Vec<B>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    // Odd block counts (a padded last pair), several tiles of rows and a remainder.
    for (m, k, n) in [(1, 32, 5), (3, 96, 9), (13, 896, 17), (6, 4864, 3)] {
        let w = random(&mut rng, n * k / QK);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mut want = vec![0f32; m * n];
        matmul(Isa::Scalar, (m, k, n), &x, &w, &mut want).unwrap();
        assert!(
            want.iter().any(|v| v.abs() > 1e-3),
            "all near zero: {want:?}"
        );
        for isa in available() {
            let mut got = vec![0f32; m * n];
            matmul(isa, (m, k, n), &x, &w, &mut got).unwrap();
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{:?} {isa:?} m={m} k={k} n={n}: {got:?} vs {want:?}",
                B::DTYPE
            );
        }
    }
}

#[test]
fn q5_0_products_are_the_same_bits_at_every_level() {
    same_bits_at_every_level(random_q5_0);
}

#[test]
fn q8_0_products_are_the_same_bits_at_every_level() {
    same_bits_at_every_level(random_q8_0);
}

/// Packing into pairs and back gives every value of every row, odd block counts included.
fn pairs_hold_the_same_values<B: Block>(random: fn(&mut rand::rngs::StdRng, usize) -> Vec<B>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    for (kb, rows) in [(1, 3), (3, 2), (6, 2), (28, 4)] {
        let w = random(&mut rng, kb * rows);
        let mut want = vec![0f32; kb * rows * QK];
        B::dequantize(&w, &mut want);
        let packed = B::pack(w, kb);
        assert_eq!(packed.len(), rows * B::packed_len(kb));
        let mut got = vec![f32::NAN; kb * rows * QK];
        for (row, out) in packed
            .chunks(B::packed_len(kb))
            .zip(got.chunks_mut(kb * QK))
        {
            B::unpack(row, out);
        }
        assert_eq!(got, want, "{:?}: {kb} blocks per row", B::DTYPE);
    }
}

#[test]
fn q5_0_pairs_hold_the_same_values() {
    pairs_hold_the_same_values(random_q5_0);
}

#[test]
fn q8_0_pairs_hold_the_same_values() {
    pairs_hold_the_same_values(random_q8_0);
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
    let fast = FastBlocks::<BlockQ5_0>::from_bytes(&bytes, 64).unwrap();
    let rows = fast.rows(&[2, 0]).unwrap();
    let mut all = vec![0f32; 256];
    BlockQ5_0::dequantize(&blocks, &mut all);
    assert_eq!(&rows[..64], &all[128..192]);
    assert_eq!(&rows[64..], &all[..64]);
    assert!(fast.rows(&[4]).is_err());
}

/// moss's decode attention over a paged store: softmax(q·k × scale)·v per (sequence, head), with
/// grouped kv heads and positions scattered over the store, equals a plain f64 computation; and a
/// sequence's result is bit for bit the same alone and next to others (what makes batched greedy
/// answers equal to single ones).
#[test]
fn paged_decode_attention_matches_the_reference_and_ignores_the_batch() {
    // The default model's shape, Gemma 3's (one kv head for four query heads, which the kernel
    // splits between threads), and an odd one.
    for (kv_heads, heads, d) in [(2, 14, 64), (1, 4, 256), (2, 6, 72)] {
        decode_attention_case(kv_heads, heads, d);
    }
}

fn decode_attention_case(kv_heads: usize, heads: usize, d: usize) {
    use moss_kernels::attention::{paged_decode_attention, Store};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let positions = 300usize;
    let size = kv_heads * positions * d;
    let keys: Vec<f32> = (0..size).map(|_| rng.random_range(-1.0..1.0)).collect();
    let values: Vec<f32> = (0..size).map(|_| rng.random_range(-1.0..1.0)).collect();
    let store = Store {
        keys: &keys,
        values: &values,
        positions,
        kv_heads,
        head_dim: d,
    };
    // three sequences of different lengths, their positions spread over the store
    let seqs: Vec<Vec<u32>> = [1usize, 37, 250]
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| rng.random_range(0..positions as u32))
                .collect()
        })
        .collect();
    let q: Vec<f32> = (0..seqs.len() * heads * d)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let scale = 0.3f32;
    let views: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let mut out = vec![0f32; q.len()];
    paged_decode_attention(&q, store, heads, scale, &views, &mut out).unwrap();
    for (s, slots) in seqs.iter().enumerate() {
        for h in 0..heads {
            let unit = s * heads + h;
            let base = (h / (heads / kv_heads)) * positions * d;
            let qv = &q[unit * d..(unit + 1) * d];
            let scores: Vec<f64> = slots
                .iter()
                .map(|&p| {
                    let k = &keys[base + p as usize * d..][..d];
                    qv.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..d {
                let want: f64 = slots
                    .iter()
                    .zip(&e)
                    .map(|(&p, w)| w / sum * values[base + p as usize * d + i] as f64)
                    .sum();
                let got = out[unit * d + i] as f64;
                assert!(
                    (got - want).abs() <= 1e-5,
                    "seq {s} head {h} dim {i}: {got} vs {want}"
                );
            }
        }
    }
    // alone: the same bits
    for (s, slots) in seqs.iter().enumerate() {
        let mut alone = vec![0f32; heads * d];
        let qs = &q[s * heads * d..(s + 1) * heads * d];
        paged_decode_attention(qs, store, heads, scale, &[slots.as_slice()], &mut alone).unwrap();
        assert_eq!(
            alone,
            out[s * heads * d..(s + 1) * heads * d],
            "sequence {s}"
        );
    }
    // bad input is an error, not a panic
    let mut small = vec![0f32; 3];
    assert!(paged_decode_attention(&q, store, heads, scale, &views, &mut small).is_err());
    let outside = [positions as u32];
    let mut one = vec![0f32; heads * d];
    assert!(
        paged_decode_attention(&q[..heads * d], store, heads, scale, &[&outside], &mut one)
            .is_err()
    );
}

/// A prompt chunk's fused attention: each (sequence, position) row sees one range of columns (its
/// causal window, in one sequence a sliding window); every query head of a group equals a plain
/// f64 softmax(q·kᵀ)·v over exactly those columns; sizes that do not fit are an error.
#[test]
fn chunk_attention_matches_a_masked_reference() {
    use moss_kernels::prefill::{chunk_attention, ChunkDims};
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let dims = ChunkDims {
        kv_heads: 2,
        seqs: 2,
        positions: 21,
        group: 3,
        width: 40,
        head_dim: 24,
    };
    let d = dims.head_dim;
    let mut values =
        |n: usize, r: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-r..r)).collect() };
    let q = values(
        dims.kv_heads * dims.seqs * dims.positions * dims.group * d,
        1.5,
    );
    let keys = values(dims.kv_heads * dims.seqs * dims.width * d, 1.0);
    let vals = values(keys.len(), 1.0);
    // sequence 0: causal after 19 cached positions; sequence 1: a window of 5 after 3.
    let ranges: Vec<(usize, usize)> = (0..dims.positions)
        .map(|p| (0, 19 + p + 1))
        .chain((0..dims.positions).map(|p| ((3 + p + 1).saturating_sub(5), 3 + p + 1)))
        .collect();
    let mut out = vec![0f32; q.len()];
    chunk_attention(&q, &keys, &vals, dims, &ranges, &mut out).unwrap();
    for kv in 0..dims.kv_heads {
        for s in 0..dims.seqs {
            let base = (kv * dims.seqs + s) * dims.width * d;
            for p in 0..dims.positions {
                let (lo, hi) = ranges[s * dims.positions + p];
                for g in 0..dims.group {
                    let row = (((kv * dims.seqs + s) * dims.positions + p) * dims.group + g) * d;
                    let qv = &q[row..row + d];
                    let sc: Vec<f64> = (lo..hi)
                        .map(|j| {
                            (0..d)
                                .map(|c| qv[c] as f64 * keys[base + j * d + c] as f64)
                                .sum()
                        })
                        .collect();
                    let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (lo..hi)
                            .zip(&e)
                            .map(|(j, w)| w / sum * vals[base + j * d + c] as f64)
                            .sum();
                        let got = out[row + c] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "kv {kv} seq {s} pos {p} head {g} dim {c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
    let mut bad = ranges.clone();
    bad[0] = (0, dims.width + 1);
    assert!(chunk_attention(&q, &keys, &vals, dims, &bad, &mut out).is_err());
    assert!(chunk_attention(&q[1..], &keys, &vals, dims, &ranges, &mut out).is_err());
}

/// The softmax's exponential: within 3e-7 of libm's over the range it serves.
#[test]
fn fast_exp_is_close_to_libm() {
    let mut x = -87.0f32;
    while x < 88.0 {
        let (got, want) = (moss_kernels::softmax::exp(x), x.exp());
        assert!(
            ((got - want) / want).abs() < 3e-7,
            "exp({x}) = {got}, libm {want}"
        );
        x += 0.0137;
    }
    assert_eq!(moss_kernels::softmax::exp(0.0), 1.0);
}
