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
}

impl DeviceChoice {
    /// Every choice, in the order the CLI lists them.
    pub const ALL: [Self; 3] = [Self::Cpu, Self::Wgpu, Self::Cuda];

    /// The name the CLI and config files use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
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
            EmlocError::InvalidConfig(format!("unknown device `{s}` (expected cpu, wgpu or cuda)"))
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
    }
}
