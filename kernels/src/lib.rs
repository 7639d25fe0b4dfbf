//! moss-kernels: quantized matrix products for the GGUF block types candle 0.11 leaves scalar on x86: Q5_0
//! (two thirds of the bytes of the default Q4_K_M model) and, for completeness, Q8_0.
//!
//! `W` is a GGUF weight matrix of `n` rows of `k` values (blocks of 32); `X` is `m` rows of `k`
//! f32 activations. `matmul` quantises each row of X to Q8_0 once, then computes every output
//! with an integer dot product: AVX-512 (with or without VNNI) or AVX2 when the CPU has it
//! (checked at run time, so a portable build is fast too), else a plain scalar loop. Q5_0 is held
//! rearranged in pairs of blocks (`q5_0`), which the kernels unpack with less work. Work is split over weight rows on candle's own thread
//! pool; each weight row is read once for all rows of X (prefill and batched decode).
//!
//! `QuantizedType` lets a candle `QTensor` hold these blocks, so `QMatMul` uses them unchanged.
//!
//! A crate of its own so that it is compiled optimised even in test builds (see the root
//! Cargo.toml's `[profile.dev.package."*"]`): SIMD intrinsics unoptimised are slower than the
//! scalar loop. Its tests are in the root package (`tests/kernels.rs`).

use std::borrow::Cow;

pub mod attention;
pub mod q5_0;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Module, Result, Tensor};
use half::f16;

/// Values per block (Q5_0 and Q8_0).
pub const QK: usize = 32;

/// GGUF Q5_0: 32 values `d * (q - 16)`, q 5 bits: low 4 bits in `qs` (value j in the low nibble
/// of byte j, value j+16 in its high nibble), 5th bit j in bit j of `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ5_0 {
    pub d: u16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

/// GGUF Q8_0: 32 values `d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// Which implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 (F, BW, VL) with VNNI: two blocks per 512-bit register, one instruction for the
    /// 8-bit dot products.
    Avx512Vnni,
    /// AVX-512 (F, BW, VL) without VNNI (Skylake-X, Cascade Lake without it): Q5_0's 5th bits
    /// unpacked with byte masks; Q8_0 as with AVX2 (a 512-bit kernel with two-instruction dot
    /// products measured no faster).
    Avx512,
    Avx2,
    Scalar,
}

/// Every implementation, best first.
const ALL: [Isa; 4] = [Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2, Isa::Scalar];

/// The best implementation this CPU supports; `MOSS_KERNELS=avx512`, `=avx2` or `=scalar` caps
/// it (benchmarks and tests compare them).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("MOSS_KERNELS").unwrap_or_default().as_str() {
            "avx512" => Isa::Avx512,
            "avx2" => Isa::Avx2,
            "scalar" => Isa::Scalar,
            _ => Isa::Avx512Vnni,
        };
        supported(cap)
    })
}

/// `isa` if this CPU can run it, else the best it can (so that no caller can reach instructions
/// the CPU lacks).
pub fn supported(isa: Isa) -> Isa {
    let rank = |i: Isa| ALL.iter().position(|a| *a == i).unwrap_or(ALL.len());
    let best = detect();
    if rank(isa) >= rank(best) {
        isa
    } else {
        best
    }
}

/// Every implementation this CPU can run, best first.
pub fn available() -> Vec<Isa> {
    let best = ALL
        .iter()
        .position(|i| *i == detect())
        .unwrap_or(ALL.len() - 1);
    ALL[best..].to_vec()
}

/// What this CPU has (checked once: `supported` asks for every weight row).
fn detect() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(probe)
}

fn probe() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        // Every AVX2 CPU has F16C too; the kernels convert block scales with it (half's own
        // conversion is a run-time check and a call in a portable build, per block).
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        if avx512 && is_x86_feature_detected!("avx512vnni") {
            return Isa::Avx512Vnni;
        }
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

