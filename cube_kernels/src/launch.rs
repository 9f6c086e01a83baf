//! Launch limits, checked on the host before anything is queued: the address width every
//! buffer of a launch needs, and the grid's cube count per axis.
//!
//! Every kernel of this crate is compiled for the address width its buffers need (CubeCL's
//! `address_type = "dynamic"`): 32-bit indices while every buffer has at most `u32::MAX`
//! elements, 64-bit past that where the runtime has them (CUDA, HIP, Metal, Vulkan/SPIR-V with
//! `shaderInt64` indexing, the CPU runtime). WGSL has only 32-bit indices: there a larger
//! buffer is a [`KernelError::Unaddressable`] instead of an index that silently wraps.

use std::fmt;

use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::std::tensor::TensorHandle;

/// Why a kernel could not be launched. The kernels' host functions panic with this error's
/// message (Burn's backend operations cannot return errors); call [`address_type`] and
/// [`cube_count`] first to get it as a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer has more elements than 32-bit indices reach, and the runtime has no 64-bit
    /// indexing.
    Unaddressable {
        /// Elements of the largest buffer.
        elements: usize,
    },
    /// The launch needs more cubes along one grid axis than the runtime allows.
    GridTooLarge {
        /// The grid axis (0 = x, 1 = y, 2 = z).
        axis: usize,
        /// Cubes needed along it.
        cubes: usize,
        /// The runtime's limit along it.
        max: u32,
    },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unaddressable { elements } => write!(
                f,
                "a buffer of {elements} elements needs 64-bit indices, which this runtime lacks \
                 (at most {} elements with 32-bit indices); split the input",
                u32::MAX
            ),
            Self::GridTooLarge { axis, cubes, max } => write!(
                f,
                "the launch needs {cubes} cubes along grid axis {} but the runtime allows {max}; \
                 split the input",
                ["x", "y", "z"][*axis]
            ),
        }
    }
}

impl std::error::Error for KernelError {}

/// The address width for a launch over buffers of these element counts on `client`: 32-bit up
/// to `u32::MAX` elements, else 64-bit.
///
/// # Errors
/// [`KernelError::Unaddressable`] when 64-bit indices are needed and the runtime lacks them.
pub fn address_type(client: &Client, elements: &[usize]) -> Result<AddressType, KernelError> {
    let has_64 = client.properties().supports_address(AddressType::U64);
    address_type_for(elements, has_64)
}

/// [`address_type`] for a runtime with (`has_64`) or without 64-bit indices.
///
/// # Errors
/// [`KernelError::Unaddressable`] when 64-bit indices are needed and `!has_64`.
pub fn address_type_for(elements: &[usize], has_64: bool) -> Result<AddressType, KernelError> {
    let largest = elements.iter().copied().max().unwrap_or(0);
    match AddressType::from_len(largest) {
        AddressType::U64 if !has_64 => Err(KernelError::Unaddressable { elements: largest }),
        address => Ok(address),
    }
}

/// A static grid of `cubes` (x, y, z) on `client`.
///
/// # Errors
/// [`KernelError::GridTooLarge`] when an axis exceeds the runtime's limit.
pub fn cube_count(client: &Client, cubes: [usize; 3]) -> Result<CubeCount, KernelError> {
    let max = client.properties().hardware.max_cube_count;
    cube_count_for(cubes, [max.0, max.1, max.2])
}

/// [`cube_count`] under per-axis limits `max`.
///
/// # Errors
/// [`KernelError::GridTooLarge`] when an axis exceeds its limit.
pub fn cube_count_for(cubes: [usize; 3], max: [u32; 3]) -> Result<CubeCount, KernelError> {
    for (axis, (&n, max)) in cubes.iter().zip(max).enumerate() {
        if n > max as usize {
            return Err(KernelError::GridTooLarge { axis, cubes: n, max });
        }
    }
    Ok(CubeCount::Static(cubes[0] as u32, cubes[1] as u32, cubes[2] as u32))
}

/// Elements of a tensor's whole buffer (a view may start inside it).
pub(crate) fn buffer_len(tensor: &TensorHandle) -> usize {
    (tensor.handle.size() / tensor.dtype.size() as u64) as usize
}

/// [`address_type`] over tensors' buffers, panicking with the error's message.
pub(crate) fn address_of(client: &Client, tensors: &[&TensorHandle]) -> AddressType {
    let lens: Vec<usize> = tensors.iter().map(|t| buffer_len(t)).collect();
    address_type(client, &lens).unwrap_or_else(|e| panic!("emloc-cube-kernels: {e}"))
}

/// [`cube_count`], panicking with the error's message.
pub(crate) fn grid(client: &Client, cubes: [usize; 3]) -> CubeCount {
    cube_count(client, cubes).unwrap_or_else(|e| panic!("emloc-cube-kernels: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_width_follows_the_largest_buffer() {
        let bound = u32::MAX as usize;
        assert_eq!(address_type_for(&[], false), Ok(AddressType::U32));
        assert_eq!(address_type_for(&[12, bound], false), Ok(AddressType::U32));
        // One element past 32-bit indexing: 64-bit where the runtime has it, else refused.
        assert_eq!(address_type_for(&[12, bound + 1], true), Ok(AddressType::U64));
        assert_eq!(
            address_type_for(&[bound + 1, 3], false),
            Err(KernelError::Unaddressable { elements: bound + 1 })
        );
        // [65536 tokens, 65536 features] in bf16: 2³² elements, beyond u32::MAX.
        let err = address_type_for(&[65536 * 65536], false).unwrap_err();
        assert!(err.to_string().contains("needs 64-bit indices"), "{err}");
    }

    #[test]
    fn grids_past_an_axis_limit_are_refused() {
        // CUDA's limits: 2³¹ − 1 cubes along x, 65535 along y and z.
        let cuda = [i32::MAX as u32, 65535, 65535];
        // 8.4 M tokens in 128-row tiles: 65 537 row tiles, fine along x.
        assert!(cube_count_for([65537, 32, 1], cuda).is_ok());
        let err = cube_count_for([16, 65536, 1], cuda).unwrap_err();
        assert_eq!(err, KernelError::GridTooLarge { axis: 1, cubes: 65536, max: 65535 });
        assert!(err.to_string().contains("grid axis y"), "{err}");
    }
}
