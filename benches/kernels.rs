//! Each quantized matrix product per type and batch size: moss's kernels (SIMD chosen at run
//! time, and the scalar fallback) next to candle's own for the same type, with the memory-
//! bandwidth ceiling measured in the same run.
//!
//!     cargo bench --bench kernels [-- --quick] [--only Q8_0] [--shape 151936x896]
//!
//! Shapes are the default model's (Qwen2.5-0.5B: hidden 896, feed-forward 4864). "GB/s" is
//! weight bytes read per second; "of ceiling" compares it with the machine's copy bandwidth.
//! The same weights are multiplied again and again, so matrices that fit in the caches can read
//! faster than memory allows (over 100 %): the model's own decode reads them from memory.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use moss::engine::kernels;

/// Bytes per second of a large memcpy (read + write counted as read only, like a matmul's
/// weight stream): the ceiling for a product that reads its weights once.
fn bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    // A copy reads n and writes n bytes.
    2.0 * n as f64 / best
}

fn time(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

/// The scalar fallback on the same weights (fewer repetitions: it is slow).
fn scalar<B: kernels::Block>(
    raw: &[u8],
    mkn: (usize, usize, usize),
    xs: &[f32],
    reps: usize,
) -> anyhow::Result<f64> {
    let b = kernels::FastBlocks::<B>::from_bytes(raw, mkn.1)?;
    let mut dst = vec![0f32; mkn.0 * mkn.2];
    Ok(time(
        || B::matmul_packed(kernels::Isa::Scalar, mkn, xs, b.packed(), &mut dst).unwrap(),
        reps.min(5),
    ))
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only Q8_0` (a type's name as printed) times that type alone (for profiling one kernel).
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    // `--shape 151936x896` (rows x columns) times that shape instead of the default model's
    // (e.g. its output projection, which does not fit in the cache).
    let shape: Option<(usize, usize)> = std::env::args()
        .skip_while(|a| a != "--shape")
        .nth(1)
        .and_then(|s| {
            let (n, k) = s.split_once('x')?;
            Some((n.parse().ok()?, k.parse().ok()?))
        });
    let dev = Device::Cpu;
    let bw = bandwidth();
    println!(
        "memory bandwidth (memcpy, read+write): {:.1} GB/s; SIMD path: {:?}; threads: {}",
        bw / 1e9,
        kernels::isa(),
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<6} {:>5} {:>11} {:>3} | {:>10} {:>10} {:>10} | {:>8} {:>8} | {:>7}",
        "type",
        "m",
        "n x k",
        "",
        "candle µs",
        "moss µs",
        "scalar µs",
        "moss/cdl",
        "GB/s",
        "ceiling"
    );
    println!("(* candle's kernel, which moss uses for that type and shape: the same code in both columns)");
    let batches: &[usize] = if quick { &[1, 8] } else { &[1, 4, 8, 32] };
    // moss's own kernels (Q5_0, Q8_0), then the types moss leaves to candle's (whose SIMD path
    // candle 0.11 also picks at run time), and Q8_0 shapes candle's repacked tiles take: there
    // "moss" is the same code as "candle".
    for dtype in [
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        if only.as_ref().is_some_and(|o| *o != format!("{dtype:?}")) {
            continue;
        }
        // k-quant rows are whole 256-value blocks: the default model's feed-forward down
        // projection, and a square 2048.
        let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        let shapes: Vec<(usize, usize)> = match (shape, k_quant) {
            (Some((n, k)), true) if k % 256 == 0 => vec![(n, k)],
            (Some(_), true) => vec![],
            (Some((n, k)), false) if k % 32 == 0 => vec![(n, k)],
            (Some(_), false) => vec![],
            (None, true) => vec![(896, 4864), (2048, 2048)],
            (None, false) => vec![(4864, 896), (896, 896), (896, 4864)],
        };
        for (n, k) in shapes {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let w = Tensor::from_vec(w, (n, k), &dev)?;
            let candle = QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?;
            let q = QTensor::quantize(&w, dtype)?;
            let bytes = q.storage_size_in_bytes() as f64;
            let raw = q.data()?.into_owned();
            // The product the decoder takes in decoding steps (moss's kernels where they take
            // the type).
            let ours = kernels::Matrix::new(q)?;
            let forward = |x: &Tensor| ours.forward(x, true);
            let ours_type = ours.in_moss_kernels();
            for &m in batches {
                let x: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
                let x = Tensor::from_vec(x, (m, k), &dev)?;
                let reps = if m >= 32 { 5 } else { 30 };
                let t_candle = time(
                    || {
                        std::hint::black_box(candle.forward(&x).unwrap());
                    },
                    reps,
                );
                let t_moss = time(
                    || {
                        std::hint::black_box(forward(&x).unwrap());
                    },
                    reps,
                );
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let t_scalar = match dtype {
                    GgmlDType::Q5_0 => scalar::<kernels::BlockQ5_0>(&raw, (m, k, n), &xs, reps)?,
                    GgmlDType::Q8_0 => scalar::<kernels::BlockQ8_0>(&raw, (m, k, n), &xs, reps)?,
                    _ => f64::NAN, // candle's own: no separate scalar path to time
                };
                println!(
                    "{:<6} {:>5} {:>11} {:>3} | {:>10.1} {:>10.1} {:>10} | {:>7.2}x {:>8.1} | {:>6.0}%",
                    format!("{dtype:?}{}", if ours_type { "" } else { "*" }),
                    m,
                    format!("{n}x{k}"),
                    "",
                    t_candle * 1e6,
                    t_moss * 1e6,
                    if t_scalar.is_nan() {
                        "-".to_string()
                    } else {
                        format!("{:.1}", t_scalar * 1e6)
                    },
                    t_candle / t_moss,
                    bytes / t_moss / 1e9,
                    100.0 * (bytes / t_moss) / bw
                );
            }
        }
    }
    Ok(())
}