#[inline]
fn half(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// A block type these kernels handle.
pub trait Block: Copy + Default + Send + Sync + 'static {
    const DTYPE: GgmlDType;
    /// The layout the kernels read, which `FastBlocks` holds: Q8_0 its blocks as they are; Q5_0
    /// pairs of blocks rearranged so that each step does less unpacking (`q5_0::Pair`).
    type Packed: Copy + Send + Sync + 'static;
    fn dequantize(blocks: &[Self], out: &mut [f32]);
    fn quantize(xs: &[f32], out: &mut [Self]);
    /// Rows of `kb` blocks in the kernels' layout.
    fn pack(w: Vec<Self>, kb: usize) -> Vec<Self::Packed>;
    /// Packed units in a row of `kb` blocks.
    fn packed_len(kb: usize) -> usize;
    /// One packed row, dequantised into `out` (the row's values).
    fn unpack(row: &[Self::Packed], out: &mut [f32]);
    /// `matmul` on packed weights (rows of `packed_len(k / QK)` units).
    fn matmul_packed(
        isa: Isa,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        w: &[Self::Packed],
        dst: &mut [f32],
    ) -> Result<()>;
}

impl Block for BlockQ5_0 {
    const DTYPE: GgmlDType = GgmlDType::Q5_0;
    type Packed = q5_0::Pair;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        for (b, out) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = half(b.d);
            let qh = u32::from_le_bytes(b.qh);
            for j in 0..16 {
                let lo = (b.qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
                let hi = (b.qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                out[j] = d * (lo as i32 - 16) as f32;
                out[j + 16] = d * (hi as i32 - 16) as f32;
            }
        }
    }

    fn quantize(xs: &[f32], out: &mut [Self]) {
        for (x, b) in xs.chunks_exact(QK).zip(out.iter_mut()) {
            // The value of largest magnitude maps to -16, as GGML does.
            let max = x
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qh = 0u32;
            for j in 0..16 {
                let q0 = ((x[j] * id + 16.5) as i32).clamp(0, 31) as u32;
                let q1 = ((x[j + 16] * id + 16.5) as i32).clamp(0, 31) as u32;
                b.qs[j] = (q0 & 0x0F) as u8 | ((q1 & 0x0F) as u8) << 4;
                qh |= ((q0 >> 4) & 1) << j | ((q1 >> 4) & 1) << (j + 16);
            }
            b.qh = qh.to_le_bytes();
            b.d = f16::from_f32(d).to_bits();
        }
    }

    fn pack(w: Vec<Self>, kb: usize) -> Vec<q5_0::Pair> {
        q5_0::pack(&w, kb)
    }

    fn packed_len(kb: usize) -> usize {
        kb.div_ceil(2)
    }

    fn unpack(row: &[q5_0::Pair], out: &mut [f32]) {
        q5_0::unpack(row, out)
    }

    fn matmul_packed(
        isa: Isa,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        w: &[q5_0::Pair],
        dst: &mut [f32],
    ) -> Result<()> {
        q5_0::matmul(isa, mkn, lhs, w, dst)
    }
}

impl Block for BlockQ8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    type Packed = Self;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        for (b, out) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = half(b.d);
            for (o, q) in out.iter_mut().zip(b.qs) {
                *o = d * q as f32;
            }
        }
    }

    fn quantize(xs: &[f32], out: &mut [Self]) {
        quantize_q8_0(xs, out)
    }

    fn pack(w: Vec<Self>, _: usize) -> Vec<Self> {
        w
    }

    fn packed_len(kb: usize) -> usize {
        kb
    }

    fn unpack(row: &[Self], out: &mut [f32]) {
        Self::dequantize(row, out)
    }

    fn matmul_packed(
        isa: Isa,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        w: &[Self],
        dst: &mut [f32],
    ) -> Result<()> {
        matmul_q8_0(isa, mkn, lhs, w, dst)
    }
}

