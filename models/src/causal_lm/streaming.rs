//! Streaming emulator construction: a decoder's emulator built one block at a time.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use emloc::{EmulatorConfig, EmulatorReport, FactorizationProgress};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::gguf::llama::{expected_shapes, llama_config};
use crate::llama::{AttentionInputs, LlamaConfig, LlamaForCausalLM, PaddingMask};

use super::is_gguf;

/// Where [`emulate_streaming`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamingProgress<'a> {
    /// A part (decoder block, then the head) has been loaded, calibrated and factored.
    Part {
        /// Parts done, this one included.
        done: usize,
        /// Parts in all: the decoder blocks, plus the head when it is untied.
        total: usize,
    },
    /// A layer has been factored; `done` and `total` count the layers of the whole model.
    Layer(FactorizationProgress<'a>),
}

/// Builds the emulator of the Llama-family model at `path` (an HF directory with safetensors
/// weights, or a `.gguf` file) block by block, never holding the whole original. `sequences` are
/// the calibration token sequences, each run as a batch of one. The frozen weights are held
/// and calibrated in `dtype` ([`emloc::cast_frozen`]; `F32` keeps the checkpoint's values
/// exactly). Returns the emulator (dense
/// layers loaded, selected layers factored) and the same report as [`emloc::emulate`], except
/// for its timings.
///
/// [`emloc::emulate`] calibrates the whole original model and then factors it, so it holds every
/// dense weight plus every layer's Gram matrix: about 2.1× the memory of running the model on
/// a 1.24 B Llama. This function instead
/// 1. loads the embeddings, the final norm and the head (every decoder block stays a lazily
///    initialised placeholder that holds no memory);
/// 2. embeds the calibration sequences (one hidden state per sequence, `[1, len, d]`);
/// 3. for each block in order: reads only that block's weights from the checkpoint
///    (safetensors through memory maps, GGUF tensor by tensor), runs it on the hidden states
///    while its layers accumulate their Grams, keeps its outputs as the next block's inputs,
///    factors its selected layers and drops their dense weights ([`emloc::emulate_part`]);
/// 4. calibrates and factors the head the same way, when a rule selects it.
///
/// Every layer sees exactly the inputs, in the same order, that the whole-model calibration of
/// [`emloc::emulate`] gives it (one sequence per forward pass, no padding), so the emulator is
/// the same, bit for bit, as `emulate` with a forward pass per sequence on the loaded original.
///
/// Peak memory: the embeddings, norm and head, the factors built so far, one dense block, the
/// hidden states of every calibration sequence, and one block's Gram matrices.
///
/// # Errors
/// [`ModelError::InvalidInput`] for no or an empty calibration sequence; the loader's errors
/// for the checkpoint (read before any work); [`ModelError::Emloc`] for the emulator config
/// (checked first) and for what [`emloc::emulate`] reports (no layer selected in the whole
/// model, a non-finite weight or Gram).
pub fn emulate_streaming(
    path: &Path,
    device: &Device,
    sequences: &[Vec<u32>],
    config: &EmulatorConfig,
    dtype: FloatDType,
    mut on_progress: impl FnMut(StreamingProgress<'_>),
) -> Result<(LlamaForCausalLM, EmulatorReport)> {
    config.validate()?;
    if sequences.is_empty() || sequences.iter().any(Vec::is_empty) {
        return Err(ModelError::InvalidInput(
            "streaming emulation needs at least one calibration sequence, none empty".into(),
        ));
    }
    let model_config = read_config(path)?;
    let all_params = parameter_paths_of(&model_config);
    let block_prefix = |l: usize| format!("model.layers.{l}.");
    let blocks: BTreeSet<String> =
        all_params.iter().filter(|p| p.starts_with("model.layers.")).cloned().collect();

    // The embeddings, the final norm and the head; the blocks stay lazy placeholders.
    let mut model = cast(load_weights_skipping(path, device, &blocks)?, dtype);
    let layers = model.model.layers.len();
    let total_layers = selected_layers(&model_config, model.lm_head.is_none(), config)?;
    let total_parts = layers + usize::from(model.lm_head.is_some());

    let rope = model.model.layers.first().map(|l| l.self_attn.rope.clone());
    let mut hidden: Vec<Tensor<3>> = sequences
        .iter()
        .map(|ids| {
            let data = TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, ids.len()]);
            model.model.embed_tokens.forward(Tensor::<2, Int>::from_data(data, device))
        })
        .collect();
    // The positions and causal mask of each sequence, as the whole-model forward builds them.
    let inputs: Vec<AttentionInputs> = match &rope {
        Some(rope) => sequences
            .iter()
            .map(|ids| {
                let mask = PaddingMask::all_real(1, ids.len());
                AttentionInputs::uncached(rope, &mask, device)
            })
            .collect(),
        None => Vec::new(),
    };

    let mut report = EmulatorReport { calibration_batches: sequences.len(), ..Default::default() };
    // Layers are numbered over the whole model, not per part.
    let mut factored = 0;
    let mut emit = |event: StreamingProgress<'_>| match event {
        StreamingProgress::Layer(p) => {
            factored += 1;
            on_progress(StreamingProgress::Layer(FactorizationProgress {
                done: factored,
                total: total_layers,
                path: p.path,
            }))
        }
        part => on_progress(part),
    };
    let absorb = |part: EmulatorReport, report: &mut EmulatorReport| {
        report.layers.extend(part.layers);
        report.calibration_seconds += part.calibration_seconds;
        report.construction_seconds += part.construction_seconds;
    };
    for l in 0..layers {
        let prefix = block_prefix(l);
        let skip: BTreeSet<String> =
            all_params.iter().filter(|p| !p.starts_with(&prefix)).cloned().collect();
        let loaded = load_weights_skipping(path, device, &skip)?;
        let block = loaded.model.layers.into_iter().nth(l).expect("the config's block count");
        let block = cast(block, dtype);
        let part_path = prefix.trim_end_matches('.');
        let selects = emloc::linear_layers(&block).iter().any(|layer| {
            let path = format!("{part_path}.{}", layer.path);
            matches!(config.rank_of(&path, layer.d_in, layer.d_out), Ok(Some(_)))
        });
        let block = if selects {
            let (block, part) = emloc::emulate_part(
                block,
                part_path,
                hidden.iter_mut().zip(&inputs),
                |block: &crate::llama::LlamaDecoderLayer, (h, inputs): (&mut Tensor<3>, _)| {
                    *h = block.forward_with(h.clone(), inputs, None);
                },
                config,
                |p| emit(StreamingProgress::Layer(p)),
            )?;
            absorb(part, &mut report);
            block
        } else {
            let started = Instant::now();
            for (h, inputs) in hidden.iter_mut().zip(&inputs) {
                *h = block.forward_with(h.clone(), inputs, None);
            }
            report.calibration_seconds += started.elapsed().as_secs_f64();
            block
        };
        model.model.layers[l] = block;
        emit(StreamingProgress::Part { done: l + 1, total: total_parts });
    }

    if let Some(head) = model.lm_head.take() {
        let selects = emloc::linear_layers(&head)
            .iter()
            .any(|layer| matches!(config.rank_of("lm_head", layer.d_in, layer.d_out), Ok(Some(_))));
        let head = if selects {
            let norm = &model.model.norm;
            let (head, part) = emloc::emulate_part(
                head,
                "lm_head",
                hidden.iter(),
                |head: &emloc::Linear, h: &Tensor<3>| {
                    head.forward(norm.forward(h.clone()));
                },
                config,
                |p| emit(StreamingProgress::Layer(p)),
            )?;
            absorb(part, &mut report);
            head
        } else {
            head
        };
        model.lm_head = Some(head);
        emit(StreamingProgress::Part { done: total_parts, total: total_parts });
    }
    if report.layers.is_empty() {
        return Err(emloc::EmlocError::NoMatchingLayers(format!(
            "the emulator rules {:?}",
            config.rules.iter().map(|r| &r.pattern).collect::<Vec<_>>()
        ))
        .into());
    }
    let emulated: BTreeSet<&str> = report.layers.iter().map(|l| l.path.as_str()).collect();
    report.dense_layers = emloc::linear_layers(&model)
        .into_iter()
        .map(|l| l.path)
        .filter(|p| !emulated.contains(p.as_str()))
        .collect();
    Ok((model, report))
}

