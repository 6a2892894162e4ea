//! Which instructions the engine's own kernels may use, decided once at run
//! time.
//!
//! The engine is compiled for the x86-64 baseline (SSE2): no binary it ships
//! assumes more. Every wider path (AVX2 + FMA, AVX-512, AMX) is chosen here,
//! from what the CPU reports, and can be capped with the environment variable
//! `KVEMBED_CPU`, so that a machine with AVX-512 and AMX can run, test and
//! measure the paths of the CPUs most users have:
//!
//! | `KVEMBED_CPU` | kernels allowed |
//! | --- | --- |
//! | `native` (or unset) | everything the CPU has |
//! | `x86-64-v4` | AVX-512 and its extensions (BF16, VNNI), no AMX |
//! | `x86-64-v3` | AVX2, FMA, F16C (no AVX-512, no AMX) |
//! | `x86-64-v2`, `x86-64` | the portable Rust code (what the compiler auto-vectorises for SSE) |
//!
//! The cap never raises the level: `x86-64-v4` on an AVX2 CPU is AVX2. An
//! unknown value is an error at start-up ([`check_env`]), not silently the
//! native level.
//!
//! The third-party f32 matrix products (the `gemm` crate, under candle and the
//! f32 attention kernel) dispatch on their own; the engine builds them
//! without their AVX-512 kernels (see engine/Cargo.toml), so they take the
//! AVX2/FMA path on every CPU that has it, and the scalar path below it.

use once_cell::sync::Lazy;
use std::fmt;

/// The environment variable that caps the instruction-set level.
pub const ENV: &str = "KVEMBED_CPU";

/// An x86-64 micro-architecture level, as the psABI names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// x86-64 (SSE2) and x86-64-v2 (SSE4.2, POPCNT): no wide kernels.
    Baseline,
    /// x86-64-v3: AVX2, FMA, F16C.
    V3,
    /// x86-64-v4: AVX-512 (F, BW, DQ, VL).
    V4,
    /// x86-64-v4 plus AMX (tiles): no cap.
    Native,
}

impl Level {
    /// Parses a `KVEMBED_CPU` value.
    pub fn parse(s: &str) -> Result<Level, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "native" => Ok(Level::Native),
            "x86-64-v4" | "v4" | "avx512" => Ok(Level::V4),
            "x86-64-v3" | "v3" | "avx2" => Ok(Level::V3),
            "x86-64-v2" | "v2" | "x86-64" | "baseline" | "scalar" => Ok(Level::Baseline),
            other => Err(format!(
                "{ENV}='{other}' is not a CPU level: use native, x86-64-v4, x86-64-v3, x86-64-v2 or x86-64"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Baseline => "x86-64",
            Level::V3 => "x86-64-v3",
            Level::V4 => "x86-64-v4",
            Level::Native => "native",
        }
    }
}

/// What the engine's kernels may use: the CPU's features, capped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    /// AVX2 and FMA (x86-64-v3's vector units).
    pub avx2_fma: bool,
    /// AVX-512F.
    pub avx512f: bool,
    /// AVX512-BF16 (f32 → bf16 conversion in one instruction).
    pub avx512bf16: bool,
    /// AVX512-VNNI (int8 dot products, `vpdpbusd`).
    pub avx512vnni: bool,
    /// AMX-BF16 tiles, with the kernel's permission to use them.
    pub amx_bf16: bool,
    /// The cap from `KVEMBED_CPU` (`Native` when unset).
    pub cap: Level,
}

impl Features {
    /// The CPU's own features, before any cap (AMX permission not requested).
    fn detect_cpu() -> Features {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            // CPUID.(EAX=7, ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let amx = leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0;
            let avx512f =
                has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl");
            Features {
                avx2_fma: has!("avx2") && has!("fma") && has!("f16c"),
                avx512f,
                avx512bf16: avx512f && has!("avx512bf16"),
                avx512vnni: avx512f && has!("avx512vnni"),
                amx_bf16: amx && avx512f && has!("avx512bf16"),
                cap: Level::Native,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Features {
            avx2_fma: false,
            avx512f: false,
            avx512bf16: false,
            avx512vnni: false,
            amx_bf16: false,
            cap: Level::Native,
        }
    }

    /// `cpu` with everything above `cap` switched off.
    pub fn capped(cpu: &Features, cap: Level) -> Features {
        Features {
            avx2_fma: cpu.avx2_fma && cap >= Level::V3,
            avx512f: cpu.avx512f && cap >= Level::V4,
            avx512bf16: cpu.avx512bf16 && cap >= Level::V4,
            avx512vnni: cpu.avx512vnni && cap >= Level::V4,
            amx_bf16: cpu.amx_bf16 && cap >= Level::Native,
            cap,
        }
    }

    /// The level the kernels actually run at.
    pub fn level(&self) -> Level {
        if self.amx_bf16 {
            Level::Native
        } else if self.avx512f {
            Level::V4
        } else if self.avx2_fma {
            Level::V3
        } else {
            Level::Baseline
        }
    }
}

impl fmt::Display for Features {
    /// e.g. `x86-64-v3 (avx2+fma; capped by KVEMBED_CPU=x86-64-v3)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.amx_bf16 {
            parts.push("amx-bf16");
        }
        if self.avx512bf16 {
            parts.push("avx512bf16");
        }
        if self.avx512vnni {
            parts.push("avx512vnni");
        }
        if self.avx512f {
            parts.push("avx512f");
        }
        if self.avx2_fma {
            parts.push("avx2+fma");
        }
        if parts.is_empty() {
            parts.push("no wide kernels");
        }
        let level = match self.level() {
            Level::Native => "x86-64-v4+amx",
            l => l.name(),
        };
        write!(f, "{level} ({}", parts.join(", "))?;
        if self.cap != Level::Native {
            write!(f, "; capped by {ENV}={}", self.cap.name())?;
        }
        write!(f, ")")
    }
}

