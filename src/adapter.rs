//! Stage 2 plumbing: attach LoRA adapters, move them in and out of HF PEFT's format, merge them.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, Param, ParamGroup, ParamId};

use crate::error::{EmlocError, Result};
use crate::matrix::Matrix;
use crate::nn::hooks::{
    all_linear_paths, for_each_layer, for_each_linear, map_linears, unsupported_layers,
};
use crate::nn::{Linear, LoraAdapter, LoraConfig, check_lora_rank};
use crate::peft::{LayerShape, PeftAdapter, PeftConfig, PeftLayer, TargetModules};
use crate::stock;

/// Every `emloc::nn::Linear` (and `emloc::nn::Conv2d`, as the linear map on its unfolded
/// patches) of `model` with its shape, in traversal order.
pub fn linear_layers<M: Module>(model: &M) -> Vec<LayerShape> {
    let mut layers = Vec::new();
    for_each_layer(model, |path, linear, kernel_size| {
        layers.push(LayerShape {
            path: path.to_string(),
            d_in: linear.d_input(),
            d_out: linear.d_output(),
            kernel_size,
        })
    });
    layers
}

/// The error for a selection that matched nothing, naming stock `burn::nn::Linear` layers.
fn no_layer_error<M: Module>(model: &M, what: String) -> EmlocError {
    let emloc: Vec<String> = linear_layers(model).into_iter().map(|l| l.path).collect();
    let stock: Vec<String> =
        all_linear_paths(model).into_iter().filter(|p| !emloc.contains(p)).collect();
    if stock.is_empty() {
        EmlocError::NoMatchingLayers(what)
    } else {
        EmlocError::NoMatchingLayers(format!(
            "{what}; these layers are stock burn::nn::Linear, which emloc cannot adapt (use \
             emloc::nn::Linear, or Burn's own Module::apply_lora for dense LoRA): {stock:?}"
        ))
    }
}

/// Freezes every parameter of `model` except those in `trainable`.
fn train_only<M: Module>(model: M, trainable: Vec<ParamId>) -> M {
    model.no_grad().set_require_grad_group(ParamGroup::from_ids(trainable), true)
}

fn adapter_ids(lora: &LoraAdapter) -> [ParamId; 2] {
    [lora.a.id, lora.b.id]
}

/// Attaches fresh LoRA adapters (PEFT init: `A` Kaiming-uniform, `B = 0`) to every
/// `emloc::nn::Linear` that `config` targets, dense or emulated, and freezes every other
/// parameter. Returns the model and the adapted module paths.
///
/// Fails before changing anything when the config is invalid, nothing is targeted, or a targeted
/// layer already carries an adapter.
pub fn attach_new_adapter<M: Module>(model: M, config: &LoraConfig) -> Result<(M, Vec<String>)> {
    config.validate()?;
    let mut targets = Vec::new();
    let mut problem = None;
    for_each_linear(&model, |path, linear| match config.targets(path) {
        Ok(true) if linear.lora.is_some() => {
            problem.get_or_insert(EmlocError::InvalidConfig(format!(
                "layer `{path}` already carries a LoRA adapter"
            )));
        }
        Ok(true) => match check_lora_rank(path, config.rank, linear.d_input(), linear.d_output()) {
            Ok(()) => targets.push(path.to_string()),
            Err(e) => {
                problem.get_or_insert(e);
            }
        },
        Ok(false) => {}
        Err(e) => {
            problem.get_or_insert(e);
        }
    });
    if let Some(e) = problem {
        return Err(e);
    }
    // A layer emloc cannot adapt (a grouped convolution) is refused when the targets name it;
    // "every layer" (no targets given) passes over it.
    if !config.target_modules.is_empty() || config.target_regex.is_some() {
        for (path, reason) in unsupported_layers(&model) {
            if config.targets(&path)? {
                return Err(EmlocError::InvalidConfig(format!(
                    "layer `{path}` cannot carry a LoRA adapter: {reason}"
                )));
            }
        }
    }
    if targets.is_empty() {
        return Err(no_layer_error(&model, format!("the LoRA targets of {config:?}")));
    }
    let mut trainable = Vec::new();
    let model = map_linears(model, |path, mut linear| {
        if targets.iter().any(|t| t == path) {
            let device = linear_device(&linear);
            let lora = config.init(linear.d_input(), linear.d_output(), &device);
            trainable.extend(adapter_ids(&lora));
            linear.lora = Some(lora);
        }
        linear
    });
    Ok((train_only(model, trainable), targets))
}