/// `model` with its frozen weights in `dtype` (unchanged for f32: bit for bit the checkpoint).
fn cast<M: burn::module::Module>(model: M, dtype: FloatDType) -> M {
    match dtype {
        FloatDType::F32 => model,
        _ => emloc::cast_frozen(model, dtype),
    }
}

/// The config of the Llama-family model at `path`: an HF directory's `config.json`, or a GGUF
/// file's metadata.
///
/// # Errors
/// A missing or malformed config, or a GGUF file without Llama metadata.
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    if is_gguf(path) {
        llama_config(&GgufFile::open(path)?)
    } else {
        LlamaConfig::from_file(path.join("config.json"))
    }
}

fn parameter_paths_of(config: &LlamaConfig) -> BTreeSet<String> {
    expected_shapes(config).into_keys().chain(["lm_head.weight".to_string()]).collect()
}

/// The module path of every parameter the Llama-family model at `path` (HF directory or
/// `.gguf`) can have (`lm_head.weight` included even when the head is tied), from its config
/// alone: the `skip` that loads a model's tokenizer, template and config without its weights
/// ([`load_causal_lm`](super::load_causal_lm)).
///
/// # Errors
/// As [`read_config`].
pub fn parameter_paths(path: &Path) -> Result<BTreeSet<String>> {
    Ok(parameter_paths_of(&read_config(path)?))
}

/// The weights of the Llama-family model at `path` (HF directory or `.gguf`, no tokenizer
/// needed), the parameters at `skip` left unread as lazy placeholders that hold no memory.
///
/// # Errors
/// The loaders' ([`LlamaForCausalLM::load_skipping`], [`LlamaForCausalLM::load_gguf_skipping`]).
pub fn load_weights_skipping(
    path: &Path,
    device: &Device,
    skip: &BTreeSet<String>,
) -> Result<LlamaForCausalLM> {
    if is_gguf(path) {
        Ok(LlamaForCausalLM::load_gguf_skipping(path, device, skip)?.0)
    } else {
        Ok(LlamaForCausalLM::load_skipping(path, device, skip)?.0)
    }
}

/// How many layers of a model with `config` the emulator rules select, checking every rank
/// before any work.
fn selected_layers(config: &LlamaConfig, tied_head: bool, rules: &EmulatorConfig) -> Result<usize> {
    let shapes = expected_shapes(config);
    let mut selected = 0;
    for path in crate::llama::linear_paths(config, tied_head) {
        let [d_out, d_in] = match shapes.get(&format!("{path}.weight")).map(Vec::as_slice) {
            Some(&[d_out, d_in]) => [d_out, d_in],
            _ => [config.vocab_size, config.hidden_size],
        };
        if rules.rank_of(&path, d_in, d_out)?.is_some() {
            selected += 1;
        }
    }
    Ok(selected)
}
