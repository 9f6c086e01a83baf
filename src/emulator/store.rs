//! Saving an emulator to disk and putting it back onto the original model.
//!
//! An emulator directory holds only what emulation changed: [`FACTORS_FILE`] with each emulated
//! layer's factors (`{path}.w_v` `[d_in, k]`, `{path}.w_u` `[k, d_out]`, F32) and
//! [`DESCRIPTION_FILE`], which records the config and the per-layer report. Everything else
//! (embeddings, biases, dense layers) comes from the original checkpoint when the emulator is
//! loaded, so an emulator is a few megabytes beside a model it is built from, never a copy of it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use burn::module::Module;
use safetensors::tensor::{Dtype, Metadata, TensorView};
use serde::{Deserialize, Serialize};

use super::{EmulatorConfig, EmulatorReport};
use crate::atomic::write_atomic;
use crate::error::{EmlocError, Result};
use crate::identity::FileIdentity;
use crate::matrix::Matrix;
use crate::nn::LowRankFactors;
use crate::nn::hooks::{for_each_linear, map_linears};

/// Largest safetensors header accepted (safetensors' own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The factors file of an emulator directory.
pub const FACTORS_FILE: &str = "emulator.safetensors";
/// The JSON description of an emulator directory.
pub const DESCRIPTION_FILE: &str = "emulator.json";
/// Version of the directory layout written by [`save_emulator`].
pub const FORMAT_VERSION: u32 = 1;

/// The JSON description of a saved emulator: how it was built and what it kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmulatorDescription {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// The config the emulator was built with (rules and whitening).
    pub config: EmulatorConfig,
    /// The per-layer report of [`emulate`](super::emulate); its `layers` list the emulated
    /// layers, their shapes and ranks, and is what loading checks the factors against.
    pub report: EmulatorReport,
    /// Which model and data it was built from, when the builder recorded it (absent in files
    /// written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// What an emulator was built from: the original model's files, the calibration data and how
/// the calibration samples were selected from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The original model's files (config and weights, or one GGUF file).
    pub model: Vec<FileIdentity>,
    /// The data files calibrated on.
    pub data: Vec<FileIdentity>,
    /// How the calibration samples were chosen from `data` (e.g. split seed, validation size,
    /// sample count), by option name.
    pub selection: BTreeMap<String, serde_json::Value>,
}

impl EmulatorDescription {
    /// Describes an emulator built with `config` that produced `report` (no provenance).
    pub fn new(config: EmulatorConfig, report: EmulatorReport) -> Self {
        Self { format_version: FORMAT_VERSION, config, report, provenance: None }
    }

    /// Records which model and data the emulator was built from.
    pub fn with_provenance(mut self, provenance: Provenance) -> Self {
        self.provenance = Some(provenance);
        self
    }
}

fn file_error(path: &Path, message: impl Into<String>) -> EmlocError {
    EmlocError::EmulatorFile { path: path.to_path_buf(), message: message.into() }
}