impl BlockQ8_0 {
    /// Dot products of one weight row with N activation rows (`yd`: their block scales as f32),
    /// activations in blocks.
    #[inline]
    fn rows<const N: usize>(
        isa: Isa,
        w: &[Self],
        ys: [&[BlockQ8_0]; N],
        yd: [&[f32]; N],
    ) -> [f32; N] {
        match supported(isa) {
            // Activations in blocks: the 256-bit AVX2 kernel (the VNNI kernel reads the byte
            // layout of `rows_wide`, which `matmul` uses on those CPUs).
            #[cfg(target_arch = "x86_64")]
            // SAFETY: each level is only chosen when the CPU reports its features (`detect`), and
            // the AVX-512 levels imply AVX2.
            Isa::Avx512Vnni | Isa::Avx512 | Isa::Avx2 => unsafe {
                simd::avx2::rows_q8_0(w, ys, yd)
            },
            _ => std::array::from_fn(|r| dot_q8_0_scalar(w, ys[r], yd[r])),
        }
    }

    /// `rows` for `Isa::Avx512Vnni`, with activations as plain bytes (`k` per row) so that two
    /// blocks load as one 512-bit vector.
    ///
    /// # Safety
    /// The CPU must have the `Isa::Avx512Vnni` features; each `ys[r]` holds `32 * w.len()` bytes
    /// and each `yd[r]` `w.len()` scales.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn rows_wide<const N: usize>(w: &[Self], ys: [&[i8]; N], yd: [&[f32]; N]) -> [f32; N] {
        simd::vnni::rows_q8_0(w, ys, yd)
    }
}

/// Rounds activations to Q8_0 blocks (the other operand of every dot product).
pub fn quantize_q8_0(xs: &[f32], out: &mut [BlockQ8_0]) {
    for (x, b) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in b.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
        b.d = f16::from_f32(d).to_bits();
    }
}