fn linear_device(linear: &Linear) -> burn::tensor::Device {
    match &linear.factors {
        // Lazy: attaching must not materialise a weight that a later load or forward fills.
        Some(f) => f.w_v.lazy_device(),
        None => linear.weight.lazy_device(),
    }
}

/// Reads every attached adapter into HF PEFT's format (`lora_A` `[r, d_in]`, `lora_B`
/// `[d_out, r]`; a convolution's carry its kernel size, see [`PeftLayer`]). Ranks and alphas
/// that differ from the most common one go to `rank_pattern` / `alpha_pattern`;
/// `target_modules` lists the adapted paths.
///
/// PEFT reads pattern keys as regexes matching a path's tail (see [`crate::peft::Patterns`]),
/// so a plain path key would also match every longer path ending in it (`attn.q` matches
/// `cross.attn.q`). Keys are therefore written as exact-path patterns (`^` and the escaped
/// path), and `target_modules` becomes a regex of the adapted paths when the plain list would
/// also target another layer. Every layer is checked to resolve to its own rank and alpha.
pub fn export_adapter<M: Module>(model: &M) -> Result<PeftAdapter> {
    let mut layers = BTreeMap::new();
    let mut meta = Vec::new();
    let mut plain = Vec::new();
    for_each_layer(model, |path, linear, kernel_size| {
        if let Some(lora) = &linear.lora {
            layers.insert(
                path.to_string(),
                PeftLayer {
                    lora_a: Matrix::from_tensor(lora.a.val()).transpose(),
                    lora_b: Matrix::from_tensor(lora.b.val()).transpose(),
                    kernel_size,
                },
            );
            meta.push((
                path.to_string(),
                lora.rank(),
                lora.alpha,
                lora.use_rslora,
                lora.dropout.prob,
            ));
        } else {
            plain.push(path.to_string());
        }
    });
    let Some(first) = meta.first() else {
        return Err(no_layer_error(model, "any layer carrying a LoRA adapter".into()));
    };
    if meta.iter().any(|m| m.3 != first.3) {
        return Err(EmlocError::InvalidConfig(
            "adapters mix rsLoRA and plain scaling; PEFT's format stores one setting".into(),
        ));
    }
    let rank = most_common(meta.iter().map(|m| m.1 as f64)) as usize;
    let alpha = most_common(meta.iter().map(|m| m.2));
    let mut config = PeftConfig::new(rank, alpha, meta.iter().map(|m| m.0.clone()).collect());
    config.use_rslora = first.3;
    config.lora_dropout = first.4;
    for (path, r, a, _, _) in &meta {
        if *r != rank {
            config.rank_pattern.insert(exact_path_pattern(path), *r);
        }
        if *a != alpha {
            config.alpha_pattern.insert(exact_path_pattern(path), *a);
        }
    }
    if plain.iter().any(|p| config.target_modules.matches(p).unwrap_or(true)) {
        let paths: Vec<String> = meta.iter().map(|m| regex::escape(&m.0)).collect();
        config.target_modules = TargetModules::Regex(paths.join("|"));
    }
    let patterns = config.patterns()?;
    for (path, r, a, _, _) in &meta {
        let (got_r, got_a) = (patterns.rank_for(path), patterns.alpha_for(path));
        if (got_r, got_a) != (*r, *a) {
            return Err(EmlocError::InvalidConfig(format!(
                "layer `{path}` (rank {r}, alpha {a}) would resolve to rank {got_r}, alpha {got_a} \
                 from the exported patterns"
            )));
        }
    }
    Ok(PeftAdapter { config, layers })
}

/// A `rank_pattern` / `alpha_pattern` key that PEFT resolves to exactly the module at `path`:
/// `^` and the regex-escaped path. In PEFT's `(.*\.)?(KEY)$` the `^` only matches at the
/// start, so the optional prefix group must be empty.
fn exact_path_pattern(path: &str) -> String {
    format!("^{}", regex::escape(path))
}