static FEATURES: Lazy<Features> = Lazy::new(|| {
    let cap = std::env::var(ENV)
        .ok()
        .map(|v| Level::parse(&v).unwrap_or(Level::Baseline))
        .unwrap_or(Level::Native);
    let mut f = Features::capped(&Features::detect_cpu(), cap);
    // Linux hands out the 8 KiB tile data state only on request.
    f.amx_bf16 = f.amx_bf16 && request_amx_permission();
    f
});

/// The features the kernels may use (detected and capped once).
pub fn features() -> &'static Features {
    &FEATURES
}

/// Checks `KVEMBED_CPU`: the engine refuses to start on a value it does not
/// know, rather than run at a level nobody asked for. (An unknown value that
/// slips past this check falls back to the most conservative level.)
pub fn check_env() -> Result<(), String> {
    match std::env::var(ENV) {
        Ok(v) => Level::parse(&v).map(|_| ()),
        Err(_) => Ok(()),
    }
}

/// AVX2 + FMA kernels allowed.
pub fn avx2_fma() -> bool {
    FEATURES.avx2_fma
}

/// AVX-512F kernels allowed.
pub fn avx512f() -> bool {
    FEATURES.avx512f
}

/// AVX512-BF16 conversions allowed.
pub fn avx512bf16() -> bool {
    FEATURES.avx512bf16
}

/// AVX512-VNNI int8 products allowed.
pub fn avx512vnni() -> bool {
    FEATURES.avx512vnni
}

/// AMX-BF16 tile products allowed (and permitted by the kernel).
pub fn amx_bf16() -> bool {
    FEATURES.amx_bf16
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_amx_permission() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Features {
        Features {
            avx2_fma: true,
            avx512f: true,
            avx512bf16: true,
            avx512vnni: true,
            amx_bf16: true,
            cap: Level::Native,
        }
    }

    #[test]
    fn levels_parse_and_unknown_values_are_refused() {
        assert_eq!(Level::parse("x86-64-v3"), Ok(Level::V3));
        assert_eq!(Level::parse(" X86-64-V4 "), Ok(Level::V4));
        assert_eq!(Level::parse("x86-64"), Ok(Level::Baseline));
        assert_eq!(Level::parse("x86-64-v2"), Ok(Level::Baseline));
        assert_eq!(Level::parse("native"), Ok(Level::Native));
        let err = Level::parse("haswell").unwrap_err();
        assert!(err.contains("KVEMBED_CPU='haswell'"), "{err}");
    }

    #[test]
    fn a_cap_switches_off_everything_above_it_and_never_adds() {
        let v3 = Features::capped(&all(), Level::V3);
        assert!(v3.avx2_fma && !v3.avx512f && !v3.avx512bf16 && !v3.avx512vnni && !v3.amx_bf16);
        assert_eq!(v3.level(), Level::V3);
        let v4 = Features::capped(&all(), Level::V4);
        assert!(v4.avx512f && v4.avx512bf16 && !v4.amx_bf16);
        assert_eq!(v4.level(), Level::V4);
        let base = Features::capped(&all(), Level::Baseline);
        assert_eq!(base.level(), Level::Baseline);
        assert!(!base.avx2_fma);
        // An AVX2-only CPU stays AVX2 under a v4 cap.
        let avx2_cpu = Features {
            avx2_fma: true,
            avx512f: false,
            avx512bf16: false,
            avx512vnni: false,
            amx_bf16: false,
            cap: Level::Native,
        };
        assert_eq!(Features::capped(&avx2_cpu, Level::V4).level(), Level::V3);
        assert_eq!(Features::capped(&avx2_cpu, Level::Native), avx2_cpu);
    }

    #[test]
    fn the_description_names_the_level_and_the_cap() {
        assert_eq!(
            Features::capped(&all(), Level::V3).to_string(),
            "x86-64-v3 (avx2+fma; capped by KVEMBED_CPU=x86-64-v3)"
        );
        assert_eq!(
            all().to_string(),
            "x86-64-v4+amx (amx-bf16, avx512bf16, avx512vnni, avx512f, avx2+fma)"
        );
        assert_eq!(
            Features::capped(&all(), Level::Baseline).to_string(),
            "x86-64 (no wide kernels; capped by KVEMBED_CPU=x86-64)"
        );
    }

    #[test]
    fn the_process_features_never_exceed_the_cpu() {
        let cpu = Features::detect_cpu();
        let f = features();
        assert!(!f.avx2_fma || cpu.avx2_fma);
        assert!(!f.avx512f || cpu.avx512f);
        assert!(!f.avx512bf16 || cpu.avx512bf16);
        assert!(!f.avx512vnni || cpu.avx512vnni);
        assert!(!f.amx_bf16 || cpu.amx_bf16);
    }
}