fn dot_q8_0_scalar(xs: &[BlockQ8_0], ys: &[BlockQ8_0], yd: &[f32]) -> f32 {
    let mut sum = 0f32;
    for ((x, y), yd) in xs.iter().zip(ys).zip(yd) {
        let acc: i32 =
            x.qs.iter()
                .zip(y.qs)
                .map(|(a, b)| *a as i32 * b as i32)
                .sum();
        sum += half(x.d) * yd * acc as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::BlockQ8_0;
    use std::arch::x86_64::*;

    /// An f16 block scale as f32, with F16C (inlined into the kernels).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn half(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_q8_0(b: &BlockQ8_0) -> __m256i {
        _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i)
    }

    /// One weight row against N activation rows: each weight block is unpacked once for all N.
    /// `$dot` turns (|x| unsigned, y with x's sign) bytes into 8 lanes of i32 sums.
    macro_rules! rows_kernel {
        ($features:literal, $name:ident, $unpack:ident, $W:ty, $dot:ident) => {
            #[inline]
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const N: usize>(
                w: &[$W],
                ys: [&[BlockQ8_0]; N],
                yd: [&[f32]; N],
            ) -> [f32; N] {
                for r in 0..N {
                    assert!(ys[r].len() >= w.len() && yd[r].len() >= w.len());
                }
                // Blocks go in pairs, even ones into one running sum and odd ones into another,
                // so that two chains of fused multiply-adds run at once. The order is the same
                // for every N, so a row sums alike alone and in a batch.
                let mut acc = [_mm256_setzero_ps(); N];
                let mut odd = [_mm256_setzero_ps(); N];
                let pairs = w.len() / 2;
                for p in 0..pairs {
                    let (b0, b1) = (2 * p, 2 * p + 1);
                    let (x0, x1) = (w.get_unchecked(b0), w.get_unchecked(b1));
                    let (q0, q1) = ($unpack(x0), $unpack(x1));
                    // maddubs / dpbusd multiply unsigned by signed bytes: |x| and y with x's sign
                    // (activations never hold -128, so the sign flip cannot overflow).
                    let (a0, a1) = (_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(q1, q1));
                    let (d0, d1) = (half(x0.d), half(x1.d));
                    for r in 0..N {
                        let y0 = ys[r].get_unchecked(b0);
                        let y1 = ys[r].get_unchecked(b1);
                        let s0 = _mm256_sign_epi8(
                            _mm256_loadu_si256(y0.qs.as_ptr() as *const __m256i),
                            q0,
                        );
                        let s1 = _mm256_sign_epi8(
                            _mm256_loadu_si256(y1.qs.as_ptr() as *const __m256i),
                            q1,
                        );
                        let p0 = _mm256_cvtepi32_ps($dot(a0, s0));
                        let p1 = _mm256_cvtepi32_ps($dot(a1, s1));
                        let c0 = _mm256_set1_ps(d0 * *yd[r].get_unchecked(b0));
                        let c1 = _mm256_set1_ps(d1 * *yd[r].get_unchecked(b1));
                        acc[r] = _mm256_fmadd_ps(c0, p0, acc[r]);
                        odd[r] = _mm256_fmadd_ps(c1, p1, odd[r]);
                    }
                }
                if w.len() % 2 == 1 {
                    let b = w.len() - 1;
                    let x = w.get_unchecked(b);
                    let qx = $unpack(x);
                    let ax = _mm256_sign_epi8(qx, qx);
                    let dw = half(x.d);
                    for r in 0..N {
                        let y = ys[r].get_unchecked(b);
                        let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                        let p = _mm256_cvtepi32_ps($dot(ax, _mm256_sign_epi8(qy, qx)));
                        let scale = _mm256_set1_ps(dw * *yd[r].get_unchecked(b));
                        acc[r] = _mm256_fmadd_ps(scale, p, acc[r]);
                    }
                }
                let mut out = [0f32; N];
                for r in 0..N {
                    out[r] = hsum(_mm256_add_ps(acc[r], odd[r]));
                }
                out
            }
        };
    }

    pub mod avx2 {
        use super::*;

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dot(ax: __m256i, sy: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
        }

        rows_kernel!("avx2,fma,f16c", rows_q8_0, unpack_q8_0, BlockQ8_0, dot);
    }

    /// Two blocks per 512-bit register (AVX-512 BW); activations as plain bytes. `$dot` and
    /// `$dot256` turn (|x| unsigned, y with x's sign) bytes into i32 lane sums, 512 and 256 bits.
    macro_rules! wide_kernel {
        ($features:literal, $name:ident, $unpack:ident, $W:ty, $dot:ident, $dot256:ident) => {
            #[inline]
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const N: usize>(
                w: &[$W],
                ys: [&[i8]; N],
                yd: [&[f32]; N],
            ) -> [f32; N] {
                let kb = w.len();
                for r in 0..N {
                    assert!(ys[r].len() >= kb * 32 && yd[r].len() >= kb);
                }
                // Lanes 0-7 take element 0, lanes 8-15 element 1.
                let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
                let zero = _mm512_setzero_si512();
                let mut acc = [_mm512_setzero_ps(); N];
                for p in 0..kb / 2 {
                    let (a, b) = (&w[2 * p], &w[2 * p + 1]);
                    let qx = _mm512_inserti64x4(_mm512_castsi256_si512($unpack(a)), $unpack(b), 1);
                    let ax = _mm512_abs_epi8(qx);
                    let negative = _mm512_movepi8_mask(qx);
                    let dw = _mm512_permutexvar_ps(
                        halves,
                        _mm512_castps128_ps512(_mm_setr_ps(half(a.d), half(b.d), 0.0, 0.0)),
                    );
                    for r in 0..N {
                        let qy = _mm512_loadu_si512(ys[r].as_ptr().add(64 * p) as *const __m512i);
                        // y takes x's sign, so |x| (unsigned) times it is x times y.
                        let sy = _mm512_mask_sub_epi8(qy, negative, zero, qy);
                        let d = _mm512_cvtepi32_ps($dot(ax, sy));
                        let two = _mm_setr_ps(
                            *yd[r].get_unchecked(2 * p),
                            *yd[r].get_unchecked(2 * p + 1),
                            0.0,
                            0.0,
                        );
                        let dy = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(two));
                        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dy), d, acc[r]);
                    }
                }
                let mut out = [0f32; N];
                for r in 0..N {
                    out[r] = _mm512_reduce_add_ps(acc[r]);
                }
                if kb % 2 == 1 {
                    // The odd last block, 256 bits wide.
                    let x = &w[kb - 1];
                    let qx = $unpack(x);
                    let ax = _mm256_sign_epi8(qx, qx);
                    for r in 0..N {
                        let qy =
                            _mm256_loadu_si256(ys[r].as_ptr().add(32 * (kb - 1)) as *const __m256i);
                        let sy = _mm256_sign_epi8(qy, qx);
                        let v = _mm256_cvtepi32_ps($dot256(ax, sy));
                        out[r] += half(x.d) * yd[r][kb - 1] * hsum(v);
                    }
                }
                out
            }
        };
    }

    /// AVX-512 with VNNI: one instruction per 8-bit dot product.
    pub mod vnni {
        use super::*;

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn dot(ax: __m512i, sy: __m512i) -> __m512i {
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sy)
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn dot256(ax: __m256i, sy: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
        }

        wide_kernel!(
            "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
            rows_q8_0,
            unpack_q8_0,
            BlockQ8_0,
            dot,
            dot256
        );
    }
}

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

