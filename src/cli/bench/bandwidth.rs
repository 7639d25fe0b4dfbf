//! The machine's memory read bandwidth, measured: a decoding step reads every weight once, so
//! bandwidth over the bytes a step reads is the fastest one stream can decode.

use std::time::Instant;

/// Bytes read per pass: far more than any cache holds.
const BYTES: usize = 1 << 30;

/// Read bandwidth in bytes per second with `threads` threads, each summing its share of a 1 GiB
/// buffer (the best of three passes; the sum keeps the reads from being optimised away).
pub fn read_bandwidth(threads: usize) -> f64 {
    let threads = threads.max(1);
    let words = BYTES / 8 / threads / 8 * threads * 8;
    // Written once, so every page is really there before the timed passes.
    let buf: Vec<u64> = (0..words as u64).collect();
    let share = words / threads;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(share) {
                s.spawn(move || std::hint::black_box(sum(part)));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best
}

/// Eight independent sums, so the loop is bound by loads (the compiler vectorises it).
fn sum(x: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in x.chunks_exact(8) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*v);
        }
    }
    acc.iter().fold(0, |a, b| a.wrapping_add(*b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sum_reads_every_word() {
        let x: Vec<u64> = (1..=20).collect();
        // 16 words in whole groups of eight: 1 + … + 16.
        assert_eq!(super::sum(&x), 136);
    }
}
