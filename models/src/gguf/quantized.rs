//! A GGUF Llama-family model with its projection weights kept in the file's own quantized blocks
//! (`Q4_K`, `Q6_K`, `Q5_0`, …) and decoded layer by layer on the fly: the QLoRA-style way to fit
//! a larger model, as [`emloc::nn::QuantizedWeight`]s.

use std::collections::BTreeSet;
use std::path::Path;

use burn::tensor::Device;
use emloc::nn::{Linear, QuantizedWeight, WeightDecoder};

use super::dequant::{GgmlType, dequantize};
use super::llama::{HfTensor, llama_config, plan, unpermute_rows};
use super::reader::GgufFile;
use crate::error::{ModelError, Result};
use crate::llama::{LlamaConfig, LlamaForCausalLM};

/// One GGUF tensor's raw blocks, decoded to HF layout (un-permuted where Llama needs it) on
/// every call.
#[derive(Debug)]
struct GgufBlocks {
    ty: GgmlType,
    bytes: Vec<u8>,
    /// HF `[d_out, d_in]`.
    shape: [usize; 2],
    unpermute_heads: Option<usize>,
}

impl WeightDecoder for GgufBlocks {
    fn shape(&self) -> [usize; 2] {
        self.shape
    }

    fn decode(&self) -> Vec<f32> {
        let values = dequantize(self.ty, &self.bytes)
            .expect("the type and length were checked when the weight was loaded");
        match self.unpermute_heads {
            Some(heads) => unpermute_rows(&values, self.shape[0], self.shape[1], heads),
            None => values,
        }
    }

    fn stored_bytes(&self) -> usize {
        self.bytes.len()
    }
}

/// The HF names of the decoder blocks' projection weights (`…_proj.weight`): the weights that
/// [`load_gguf_quantized`] keeps quantized. Embeddings, norms, biases and the head stay dense.
fn is_projection(hf_name: &str) -> bool {
    hf_name.starts_with("model.layers.") && hf_name.ends_with("_proj.weight")
}

/// Loads the Llama-family GGUF model at `path` with every decoder-block projection kept in
/// the file's quantized blocks ([`Linear::quantize`]: decoded for each forward pass, so the
/// projections cost their GGUF size in memory instead of 4 bytes per weight); the embeddings,
/// norms, biases and head are dequantized to f32 as [`LlamaForCausalLM::load_gguf`] does.
/// Every forward pass computes what the fully dequantized model computes (the same values),
/// up to the order of floating-point sums.
///
/// # Errors
/// Those of [`LlamaForCausalLM::load_gguf_skipping`]; [`ModelError::Emloc`] if a projection's
/// shape does not fit its layer.
pub fn load_gguf_quantized(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<(LlamaForCausalLM, LlamaConfig)> {
    let path = path.as_ref();
    let file = GgufFile::open(path)?;
    let config = llama_config(&file)?;
    let projections: Vec<HfTensor> = plan(&file, &config, &BTreeSet::new())?
        .into_iter()
        .filter(|t| is_projection(&t.hf_name))
        .collect();
    let skip: BTreeSet<String> = projections.iter().map(|t| t.hf_name.clone()).collect();
    let (mut model, config) = LlamaForCausalLM::load_gguf_skipping(path, device, &skip)?;
    let mut blocks = std::collections::BTreeMap::new();
    for tensor in projections {
        let info = file.tensor(&tensor.gguf_name).expect("planned tensors exist");
        let decoder = GgufBlocks {
            ty: info.ggml_type,
            bytes: file.tensor_bytes(&tensor.gguf_name)?,
            shape: [tensor.shape[0], tensor.shape[1]],
            unpermute_heads: tensor.unpermute_heads,
        };
        let layer = tensor.hf_name.trim_end_matches(".weight").to_string();
        blocks.insert(layer, QuantizedWeight::new(decoder));
    }
    let mut quantize = |prefix: String, linear: &mut Linear| -> Result<()> {
        let Some(weight) = blocks.remove(&prefix) else { return Ok(()) };
        *linear = linear.clone().quantize(weight)?;
        Ok(())
    };
    for (i, layer) in model.model.layers.iter_mut().enumerate() {
        let attn = &mut layer.self_attn;
        let mlp = &mut layer.mlp;
        for (name, linear) in [
            ("self_attn.q_proj", &mut attn.q_proj),
            ("self_attn.k_proj", &mut attn.k_proj),
            ("self_attn.v_proj", &mut attn.v_proj),
            ("self_attn.o_proj", &mut attn.o_proj),
            ("mlp.gate_proj", &mut mlp.gate_proj),
            ("mlp.up_proj", &mut mlp.up_proj),
            ("mlp.down_proj", &mut mlp.down_proj),
        ] {
            quantize(format!("model.layers.{i}.{name}"), linear)?;
        }
    }
    if let Some(left) = blocks.keys().next() {
        return Err(ModelError::InvalidInput(format!(
            "{}: projection `{left}` has no layer in the model",
            path.display()
        )));
    }
    Ok((model, config))
}
