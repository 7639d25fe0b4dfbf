//! A product split over candle's thread pool: groups of weight rows, each read once for tiles of
//! 8, 4 and 1 rows of activations, the row loop compiled for the SIMD level in use.

use candle_core::Result;

use crate::blocks::{quantize_q8_0, Block, BlockQ8_0, QK};
use crate::cpu::{supported, Isa};

/// `dst[i][j] = X[i] · W[j]` for `m` rows of X (`k` f32 each) and `n` rows of W.
pub fn matmul<B: Block>(
    isa: Isa,
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    w: &[B],
    dst: &mut [f32],
) -> Result<()> {
    if k == 0 || k % QK != 0 || w.len() != n * (k / QK) {
        candle_core::bail!(
            "quantized matmul: {} blocks are not {n} rows of {k} values",
            w.len()
        );
    }
    B::matmul_packed(isa, (m, k, n), lhs, &B::pack(w.to_vec(), k / QK), dst)
}

/// Checks a product's shapes (`units` packed units per weight row) and rounds the rows of X to
/// Q8_0 blocks, the other operand of every dot product.
fn prepare(
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    w: usize,
    units: impl Fn(usize) -> usize,
    dst: &[f32],
) -> Result<Vec<BlockQ8_0>> {
    if k == 0 || k % QK != 0 || lhs.len() != m * k || w != n * units(k / QK) || dst.len() < m * n {
        candle_core::bail!(
            "quantized matmul: shapes do not fit (m {m}, k {k}, n {n}, lhs {}, weights {w})",
            lhs.len(),
        );
    }
    let kb = k / QK;
    let mut xq = vec![BlockQ8_0 { d: 0, qs: [0; 32] }; m * kb];
    for (row, out) in lhs.chunks_exact(k).zip(xq.chunks_exact_mut(kb)) {
        quantize_q8_0(row, out);
    }
    Ok(xq)
}

/// A packed weight layout: rows of units (each covering `BLOCKS` Q8_0 blocks of activations),
/// the activations arranged to match, and the row kernel for each SIMD level.
pub(crate) trait Unit: Copy + Sync {
    /// Activation blocks per unit.
    const BLOCKS: usize;
    type Acts: Sync;
    /// A row of activation blocks, arranged per unit (padded like the weights).
    fn arrange(xq: &[BlockQ8_0]) -> Vec<Self::Acts>;
    /// One weight row against N rows of activations at `isa` (which `supported` gave).
    fn rows<const N: usize>(isa: Isa, w: &[Self], ys: [&[Self::Acts]; N]) -> [f32; N];
}

/// `dst[i][j] = X[i] · W[j]` with W in units of `U`.
pub(crate) fn matmul_units<U: Unit>(
    isa: Isa,
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    w: &[U],
    dst: &mut [f32],
) -> Result<()> {
    let isa = supported(isa);
    let per_row = |kb: usize| kb.div_ceil(U::BLOCKS);
    let xq = prepare((m, k, n), lhs, w.len(), per_row, dst)?;
    let kb = k / QK;
    let acts: Vec<U::Acts> = xq.chunks_exact(kb).flat_map(U::arrange).collect();
    let job = UnitJob {
        isa,
        per_row: per_row(kb),
        w,
        acts: &acts,
        out: Out::new(m, n, dst),
    };
    run(isa, &job);
    Ok(())
}

struct UnitJob<'a, U: Unit> {
    isa: Isa,
    per_row: usize,
    w: &'a [U],
    acts: &'a [U::Acts],
    out: Out,
}

impl<U: Unit> Tiles for UnitJob<'_, U> {
    fn out(&self) -> &Out {
        &self.out
    }

    #[inline(always)]
    fn tile<const N: usize>(&self, j: usize, i: usize) -> [f32; N] {
        let per = self.per_row;
        let w = &self.w[j * per..(j + 1) * per];
        let ys: [&[U::Acts]; N] =
            std::array::from_fn(|t| &self.acts[(i + t) * per..(i + t + 1) * per]);
        U::rows(self.isa, w, ys)
    }
}

/// Weight rows per work item; each group is read once for all rows of X.
pub(crate) const GROUP: usize = 8;

/// Where a product's `m` × `n` results go.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    m: usize,
    n: usize,
    /// `dst` as an address (written through by disjoint work items).
    addr: usize,
}

impl Out {
    pub(crate) fn new(m: usize, n: usize, dst: &mut [f32]) -> Self {
        Self {
            m,
            n,
            addr: dst.as_mut_ptr() as usize,
        }
    }
}

/// A quantized product split into work items: weight row `j` against rows `i..i + N` of X.
pub(crate) trait Tiles: Sync {
    fn out(&self) -> &Out;
    fn tile<const N: usize>(&self, j: usize, i: usize) -> [f32; N];
}

/// Runs `job` on candle's thread pool, groups of `GROUP` weight rows per work item, with the loop
/// over rows compiled for `isa`'s SIMD features so that the kernels inline into it (otherwise a
/// portable build calls them once per weight row).
pub(crate) fn run<T: Tiles>(isa: Isa, job: &T) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2<T: Tiles>(job: &T, range: std::ops::Range<usize>) {
        groups(job, range)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn avx512<T: Tiles>(job: &T, range: std::ops::Range<usize>) {
        groups(job, range)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn avx512_vnni<T: Tiles>(job: &T, range: std::ops::Range<usize>) {
        groups(job, range)
    }
    let isa = supported(isa);
    let count = job.out().n.div_ceil(GROUP);
    candle_core::utils::barrier_pool().execute_chunked(count, |range| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` came through `supported`: the CPU has these features.
        Isa::Avx512Vnni => unsafe { avx512_vnni(job, range) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe { avx512(job, range) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { avx2(job, range) },
        _ => groups(job, range),
    });
}

/// Weight-row groups `range`: tiles of 8, then 4, then 1 rows of X against each weight row of the
/// group in turn (the weights are unpacked once for all rows of a tile; a tile of X stays in the
/// first-level cache while the group's rows pass, instead of all of X streaming past every weight
/// row). Each output is still one weight row against one row of X, summed alike in any tile.
#[inline(always)]
pub(crate) fn groups<T: Tiles>(job: &T, range: std::ops::Range<usize>) {
    let Out { m, n, addr } = *job.out();
    let dst = addr as *mut f32;
    let put = |i: usize, j: usize, v: &[f32]| {
        for (t, v) in v.iter().enumerate() {
            // SAFETY: each (i, j) is written by exactly one work item, within m * n.
            unsafe { *dst.add((i + t) * n + j) = *v };
        }
    };
    for g in range {
        let rows = g * GROUP..((g + 1) * GROUP).min(n);
        let mut i = 0;
        while i + 8 <= m {
            for j in rows.clone() {
                put(i, j, &job.tile::<8>(j, i));
            }
            i += 8;
        }
        while i + 4 <= m {
            for j in rows.clone() {
                put(i, j, &job.tile::<4>(j, i));
            }
            i += 4;
        }
        while i < m {
            for j in rows.clone() {
                put(i, j, &job.tile::<1>(j, i));
            }
            i += 1;
        }
    }
}
