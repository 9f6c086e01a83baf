//! Frozen weights kept in a compact, block-quantized form (QLoRA-style) and decoded to a dense
//! tensor each time a forward pass needs them.
//!
//! The decoding itself belongs to whoever knows the format (the model zoo decodes GGUF's
//! `Q4_K`, `Q6_K`, … blocks); emloc only asks a [`WeightDecoder`] for the dense values. A layer
//! holding a [`QuantizedWeight`] keeps its memory at the compact size; during training with
//! block-level activation recomputation only the block being recomputed holds its decoded
//! weights.

use std::sync::Arc;

use burn::tensor::{Device, FloatDType, Tensor, TensorData};

/// Decodes one frozen weight held in a compact format.
pub trait WeightDecoder: Send + Sync + core::fmt::Debug {
    /// `[d_out, d_in]`: the weight `W` as PyTorch stores it (rows are output features).
    fn shape(&self) -> [usize; 2];
    /// `W`'s values, row-major `[d_out, d_in]`, in f32.
    fn decode(&self) -> Vec<f32>;
    /// Bytes the compact form occupies in memory.
    fn stored_bytes(&self) -> usize;
}

/// A frozen weight in a compact format, decoded for each use. Cloning shares the compact data.
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    decoder: Arc<dyn WeightDecoder>,
}

impl QuantizedWeight {
    /// Wraps `decoder`.
    pub fn new(decoder: impl WeightDecoder + 'static) -> Self {
        Self { decoder: Arc::new(decoder) }
    }

    /// Input features `d_in`.
    pub fn d_input(&self) -> usize {
        self.decoder.shape()[1]
    }

    /// Output features `d_out`.
    pub fn d_output(&self) -> usize {
        self.decoder.shape()[0]
    }

    /// Bytes the compact form occupies.
    pub fn stored_bytes(&self) -> usize {
        self.decoder.stored_bytes()
    }

    /// The decoded `Wᵀ`, shape `[d_in, d_out]` (the layout of [`Linear::weight`](super::Linear)),
    /// on `device` in `dtype`.
    ///
    /// # Panics
    /// If the decoder returns a number of values other than `d_out · d_in`.
    pub fn dense(&self, device: &Device, dtype: FloatDType) -> Tensor<2> {
        let [d_out, d_in] = self.decoder.shape();
        let values = self.decoder.decode();
        assert_eq!(values.len(), d_out * d_in, "WeightDecoder::decode: wrong number of values");
        let weight = Tensor::<2>::from_data(TensorData::new(values, [d_out, d_in]), device);
        weight.cast(dtype).transpose()
    }
}

/// Bytes the quantized weights of every [`Linear`](super::Linear) in `model` hold in their
/// compact form: what a count of the module's float parameters misses.
pub fn quantized_bytes<M: burn::module::Module>(model: &M) -> usize {
    let mut bytes = 0;
    super::hooks::for_each_linear(model, |_, linear| {
        bytes += linear.quantized.as_ref().map_or(0, QuantizedWeight::stored_bytes);
    });
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values `i` stored as `i8`: a compact form of a small integer matrix.
    #[derive(Debug)]
    struct Int8([usize; 2], Vec<i8>);

    impl WeightDecoder for Int8 {
        fn shape(&self) -> [usize; 2] {
            self.0
        }
        fn decode(&self) -> Vec<f32> {
            self.1.iter().map(|&v| f32::from(v)).collect()
        }
        fn stored_bytes(&self) -> usize {
            self.1.len()
        }
    }

    #[test]
    fn the_dense_form_is_the_transposed_decoded_weight() {
        let device = Device::flex();
        let weight = QuantizedWeight::new(Int8([2, 3], vec![1, 2, 3, -4, -5, -6]));
        assert_eq!((weight.d_input(), weight.d_output(), weight.stored_bytes()), (3, 2, 6));
        let dense = weight.dense(&device, FloatDType::F32);
        dense
            .into_data()
            .assert_eq(&TensorData::from([[1.0f32, -4.0], [2.0, -5.0], [3.0, -6.0]]), true);
    }
}