fn most_common(values: impl Iterator<Item = f64>) -> f64 {
    let mut counts: Vec<(f64, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    counts.iter().max_by_key(|(_, n)| *n).map(|(v, _)| *v).unwrap_or(0.0)
}

/// Checks that `adapter` fits `model` and that every targeted layer is in the wanted form;
/// returns the targeted layers that are stock `burn::nn::Linear` (served through Burn's LoRA).
fn check_adapter<M: Module>(
    model: &M,
    adapter: &PeftAdapter,
    dense_only: bool,
) -> Result<BTreeSet<String>> {
    // Its own consistency first (ranks, finiteness, targets): the fields are public.
    adapter.validate()?;
    let mut layers = linear_layers(model);
    let emloc_paths: Vec<String> = layers.iter().map(|l| l.path.clone()).collect();
    let stock_layers = stock::stock_linear_layers(model, &emloc_paths);
    layers.extend(stock_layers.iter().map(|l| l.shape.clone()));
    adapter.check_fits(&layers)?;
    let mut problem = None;
    for_each_linear(model, |path, linear| {
        if adapter.layers.contains_key(path) && problem.is_none() {
            if dense_only && linear.is_emulated() {
                problem = Some(EmlocError::InvalidConfig(format!(
                    "layer `{path}` is an emulator layer; merge adapters into the original model"
                )));
            } else if linear.lora.is_some() {
                problem = Some(EmlocError::InvalidConfig(format!(
                    "layer `{path}` already carries a LoRA adapter"
                )));
            }
        }
    });
    problem.map_or(Ok(()), Err)?;
    stock::targeted(adapter, &stock_layers)
}

/// The parameter ids of every attached adapter's `A` and `B`, by module path: what optimizer
/// state is keyed by. Saved with a training checkpoint (serialized as `{path: [a, b]}` with the
/// ids' `u64` values) so that [`attach_adapter_with_ids`] can resume it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct AdapterParamIds(BTreeMap<String, [u64; 2]>);

impl AdapterParamIds {
    /// The ids of the adapter at `path`, as `[A, B]`.
    pub fn get(&self, path: &str) -> Option<[ParamId; 2]> {
        self.0.get(path).map(|ids| ids.map(ParamId::from))
    }

    /// The adapted module paths, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Number of adapted layers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no layer is adapted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Casts every float parameter of `model` except the attached adapters' `A` and `B` to `dtype`
/// (the frozen weights: dense weights, emulator factors, biases, norms, embeddings), keeping
/// each parameter's id and gradient setting. Adapters and their optimizer state stay `f32`:
/// an adapted layer whose input has another dtype runs its adapter in the adapter's dtype and
/// casts the result back.
///
/// What each stage does with such a model: calibration accumulates Grams in `f32`;
/// factorisation, correction and merges read the weights in `f32` (f64 on the host) and write
/// emulator factors back in the weights' dtype; the model then runs in `dtype` end to end.
pub fn cast_frozen<M: Module>(model: M, dtype: burn::tensor::FloatDType) -> M {
    struct Cast {
        dtype: burn::tensor::FloatDType,
        adapters: BTreeSet<ParamId>,
    }
    impl burn::module::ModuleMapper for Cast {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<burn::tensor::Tensor<D>>,
        ) -> Param<burn::tensor::Tensor<D>> {
            if self.adapters.contains(&param.id) {
                return param;
            }
            let dtype = self.dtype;
            param.map(|t| t.cast(dtype))
        }
    }
    let mut adapters = BTreeSet::new();
    for_each_linear(&model, |_, linear| {
        if let Some(lora) = &linear.lora {
            adapters.extend(adapter_ids(lora));
        }
    });
    model.map(&mut Cast { dtype, adapters })
}

/// The parameter ids of every attached adapter in `model`.
pub fn adapter_param_ids<M: Module>(model: &M) -> AdapterParamIds {
    let mut ids = BTreeMap::new();
    for_each_linear(model, |path, linear| {
        if let Some(lora) = &linear.lora {
            ids.insert(path.to_string(), adapter_ids(lora).map(|id| id.val()));
        }
    });
    AdapterParamIds(ids)
}

/// [`attach_adapter`] that gives each adapter's `A` and `B` the parameter ids in `ids` (from
/// [`adapter_param_ids`] of the run being resumed), so that a saved optimizer state applies to
/// them again.
///
/// # Errors
/// As [`attach_adapter`]; [`EmlocError::InvalidConfig`] if `ids` does not cover exactly the
/// adapter's layers.
pub fn attach_adapter_with_ids<M: Module>(
    model: M,
    adapter: &PeftAdapter,
    ids: &AdapterParamIds,
) -> Result<M> {
    if !adapter.layers.keys().map(String::as_str).eq(ids.paths()) {
        return Err(EmlocError::InvalidConfig(format!(
            "parameter ids are for layers {:?}, the adapter has {:?}",
            ids.paths().collect::<Vec<_>>(),
            adapter.layers.keys().collect::<Vec<_>>()
        )));
    }
    attach_adapter_inner(model, adapter, Some(ids))
}

/// Attaches a PEFT adapter to `model` unmerged (serving beside the original weights, or to keep
/// training), freezing every other parameter. The adapter is validated against the model first.
///
/// Layers that are stock `burn::nn::Linear` get Burn's own LoRA reparameterization
/// (`burn::module::LoraAdapter`: `W + s · A B`, built densely at each forward, no dropout);
/// `emloc::nn::Linear` layers compute through the rank-`r` bottleneck.
pub fn attach_adapter<M: Module>(model: M, adapter: &PeftAdapter) -> Result<M> {
    attach_adapter_inner(model, adapter, None)
}

fn attach_adapter_inner<M: Module>(
    model: M,
    adapter: &PeftAdapter,
    ids: Option<&AdapterParamIds>,
) -> Result<M> {
    let stock_targets = check_adapter(&model, adapter, false)?;
    if ids.is_some() && !stock_targets.is_empty() {
        return Err(EmlocError::InvalidConfig(format!(
            "resuming training is only supported on emloc::nn::Linear layers; {stock_targets:?} are stock burn::nn::Linear"
        )));
    }
    let patterns = adapter.config.patterns()?;
    let (model, mut trainable) = stock::attach(model, adapter, &stock_targets)?;
    let model = map_linears(model, |path, mut linear| {
        if let Some(layer) = adapter.layers.get(path) {
            let device = linear_device(&linear);
            let lora = LoraAdapter::new(
                layer.lora_a.transpose().to_tensor(&device),
                layer.lora_b.transpose().to_tensor(&device),
                patterns.alpha_for(path),
                adapter.config.use_rslora,
                adapter.config.lora_dropout,
            );
            let mut lora = lora;
            if let Some([a, b]) = ids.and_then(|ids| ids.get(path)) {
                lora.a = Param::initialized(a, lora.a.val());
                lora.b = Param::initialized(b, lora.b.val());
            }
            trainable.extend(adapter_ids(&lora));
            linear.lora = Some(lora);
        }
        linear
    });
    Ok(train_only(model, trainable))
}

/// Merges a PEFT adapter into the dense weights of `model` in f32: `W ← W + s · B A`.
/// Validated first: every adapter layer must exist, be dense, carry no adapter and fit in shape.
/// Stock `burn::nn::Linear` layers are merged too (found by their module name and path).
pub fn merge_adapter<M: Module>(model: M, adapter: &PeftAdapter) -> Result<M> {
    let stock_targets = check_adapter(&model, adapter, true)?;
    let patterns = adapter.config.patterns()?;
    let model = stock::merge(model, adapter, &stock_targets)?;
    Ok(map_linears(model, |path, mut linear| {
        if let Some(layer) = adapter.layers.get(path) {
            let device = linear.weight.val().device();
            let scale = patterns.scale_for(path);
            let a = layer.lora_a.transpose().to_tensor(&device);
            let b = layer.lora_b.transpose().to_tensor(&device);
            add_to_weight(&mut linear, a.matmul(b).mul_scalar(scale));
        }
        linear
    }))
}

/// `W ← W + delta`, added in f32 and cast back to the weight's dtype. A quantized weight is
/// decoded first: the merged layer is dense.
fn add_to_weight(linear: &mut Linear, delta: burn::tensor::Tensor<2>) {
    use burn::tensor::FloatDType;
    let delta = delta.cast(FloatDType::F32);
    let base = linear.base_weight();
    linear.quantized = None;
    linear.weight = linear.weight.clone().map(|w| {
        let dtype = w.dtype();
        (base.cast(FloatDType::F32) + delta).cast(dtype)
    });
}

/// Folds every attached adapter of a dense `model` into its weights (`W ← W + s · B A`) and
/// removes the adapters. Emulator layers keep their adapters (merging would densify them).
pub fn merge_attached_adapter<M: Module>(model: M) -> M {
    map_linears(model, |_, mut linear| {
        if linear.factors.is_none()
            && let Some(lora) = linear.lora.take()
        {
            add_to_weight(&mut linear, lora.delta());
        }
        linear
    })
}
