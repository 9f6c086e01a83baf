//! The device a pipeline runs on, chosen by name: the one place where a [`DeviceChoice`] becomes a
//! Burn [`Device`], so that every stage of a tool built on emloc can offer the same choice.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::error::{EmlocError, Result};

/// Where tensors live and kernels run.
///
/// With the `clap` feature it is a `clap::ValueEnum` with the names of [`name`](Self::name)
/// (the help of each value is its summary here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The host CPU through Burn's Flex backend (dense products through faer); always built.
    #[default]
    Cpu,
    /// The default wgpu adapter (a GPU, or Mesa's lavapipe on the CPU), with emloc's CubeCL
    /// kernels; needs the `wgpu` feature.
    Wgpu,
    /// The first CUDA GPU, with emloc's CubeCL kernels; needs the `cuda` feature.
    Cuda,
    /// The host CPU through CubeCL's LLVM CPU runtime, with emloc's CubeCL kernels; needs the
    /// `cpu` feature (and its offline LLVM bundle, see the repository's BENCHMARKS.md).
    #[serde(rename = "cubecl-cpu")]
    #[cfg_attr(feature = "clap", value(name = "cubecl-cpu"))]
    CubeclCpu,
}

impl DeviceChoice {
    /// Every choice, in the order the CLI lists them.
    pub const ALL: [Self; 4] = [Self::Cpu, Self::Wgpu, Self::Cuda, Self::CubeclCpu];

    /// The name the CLI and config files use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
            Self::CubeclCpu => "cubecl-cpu",
        }
    }

    /// The Burn device.
    ///
    /// # Errors
    /// [`EmlocError::DeviceUnavailable`] naming the feature to build with when this build lacks
    /// the backend.
    pub fn device(self) -> Result<Device> {
        let unavailable = |feature: &str| EmlocError::DeviceUnavailable {
            device: self.name().into(),
            feature: format!("emloc/{feature}"),
        };
        match self {
            Self::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(not(feature = "wgpu"))]
            Self::Wgpu => Err(unavailable("wgpu")),
            #[cfg(feature = "cuda")]
            Self::Cuda => Ok(Device::cuda(0)),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda => Err(unavailable("cuda")),
            #[cfg(feature = "cpu")]
            Self::CubeclCpu => Ok(Device::cpu()),
            #[cfg(not(feature = "cpu"))]
            Self::CubeclCpu => Err(unavailable("cpu")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeviceChoice {
    type Err = EmlocError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|c| c.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            EmlocError::InvalidConfig(format!(
                "unknown device `{s}` (expected cpu, wgpu, cuda or cubecl-cpu)"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_cpu_is_always_there() {
        for choice in DeviceChoice::ALL {
            assert_eq!(choice.name().parse::<DeviceChoice>().unwrap(), choice);
        }
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert_eq!(DeviceChoice::Cpu.device().unwrap(), Device::flex());
        #[cfg(not(feature = "cuda"))]
        assert!(matches!(
            DeviceChoice::Cuda.device(),
            Err(EmlocError::DeviceUnavailable { feature, .. }) if feature == "emloc/cuda"
        ));
        #[cfg(not(feature = "cpu"))]
        assert!(matches!(
            DeviceChoice::CubeclCpu.device(),
            Err(EmlocError::DeviceUnavailable { feature, .. }) if feature == "emloc/cpu"
        ));
    }
}
