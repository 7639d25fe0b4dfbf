//! Which SIMD level runs: probed once, cappable with `MOSS_KERNELS` for tests and benchmarks.

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
