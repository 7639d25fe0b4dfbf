//! moss-kernels: quantized matrix products for the GGUF block types candle 0.11 leaves scalar on x86: Q5_0
//! (two thirds of the bytes of the default Q4_K_M model) and, for completeness, Q8_0.
//!
//! `W` is a GGUF weight matrix of `n` rows of `k` values (blocks of 32); `X` is `m` rows of `k`
//! f32 activations. `matmul` quantises each row of X to Q8_0 once, then computes every output
//! with an integer dot product: AVX2 when the CPU has it (checked at run time, so a portable build
//! is fast too), else a plain scalar loop. Work is split over weight rows on candle's own thread
//! pool; each weight row is read once for all rows of X (prefill and batched decode).
//!
//! `QuantizedType` lets a candle `QTensor` hold these blocks, so `QMatMul` uses them unchanged.
//!
//! A crate of its own so that it is compiled optimised even in test builds (see the root
//! Cargo.toml's `[profile.dev.package."*"]`): SIMD intrinsics unoptimised are slower than the
//! scalar loop. Its tests are in the root package (`tests/kernels.rs`).

use std::borrow::Cow;

pub mod attention;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Module, Result, Tensor};
use half::f16;

/// Values per block (Q5_0 and Q8_0).
pub const QK: usize = 32;

/// GGUF Q5_0: 32 values `d * (q - 16)`, q 5 bits: low 4 bits in `qs` (value j in the low nibble
/// of byte j, value j+16 in its high nibble), 5th bit j in bit j of `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_0 {
    pub d: u16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

/// GGUF Q8_0: 32 values `d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
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
    Avx2,
    Scalar,
}

/// The best implementation this CPU supports; `MOSS_KERNELS=avx2` or `=scalar` caps it
/// (benchmarks and tests compare them).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("MOSS_KERNELS").unwrap_or_default();
        let best = detect();
        match (cap.as_str(), best) {
            ("scalar", _) => Isa::Scalar,
            ("avx2", Isa::Avx512Vnni) => Isa::Avx2,
            _ => best,
        }
    })
}

/// `isa` if this CPU can run it, else the best it can (so that no caller can reach instructions
/// the CPU lacks).
pub fn supported(isa: Isa) -> Isa {
    let rank = |i: Isa| match i {
        Isa::Avx512Vnni => 0,
        Isa::Avx2 => 1,
        Isa::Scalar => 2,
    };
    let best = detect();
    if rank(isa) >= rank(best) {
        isa
    } else {
        best
    }
}

/// Every implementation this CPU can run, best first.
pub fn available() -> Vec<Isa> {
    let all = [Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar];
    let best = all.iter().position(|i| *i == detect()).unwrap_or(2);
    all[best..].to_vec()
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
        if avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            return Isa::Avx512Vnni;
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
pub trait Block: Copy + Send + Sync + 'static {
    const DTYPE: GgmlDType;
    fn dequantize(blocks: &[Self], out: &mut [f32]);
    /// Dot products of one weight row with N activation rows (`yd`: their block scales as f32).
    fn rows<const N: usize>(
        isa: Isa,
        w: &[Self],
        ys: [&[BlockQ8_0]; N],
        yd: [&[f32]; N],
    ) -> [f32; N];
    fn quantize(xs: &[f32], out: &mut [Self]);

    /// `rows` for `Isa::Avx512Vnni`, with activations as plain bytes (`k` per row) so that two
    /// blocks load as one 512-bit vector.
    ///
    /// # Safety
    /// The CPU must have the `Isa::Avx512Vnni` features; each `ys[r]` holds `32 * w.len()` bytes
    /// and each `yd[r]` `w.len()` scales.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_wide<const N: usize>(w: &[Self], ys: [&[i8]; N], yd: [&[f32]; N]) -> [f32; N];

    /// One dot product (tests and references).
    fn dot(isa: Isa, xs: &[Self], ys: &[BlockQ8_0]) -> f32 {
        let yd: Vec<f32> = ys.iter().map(|y| half(y.d)).collect();
        Self::rows::<1>(isa, xs, [ys], [&yd])[0]
    }
}

