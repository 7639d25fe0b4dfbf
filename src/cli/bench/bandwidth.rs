//! The machine's memory read bandwidth, measured: a decoding step reads every weight once, so
//! bandwidth over the bytes a step reads is the fastest one stream can decode.

use std::time::Instant;

/// Bytes read per pass: far more than any cache holds.
const BYTES: usize = 1 << 30;
/// Independent running sums: enough for the compiler to keep several vector registers of loads
/// in flight (fewer leave the loop bound by the additions, not by memory).
const LANES: usize = 64;

/// Read bandwidth in bytes per second with `threads` threads, each summing its share of a 1 GiB
/// buffer (the best of five passes; the sum keeps the reads from being optimised away).
pub fn read_bandwidth(threads: usize) -> f64 {
    let threads = threads.max(1);
    let values = BYTES / 4 / threads / LANES * threads * LANES;
    // Written once, so every page is really there before the timed passes.
    let buf = vec![1f32; values];
    let share = values / threads;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(share) {
                s.spawn(move || std::hint::black_box(sum(part)));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    (values * 4) as f64 / best
}

/// `LANES` running sums over whole groups of `LANES` values (the compiler vectorises it).
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for c in x.chunks_exact(LANES) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sum_reads_every_whole_group() {
        let x = vec![1f32; super::LANES * 3 + 5];
        assert_eq!(super::sum(&x), (super::LANES * 3) as f32);
    }
}