fn matmul_q8_0(
    isa: Isa,
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    w: &[BlockQ8_0],
    dst: &mut [f32],
) -> Result<()> {
    let isa = supported(isa);
    let xq = prepare((m, k, n), lhs, w.len(), |kb| kb, dst)?;
    let xd: Vec<f32> = xq.iter().map(|b| half(b.d)).collect();
    // The wide kernels read activations as plain bytes, two blocks per load. They serve every
    // batch size, one row included: a row then sums in the same order alone as in a batch, so
    // batching cannot change an answer (the 256-bit kernel is ~10 % faster for one row alone).
    let wide = cfg!(target_arch = "x86_64") && isa == Isa::Avx512Vnni;
    let bytes: Vec<i8> = if wide {
        xq.iter().flat_map(|b| b.qs).collect()
    } else {
        Vec::new()
    };
    let job = Job {
        isa,
        wide,
        k,
        w,
        xq: &xq,
        xd: &xd,
        bytes: &bytes,
        out: Out::new(m, n, dst),
    };
    run(isa, &job);
    Ok(())
}

/// Weight rows per work item; each group is read once for all rows of X.
const GROUP: usize = 8;

/// Where a product's `m` × `n` results go.
#[derive(Clone, Copy)]
struct Out {
    m: usize,
    n: usize,
    /// `dst` as an address (written through by disjoint work items).
    addr: usize,
}

impl Out {
    fn new(m: usize, n: usize, dst: &mut [f32]) -> Self {
        Self {
            m,
            n,
            addr: dst.as_mut_ptr() as usize,
        }
    }
}

/// A quantized product split into work items: weight row `j` against rows `i..i + N` of X.
trait Tiles: Sync {
    fn out(&self) -> &Out;
    fn tile<const N: usize>(&self, j: usize, i: usize) -> [f32; N];
}