/// Runs `simd::<level>::$kernel` for the SIMD levels, `$scalar` otherwise.
macro_rules! dispatch {
    ($isa:expr, $kernel:ident, $scalar:ident, $w:expr, $ys:expr, $yd:expr) => {
        match supported($isa) {
            // Activations in blocks: the 256-bit AVX2 kernel (the AVX-512 kernels read the byte
            // layout of `rows_wide`, which `matmul` uses on those CPUs).
            #[cfg(target_arch = "x86_64")]
            // SAFETY: each level is only chosen when the CPU reports its features (`detect`), and
            // AVX-512 VNNI implies AVX2.
            Isa::Avx512Vnni | Isa::Avx2 => unsafe { simd::avx2::$kernel($w, $ys, $yd) },
            _ => {
                let mut out = [0f32; N];
                for r in 0..N {
                    out[r] = $scalar($w, $ys[r], $yd[r]);
                }
                out
            }
        }
    };
}

impl Block for BlockQ5_0 {
    const DTYPE: GgmlDType = GgmlDType::Q5_0;

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

    #[inline]
    fn rows<const N: usize>(
        isa: Isa,
        w: &[Self],
        ys: [&[BlockQ8_0]; N],
        yd: [&[f32]; N],
    ) -> [f32; N] {
        dispatch!(isa, rows_q5_0, dot_q5_0_scalar, w, ys, yd)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn rows_wide<const N: usize>(w: &[Self], ys: [&[i8]; N], yd: [&[f32]; N]) -> [f32; N] {
        simd::wide::rows_q5_0(w, ys, yd)
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
}

impl Block for BlockQ8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        for (b, out) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = half(b.d);
            for (o, q) in out.iter_mut().zip(b.qs) {
                *o = d * q as f32;
            }
        }
    }

    #[inline]
    fn rows<const N: usize>(
        isa: Isa,
        w: &[Self],
        ys: [&[BlockQ8_0]; N],
        yd: [&[f32]; N],
    ) -> [f32; N] {
        dispatch!(isa, rows_q8_0, dot_q8_0_scalar, w, ys, yd)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn rows_wide<const N: usize>(w: &[Self], ys: [&[i8]; N], yd: [&[f32]; N]) -> [f32; N] {
        simd::wide::rows_q8_0(w, ys, yd)
    }

    fn quantize(xs: &[f32], out: &mut [Self]) {
        quantize_q8_0(xs, out)
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

fn dot_q5_0_scalar(xs: &[BlockQ5_0], ys: &[BlockQ8_0], yd: &[f32]) -> f32 {
    let mut sum = 0f32;
    for ((x, y), yd) in xs.iter().zip(ys).zip(yd) {
        let qh = u32::from_le_bytes(x.qh);
        let mut acc = 0i32;
        for j in 0..16 {
            let lo = ((x.qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4) as i32 - 16;
            let hi = ((x.qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32 - 16;
            acc += lo * y.qs[j] as i32 + hi * y.qs[j + 16] as i32;
        }
        sum += half(x.d) * yd * acc as f32;
    }
    sum
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
    use super::{BlockQ5_0, BlockQ8_0};
    use std::arch::x86_64::*;

    /// An f16 block scale as f32, with F16C (inlined into the kernels).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 values of a Q5_0 block as signed bytes (q - 16), in value order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_q5_0(b: &BlockQ5_0) -> __m256i {
        let q = _mm_loadu_si128(b.qs.as_ptr() as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        let nibbles = _mm256_set_m128i(hi, lo);
        // Byte i of `bytes` holds byte i/8 of qh (lanes are 16 bytes: lane 1 reads qh[2..4]).
        let qh = _mm256_set1_epi32(i32::from_le_bytes(b.qh));
        let pick = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bytes = _mm256_shuffle_epi8(qh, pick);
        // Byte i tests bit i % 8.
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
        // q - 16 = nibble when the 5th bit is set, nibble - 16 (nibble | 0xF0 as i8) when not.
        let minus16 = _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles, minus16)
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

        rows_kernel!("avx2,fma,f16c", rows_q5_0, unpack_q5_0, BlockQ5_0, dot);
        rows_kernel!("avx2,fma,f16c", rows_q8_0, unpack_q8_0, BlockQ8_0, dot);
    }

    /// Two blocks per 512-bit register (AVX-512 BW + VNNI); activations as plain bytes.
    pub mod wide {
        use super::*;

        macro_rules! wide_kernel {
            ($name:ident, $unpack:ident, $W:ty) => {
                #[inline]
                #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
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
                        let qx =
                            _mm512_inserti64x4(_mm512_castsi256_si512($unpack(a)), $unpack(b), 1);
                        let ax = _mm512_abs_epi8(qx);
                        let negative = _mm512_movepi8_mask(qx);
                        let dw = _mm512_permutexvar_ps(
                            halves,
                            _mm512_castps128_ps512(_mm_setr_ps(half(a.d), half(b.d), 0.0, 0.0)),
                        );
                        for r in 0..N {
                            let qy =
                                _mm512_loadu_si512(ys[r].as_ptr().add(64 * p) as *const __m512i);
                            // y takes x's sign, so |x| (unsigned) times it is x times y.
                            let sy = _mm512_mask_sub_epi8(qy, negative, zero, qy);
                            let d = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax, sy));
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
                            let qy = _mm256_loadu_si256(
                                ys[r].as_ptr().add(32 * (kb - 1)) as *const __m256i
                            );
                            let sy = _mm256_sign_epi8(qy, qx);
                            let d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy);
                            let v = _mm256_cvtepi32_ps(d);
                            out[r] += half(x.d) * yd[r][kb - 1] * hsum(v);
                        }
                    }
                    out
                }
            };
        }

        wide_kernel!(rows_q5_0, unpack_q5_0, BlockQ5_0);
        wide_kernel!(rows_q8_0, unpack_q8_0, BlockQ8_0);
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
    let isa = supported(isa);
    if k == 0 || k % QK != 0 || lhs.len() != m * k || w.len() != n * (k / QK) || dst.len() < m * n {
        candle_core::bail!(
            "quantized matmul: shapes do not fit (m {m}, k {k}, n {n}, lhs {}, blocks {})",
            lhs.len(),
            w.len()
        );
    }
    let kb = k / QK;
    let mut xq = vec![BlockQ8_0 { d: 0, qs: [0; 32] }; m * kb];
    for (row, out) in lhs.chunks_exact(k).zip(xq.chunks_exact_mut(kb)) {
        quantize_q8_0(row, out);
    }
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
        m,
        k,
        n,
        w,
        xq: &xq,
        xd: &xd,
        bytes: &bytes,
        dst: dst.as_mut_ptr() as usize,
    };
    let groups = n.div_ceil(GROUP);
    candle_core::utils::barrier_pool().execute_chunked(groups, |range| match isa {
        // The loop over rows compiled with the SIMD features, so that the kernels inline into it
        // (otherwise a portable build calls them once per weight row).
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` came through `supported`: the CPU has these features.
        Isa::Avx512Vnni => unsafe { job.groups_avx512(range) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { job.groups_avx2(range) },
        _ => job.groups(range),
    });
    Ok(())
}

/// Weight rows per work item; each group is read once for all rows of X.
const GROUP: usize = 8;

/// One quantized product, shared by the work items of the thread pool.
struct Job<'a, B: Block> {
    isa: Isa,
    wide: bool,
    m: usize,
    k: usize,
    n: usize,
    w: &'a [B],
    xq: &'a [BlockQ8_0],
    xd: &'a [f32],
    bytes: &'a [i8],
    /// `dst` as an address (written through by disjoint work items).
    dst: usize,
}

impl<B: Block> Job<'_, B> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn groups_avx2(&self, range: std::ops::Range<usize>) {
        self.groups(range)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn groups_avx512(&self, range: std::ops::Range<usize>) {
        self.groups(range)
    }

    /// Weight-row groups `range`: each weight row against tiles of activation rows (the weight
    /// blocks are unpacked once for all rows of a tile).
    #[inline(always)]
    fn groups(&self, range: std::ops::Range<usize>) {
        let Self {
            isa,
            wide,
            m,
            k,
            n,
            w,
            xq,
            xd,
            bytes,
            dst,
        } = *self;
        let kb = k / QK;
        macro_rules! tile {
            ($n:literal, $wrow:expr, $i:expr) => {{
                let yd: [&[f32]; $n] =
                    std::array::from_fn(|t| &xd[($i + t) * kb..($i + t + 1) * kb]);
                let blocks = || -> [f32; $n] {
                    let ys: [&[BlockQ8_0]; $n] =
                        std::array::from_fn(|t| &xq[($i + t) * kb..($i + t + 1) * kb]);
                    B::rows::<$n>(isa, $wrow, ys, yd)
                };
                #[cfg(target_arch = "x86_64")]
                let v = if wide {
                    let ys: [&[i8]; $n] =
                        std::array::from_fn(|t| &bytes[($i + t) * k..($i + t + 1) * k]);
                    // SAFETY: `wide` is only set when `isa()` found the AVX-512 VNNI features;
                    // the slices have the lengths asserted inside.
                    unsafe { B::rows_wide::<$n>($wrow, ys, yd) }
                } else {
                    blocks()
                };
                #[cfg(not(target_arch = "x86_64"))]
                let v = {
                    let _ = (wide, bytes);
                    blocks()
                };
                v
            }};
        }
        for g in range {
            for j in g * GROUP..((g + 1) * GROUP).min(n) {
                let wrow = &w[j * kb..(j + 1) * kb];
                let put = |i: usize, v: f32| {
                    // SAFETY: each (i, j) is written by exactly one work item, within m * n.
                    unsafe { *(dst as *mut f32).add(i * n + j) = v };
                };
                let mut i = 0;
                while i + 8 <= m {
                    let v: [f32; 8] = tile!(8, wrow, i);
                    v.into_iter().enumerate().for_each(|(t, v)| put(i + t, v));
                    i += 8;
                }
                while i + 4 <= m {
                    let v: [f32; 4] = tile!(4, wrow, i);
                    v.into_iter().enumerate().for_each(|(t, v)| put(i + t, v));
                    i += 4;
                }
                while i < m {
                    let v: [f32; 1] = tile!(1, wrow, i);
                    put(i, v[0]);
                    i += 1;
                }
            }
        }
    }
}

/// Blocks held for candle: a `QTensor` whose matmul runs these kernels.
pub struct FastBlocks<B: Block> {
    blocks: Vec<B>,
    isa: Isa,
}

impl<B: Block> FastBlocks<B> {
    /// Copies raw GGUF bytes into blocks.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let size = std::mem::size_of::<B>();
        if data.len() % size != 0 {
            candle_core::bail!("{} bytes are not whole {:?} blocks", data.len(), B::DTYPE);
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
        Ok(Self { blocks, isa: isa() })
    }

    pub fn blocks(&self) -> &[B] {
        &self.blocks
    }

    /// Dequantises rows `ids` of a `rows` × `hidden` matrix (an embedding lookup).
    pub fn rows(&self, ids: &[u32], hidden: usize) -> Result<Vec<f32>> {
        let per_row = hidden / QK;
        let rows = self.blocks.len() / per_row.max(1);
        let mut out = vec![0f32; ids.len() * hidden];
        for (o, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            let id = id as usize;
            if id >= rows {
                candle_core::bail!("token id {id} is out of range for {rows} rows");
            }
            B::dequantize(&self.blocks[id * per_row..(id + 1) * per_row], o);
        }
        Ok(out)
    }
}

impl<B: Block> QuantizedType for FastBlocks<B> {
    fn dtype(&self) -> GgmlDType {
        B::DTYPE
    }

    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        matmul(self.isa, mkn, lhs, &self.blocks, dst)
    }

    fn matmul_t_f16(&self, _: (usize, usize, usize), _: &[f16], _: &mut [f16]) -> Result<()> {
        candle_core::bail!("f16 activations are not supported by moss's kernels")
    }

    fn embedding(&self, ids: &[u32], _rows: usize, hidden: usize) -> Result<CpuStorage> {
        Ok(CpuStorage::F32(self.rows(ids, hidden)?))
    }

    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        let mut out = vec![0f32; elem_count];
        B::dequantize(&self.blocks, &mut out);
        Ok(CpuStorage::F32(out))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<B>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.blocks.as_ptr() as *const u8
    }

    fn block_size(&self) -> usize {
        QK
    }

    fn from_float(&mut self, xs: &[f32]) {
        B::quantize(xs, &mut self.blocks)
    }

    fn from_float_imatrix(&mut self, xs: &[f32], _: &[f32], _: usize) {
        B::quantize(xs, &mut self.blocks)
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
    let storage: Box<dyn QuantizedType> = match t.dtype() {
        GgmlDType::Q5_0 => Box::new(FastBlocks::<BlockQ5_0>::from_bytes(&data(&t)?)?),
        GgmlDType::Q8_0 if isa() != Isa::Scalar => {
            Box::new(FastBlocks::<BlockQ8_0>::from_bytes(&data(&t)?)?)
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