/// Writes the factors of every emulator layer of `model` and `description` to `dir` (created if
/// missing). Each file is replaced atomically, factors first.
///
/// # Errors
/// [`EmlocError::EmulatorFile`] if `model`'s emulator layers disagree with
/// `description.report.layers` (paths, shapes or ranks); [`EmlocError::Io`] on write failure.
pub fn save_emulator<M: Module>(
    model: &M,
    description: &EmulatorDescription,
    dir: &Path,
) -> Result<()> {
    let factors_path = dir.join(FACTORS_FILE);
    let described: HashMap<&str, [usize; 3]> = description
        .report
        .layers
        .iter()
        .map(|l| (l.path.as_str(), [l.d_in, l.rank, l.d_out]))
        .collect();
    let mut buffers: Vec<(String, [usize; 2], Vec<u8>)> = Vec::new();
    let mut problems = Vec::new();
    for_each_linear(model, |path, linear| {
        let Some(factors) = &linear.factors else { return };
        let shape = [factors.d_input(), factors.rank(), factors.d_output()];
        if described.get(path) != Some(&shape) {
            problems
                .push(format!("layer `{path}` [d_in, k, d_out] = {shape:?} is not as described"));
            return;
        }
        for (suffix, tensor) in [("w_v", factors.w_v.val()), ("w_u", factors.w_u.val())] {
            let m = Matrix::from_tensor(tensor);
            let bytes = m.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            buffers.push((format!("{path}.{suffix}"), m.shape(), bytes));
        }
    });
    if buffers.len() != 2 * described.len() {
        problems.push(format!(
            "the model has {} emulator layers, the description {}",
            buffers.len() / 2,
            described.len()
        ));
    }
    if !problems.is_empty() {
        return Err(file_error(&factors_path, problems.join("; ")));
    }
    let views = buffers
        .iter()
        .map(|(key, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.to_vec(), bytes)
                .map(|view| (key.as_str(), view))
                .map_err(|e| file_error(&factors_path, format!("{key}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([
        ("format".to_owned(), "emloc-emulator".to_owned()),
        ("format_version".to_owned(), FORMAT_VERSION.to_string()),
    ]);
    let weights = safetensors::serialize(views, Some(metadata))
        .map_err(|e| file_error(&factors_path, e.to_string()))?;
    let mut json = serde_json::to_string_pretty(description)
        .map_err(|e| file_error(&dir.join(DESCRIPTION_FILE), e.to_string()))?;
    json.push('\n');
    fs::create_dir_all(dir).map_err(|e| EmlocError::io(dir, e))?;
    write_atomic(&factors_path, &weights)?;
    write_atomic(&dir.join(DESCRIPTION_FILE), json.as_bytes())
}

/// Each emulated layer's factors `(W_v, W_u)` by module path, as stored.
pub type LayerFactors = BTreeMap<String, (Matrix, Matrix)>;

/// Reads and checks an emulator directory without touching a model.
///
/// # Errors
/// [`EmlocError::Io`] for a missing file; [`EmlocError::EmulatorFile`] for malformed JSON, an
/// unknown format version, an unparsable factors file, a dtype other than F32, missing,
/// unexpected or mis-shaped factors (all listed), or non-finite values.
pub fn read_emulator(dir: &Path) -> Result<(EmulatorDescription, LayerFactors)> {
    // The description is checked before the factors file is read.
    let description = read_emulator_description(dir)?;
    let factors_path = dir.join(FACTORS_FILE);
    let io_error = |e| EmlocError::io(&factors_path, e);
    let mut file = fs::File::open(&factors_path).map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    // One tensor at a time from the file: never the whole file plus its parsed copy in memory.
    let (header, data_start) = read_header(&mut file, len, &factors_path)?;
    parse_factors(description, &header, &factors_path, &mut |offset, out| {
        file.seek(SeekFrom::Start(data_start + offset as u64))?;
        file.read_exact(out)
    })
}

/// Reads and checks only an emulator directory's [`DESCRIPTION_FILE`]: which layers are
/// emulated, at which shapes and ranks. With it a caller can leave those layers' dense weights
/// out when loading the original checkpoint before [`load_emulator`].
///
/// # Errors
/// [`EmlocError::Io`] if the file cannot be read; [`EmlocError::EmulatorFile`] for malformed
/// JSON, an unknown format version or an impossible rank.
pub fn read_emulator_description(dir: &Path) -> Result<EmulatorDescription> {
    let json_path = dir.join(DESCRIPTION_FILE);
    let text = fs::read_to_string(&json_path).map_err(|e| EmlocError::io(&json_path, e))?;
    parse_description(&text, &json_path)
}

/// Parses an emulator from the contents of its [`DESCRIPTION_FILE`] and [`FACTORS_FILE`], as
/// [`read_emulator`] does after reading them (same checks, same errors; the files are named by
/// their plain names). The entry point of the fuzz target.
///
/// # Errors
/// As [`read_emulator`], without the I/O errors.
pub fn parse_emulator(
    description_json: &str,
    factors: &[u8],
) -> Result<(EmulatorDescription, LayerFactors)> {
    let description = parse_description(description_json, Path::new(DESCRIPTION_FILE))?;
    let path = Path::new(FACTORS_FILE);
    let (header, data_start) = read_header(&mut &factors[..], factors.len() as u64, path)?;
    let data = &factors[data_start as usize..];
    parse_factors(description, &header, path, &mut |offset, out| {
        out.copy_from_slice(&data[offset..offset + out.len()]);
        Ok(())
    })
}

/// Reads a safetensors header from the start of `reader` (a file of `len` bytes) and checks it:
/// offsets contiguous and sized by dtype and shape (safetensors' own validation), and ending
/// exactly at the end of the file. Returns the header and where the tensor data starts.
fn read_header(reader: &mut impl Read, len: u64, path: &Path) -> Result<(Metadata, u64)> {
    let bad = |message: String| file_error(path, message);
    let mut prefix = [0u8; 8];
    reader
        .read_exact(&mut prefix)
        .map_err(|_| bad(format!("{len} bytes: too short for a safetensors header")))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > len.saturating_sub(8) || header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {header_len} does not fit in the file's {len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    reader.read_exact(&mut header).map_err(|e| bad(format!("reading the header: {e}")))?;
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("invalid safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    if data_start + metadata.data_len() as u64 != len {
        return Err(bad(format!(
            "the header describes {} bytes of tensor data, the file has {}",
            metadata.data_len(),
            len - data_start
        )));
    }
    Ok((metadata, data_start))
}

fn parse_description(text: &str, json_path: &Path) -> Result<EmulatorDescription> {
    let description: EmulatorDescription =
        serde_json::from_str(text).map_err(|e| file_error(json_path, e.to_string()))?;
    if description.format_version != FORMAT_VERSION {
        return Err(file_error(
            json_path,
            format!(
                "format_version {} (this emloc reads {FORMAT_VERSION})",
                description.format_version
            ),
        ));
    }
    for layer in &description.report.layers {
        if layer.rank == 0 || layer.rank > layer.d_in.min(layer.d_out) {
            return Err(file_error(
                json_path,
                format!(
                    "layer `{}`: rank {} outside 1..={}",
                    layer.path,
                    layer.rank,
                    layer.d_in.min(layer.d_out)
                ),
            ));
        }
    }
    Ok(description)
}

/// Checks the factors described by `header` against `description` and reads them, one tensor
/// at a time, through `read(offset in the data section, buffer)`.
fn parse_factors(
    description: EmulatorDescription,
    header: &Metadata,
    factors_path: &Path,
    read: &mut dyn FnMut(usize, &mut [u8]) -> std::io::Result<()>,
) -> Result<(EmulatorDescription, LayerFactors)> {
    let factors_path = factors_path.to_path_buf();
    let mut expected: BTreeMap<String, [usize; 2]> = BTreeMap::new();
    for l in &description.report.layers {
        expected.insert(format!("{}.w_v", l.path), [l.d_in, l.rank]);
        expected.insert(format!("{}.w_u", l.path), [l.rank, l.d_out]);
    }
    let mut matrices: BTreeMap<String, Matrix> = BTreeMap::new();
    let (mut unexpected, mut misshaped) = (Vec::new(), Vec::new());
    let tensors = header.tensors();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    // Every name and shape is checked before any data is read.
    let mut wanted = Vec::new();
    for key in names {
        let info = tensors[key];
        let Some(&shape) = expected.get(key.as_str()) else {
            unexpected.push(key.to_string());
            continue;
        };
        if info.dtype != Dtype::F32 {
            return Err(file_error(
                &factors_path,
                format!("{key}: dtype {} (expected F32)", info.dtype),
            ));
        }
        if info.shape != shape {
            misshaped.push(format!("{key}: expected {shape:?}, found {:?}", info.shape));
            continue;
        }
        wanted.push((key, shape, info.data_offsets.0));
    }
    let missing: Vec<&String> =
        expected.keys().filter(|k| !wanted.iter().any(|(w, _, _)| w == k)).collect();
    if !missing.is_empty() || !unexpected.is_empty() || !misshaped.is_empty() {
        return Err(file_error(
            &factors_path,
            format!("missing {missing:?}, unexpected {unexpected:?}, mis-shaped {misshaped:?}"),
        ));
    }
    for (key, shape, offset) in wanted {
        // The header's validation guarantees 4 · rows · cols bytes at `offset`.
        let mut data = vec![0f32; shape[0] * shape[1]];
        read(offset, bytemuck::cast_slice_mut(&mut data))
            .map_err(|e| file_error(&factors_path, format!("{key}: {e}")))?;
        if cfg!(target_endian = "big") {
            data.iter_mut().for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
        }
        let m = Matrix::new(shape[0], shape[1], data);
        if !m.is_finite() {
            return Err(EmlocError::NonFinite {
                layer: key.to_string(),
                what: "emulator factor".into(),
            });
        }
        matrices.insert(key.to_string(), m);
    }
    let factors = description
        .report
        .layers
        .iter()
        .map(|l| {
            let w_v = matrices.remove(&format!("{}.w_v", l.path)).expect("checked above");
            let w_u = matrices.remove(&format!("{}.w_u", l.path)).expect("checked above");
            (l.path.clone(), (w_v, w_u))
        })
        .collect();
    Ok((description, factors))
}

/// Turns `model` (the original, dense) into the emulator saved in `dir`: every described layer
/// gets its factors and drops its dense weight, every other layer is left as it is.
///
/// Everything is checked before the model is changed: the files (see [`read_emulator`]) and
/// that each described layer exists in `model` with the described `d_in`/`d_out`, dense.
///
/// `model` may be a freshly built, lazily initialised skeleton whose emulated layers' weights
/// were left out of the checkpoint load (see [`read_emulator_description`]): those dense
/// weights are then never materialised, and the process never holds the original model.
///
/// # Errors
/// As [`read_emulator`]; [`EmlocError::EmulatorFile`] naming every layer that is missing from
/// the model, already emulated or shaped differently.
pub fn load_emulator<M: Module>(model: M, dir: &Path) -> Result<(M, EmulatorDescription)> {
    let (description, mut factors) = read_emulator(dir)?;
    let shapes: HashMap<&str, (usize, usize)> =
        description.report.layers.iter().map(|l| (l.path.as_str(), (l.d_in, l.d_out))).collect();
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for_each_linear(&model, |path, linear| {
        let Some(&(d_in, d_out)) = shapes.get(path) else { return };
        found.push(path.to_owned());
        if linear.is_emulated() {
            problems.push(format!("layer `{path}` is already an emulator layer"));
        } else if (linear.d_input(), linear.d_output()) != (d_in, d_out) {
            problems.push(format!(
                "layer `{path}` is [{}, {}] in the model, [{d_in}, {d_out}] in the emulator",
                linear.d_input(),
                linear.d_output()
            ));
        }
    });
    for path in shapes.keys() {
        if !found.iter().any(|f| f == path) {
            problems.push(format!("layer `{path}` is not in the model"));
        }
    }
    if !problems.is_empty() {
        problems.sort();
        return Err(file_error(&dir.join(DESCRIPTION_FILE), problems.join("; ")));
    }
    let model = map_linears(model, |path, mut linear| {
        let Some((w_v, w_u)) = factors.remove(path) else { return linear };
        // `lazy_device`: a freshly built model's dense weight is never materialised here, so a
        // model skeleton plus the factors is all the memory loading takes.
        let device = linear.weight.lazy_device();
        linear.factors =
            Some(LowRankFactors::new(w_v.into_tensor(&device), w_u.into_tensor(&device)));
        linear.drop_dense_weight();
        linear
    });
    Ok((model, description))
}