/// Runs `job` on candle's thread pool, groups of `GROUP` weight rows per work item, with the loop
/// over rows compiled for `isa`'s SIMD features so that the kernels inline into it (otherwise a
/// portable build calls them once per weight row).
fn run<T: Tiles>(isa: Isa, job: &T) {
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

/// Weight-row groups `range`: each weight row against tiles of 8, then 4, then 1 rows of X (the
/// weights are unpacked once for all rows of a tile).
#[inline(always)]
fn groups<T: Tiles>(job: &T, range: std::ops::Range<usize>) {
    let Out { m, n, addr } = *job.out();
    let dst = addr as *mut f32;
    for g in range {
        for j in g * GROUP..((g + 1) * GROUP).min(n) {
            let put = |i: usize, v: &[f32]| {
                for (t, v) in v.iter().enumerate() {
                    // SAFETY: each (i, j) is written by exactly one work item, within m * n.
                    unsafe { *dst.add((i + t) * n + j) = *v };
                }
            };
            let mut i = 0;
            while i + 8 <= m {
                put(i, &job.tile::<8>(j, i));
                i += 8;
            }
            while i + 4 <= m {
                put(i, &job.tile::<4>(j, i));
                i += 4;
            }
            while i < m {
                put(i, &job.tile::<1>(j, i));
                i += 1;
            }
        }
    }
}

/// One Q8_0 product, shared by the work items of the thread pool.
struct Job<'a> {
    isa: Isa,
    wide: bool,
    k: usize,
    w: &'a [BlockQ8_0],
    xq: &'a [BlockQ8_0],
    xd: &'a [f32],
    bytes: &'a [i8],
    out: Out,
}

impl Tiles for Job<'_> {
    fn out(&self) -> &Out {
        &self.out
    }

    #[inline(always)]
    fn tile<const N: usize>(&self, j: usize, i: usize) -> [f32; N] {
        let Self {
            isa,
            wide,
            k,
            w,
            xq,
            xd,
            bytes,
            ..
        } = *self;
        let kb = k / QK;
        let wrow = &w[j * kb..(j + 1) * kb];
        let yd: [&[f32]; N] = std::array::from_fn(|t| &xd[(i + t) * kb..(i + t + 1) * kb]);
        #[cfg(target_arch = "x86_64")]
        if wide {
            let ys: [&[i8]; N] = std::array::from_fn(|t| &bytes[(i + t) * k..(i + t + 1) * k]);
            // SAFETY: `wide` is only set for `Isa::Avx512Vnni`, which `supported` only gives
            // where the CPU has it; the slices have the lengths asserted inside.
            return unsafe { BlockQ8_0::rows_wide::<N>(wrow, ys, yd) };
        }
        let _ = (wide, bytes);
        let ys: [&[BlockQ8_0]; N] = std::array::from_fn(|t| &xq[(i + t) * kb..(i + t + 1) * kb]);
        BlockQ8_0::rows::<N>(isa, wrow, ys, yd)
    }
}

/// Weights held for candle in the kernels' layout (`Block::Packed`): a `QTensor` whose matmul
/// runs these kernels. Its bytes (`QTensor::data`) are that layout, not GGUF's.
pub struct FastBlocks<B: Block> {
    packed: Vec<B::Packed>,
    /// Values per row.
    k: usize,
    isa: Isa,
}

impl<B: Block> FastBlocks<B> {
    /// Raw GGUF bytes of a matrix with rows of `k` values, packed.
    pub fn from_bytes(data: &[u8], k: usize) -> Result<Self> {
        let size = std::mem::size_of::<B>();
        let row = k / QK * size;
        if k == 0 || k % QK != 0 || data.len() % row != 0 {
            candle_core::bail!(
                "{} bytes are not whole rows of {k} {:?} values",
                data.len(),
                B::DTYPE
            );
        }
        let mut blocks = Vec::<B>::with_capacity(data.len() / size);
        // SAFETY: B is a plain `repr(C)` struct of integers (any bit pattern is valid); the
        // capacity holds data.len() bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                blocks.as_mut_ptr() as *mut u8,
                data.len(),
            );
            blocks.set_len(data.len() / size);
        }
        Ok(Self {
            packed: B::pack(blocks, k / QK),
            k,
            isa: isa(),
        })
    }

    /// The weights as the kernels read them.
    pub fn packed(&self) -> &[B::Packed] {
        &self.packed
    }

    fn per_row(&self) -> usize {
        B::packed_len(self.k / QK)
    }

    /// Dequantises rows `ids` (an embedding lookup).
    pub fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let (k, per_row) = (self.k, self.per_row());
        let rows = self.packed.len() / per_row;
        let mut out = vec![0f32; ids.len() * k];
        for (o, &id) in out.chunks_exact_mut(k).zip(ids) {
            let id = id as usize;
            if id >= rows {
                candle_core::bail!("token id {id} is out of range for {rows} rows");
            }
            B::unpack(&self.packed[id * per_row..(id + 1) * per_row], o);
        }
        Ok(out)
    }
}

impl<B: Block> QuantizedType for FastBlocks<B> {
    fn dtype(&self) -> GgmlDType {
        B::DTYPE
    }

    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        B::matmul_packed(self.isa, mkn, lhs, &self.packed, dst)
    }

    fn matmul_t_f16(&self, _: (usize, usize, usize), _: &[f16], _: &mut [f16]) -> Result<()> {
        candle_core::bail!("f16 activations are not supported by moss's kernels")
    }

    fn embedding(&self, ids: &[u32], _rows: usize, hidden: usize) -> Result<CpuStorage> {
        if hidden != self.k {
            candle_core::bail!("an embedding of {hidden} values from rows of {}", self.k);
        }
        Ok(CpuStorage::F32(self.rows(ids)?))
    }

    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        let mut out = vec![0f32; elem_count];
        for (row, o) in self
            .packed
            .chunks(self.per_row())
            .zip(out.chunks_mut(self.k))
        {
            B::unpack(row, o);
        }
        Ok(CpuStorage::F32(out))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.packed.len() * std::mem::size_of::<B::Packed>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.packed.as_ptr() as *const u8
    }

    fn block_size(&self) -> usize {
        QK
    }

    fn from_float(&mut self, xs: &[f32]) {
        let mut blocks = vec![B::default(); xs.len() / QK];
        B::quantize(xs, &mut blocks);
        self.packed = B::pack(blocks, self.k / QK);
    }

    fn from_float_imatrix(&mut self, xs: &[f32], _: &[f32], _: usize) {
        self.from_float(xs)
    }

    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

/// The same tensor with its blocks in moss's kernels when its type has them (CPU only);
/// otherwise the tensor unchanged.
pub fn accelerate(t: QTensor) -> Result<QTensor> {
    if !t.device().is_cpu() {
        return Ok(t);
    }
    let k = *t.shape().dims().last().unwrap_or(&0);
    let storage: Box<dyn QuantizedType> = match t.dtype() {
        GgmlDType::Q5_0 => Box::new(FastBlocks::<BlockQ5_0>::from_bytes(&data(&t)?, k)?),
        GgmlDType::Q8_0 if isa() != Isa::Scalar => {
            Box::new(FastBlocks::<BlockQ8_0>::from_bytes(&data(&t)?, k)?)
        }
        _ => return Ok(t),
    };
    QTensor::new(QStorage::Cpu(storage), t.shape().clone())
}

/// Whether candle's kernel for `dtype` sums one row differently from several rows multiplied at
/// once, so that a sequence decoded in a batch would not get what it gets alone: on x86-64 candle
/// 0.11 multiplies a lone Q6_K row with its compact GEMV and two or more with repacked tiles.
/// `tests/kernels.rs` checks that every other type is indifferent.
pub fn batch_sensitive(dtype: GgmlDType) -> bool {
    cfg!(target_arch = "x86_64") && dtype == GgmlDType::Q6K
}

/// `mm.forward(x)` one row of `x` at a time (rows: every dimension but the last): each row takes
/// the one-row path, as it would alone.
pub fn forward_rows(mm: &QMatMul, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / k.max(1);
    if rows <= 1 {
        return mm.forward(x);
    }
    let flat = x.reshape((rows, k))?.contiguous()?;
    let outs = (0..rows)
        .map(|i| mm.forward(&flat.narrow(0, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    let y = Tensor::cat(&outs, 0)?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rows > 1") = y.dim(1)?;
    y.reshape(shape)
}

fn data(t: &QTensor) -> Result<Cow<'_, [u8]>> {
    t.data()
}
