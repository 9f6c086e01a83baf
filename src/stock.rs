//! Stock `burn::nn::Linear` layers, the ones emloc's transforms cannot reach (Burn's layer has
//! no hook, no calibration and no factored form). A PEFT adapter can still be served on them
//! through Burn's own LoRA reparameterization ([`burn::module::LoraAdapter`], dense per forward)
//! or merged into their weights, so a corrected adapter fits any Burn model.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{
    LoraAdapter as BurnLoraAdapter, Module, ModuleMapper, ModuleVisitor, Param, ParamId,
    Reparameterizer,
};
use burn::tensor::{FloatDType, Tensor};

use crate::error::{EmlocError, Result};
use crate::matrix::Matrix;
use crate::peft::{LayerShape, PeftAdapter};

/// The container name Burn's `Linear` (and emloc's) gives its fields.
const LINEAR: &str = "Struct:Linear";

/// Every stock `burn::nn::Linear` of `model` with its shape, in traversal order: layers named
/// `Linear` whose path is not one of `emloc_paths` (emloc's own layers share the name).
pub(crate) fn stock_linear_layers<M: Module>(model: &M, emloc_paths: &[String]) -> Vec<StockLayer> {
    #[derive(Default)]
    struct Finder {
        path: Vec<String>,
        in_linear_weight: Vec<bool>,
        found: Vec<StockLayer>,
    }
    impl ModuleVisitor for Finder {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            // Burn visits a reparameterized weight as its base, then enters the
            // reparameterization (`lora`) as a module below it.
            if container_type == "Reparameterization"
                && self.in_linear_weight.last() == Some(&true)
                && let Some(layer) = self.found.last_mut()
            {
                layer.has_adapter = true;
            }
            self.in_linear_weight.push(name == "weight" && container_type == LINEAR);
            self.path.push(name.to_string());
        }

        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
            self.in_linear_weight.pop();
        }

        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // Only the layer's own weight: not the tensors of a reparameterization under it.
            if D != 2 || self.in_linear_weight.last() != Some(&true) {
                return;
            }
            let dims = param.lazy_shape().dims::<2>();
            self.found.push(StockLayer {
                shape: LayerShape {
                    path: self.path[..self.path.len() - 1].join("."),
                    d_in: dims[0],
                    d_out: dims[1],
                    kernel_size: None,
                },
                has_adapter: false,
            });
        }
    }
    let mut finder = Finder::default();
    model.visit(&mut finder);
    finder.found.retain(|layer| !emloc_paths.contains(&layer.shape.path));
    finder.found
}

/// A stock `burn::nn::Linear` found in a model.
#[derive(Debug, Clone)]
pub(crate) struct StockLayer {
    /// Module path and shape (`weight` is `[d_in, d_out]`, as in emloc's `Linear`).
    pub shape: LayerShape,
    /// Whether Burn's LoRA reparameterization is already attached to its weight.
    pub has_adapter: bool,
}

/// The adapter layers of `adapter` that are stock layers of the model; fails if one of them
/// already carries Burn's LoRA.
pub(crate) fn targeted(adapter: &PeftAdapter, stock: &[StockLayer]) -> Result<BTreeSet<String>> {
    let mut paths = BTreeSet::new();
    for layer in stock.iter().filter(|l| adapter.layers.contains_key(&l.shape.path)) {
        if layer.has_adapter {
            return Err(EmlocError::InvalidConfig(format!(
                "layer `{}` already carries a LoRA adapter (Burn's reparameterization)",
                layer.shape.path
            )));
        }
        paths.insert(layer.shape.path.clone());
    }
    Ok(paths)
}

/// The adapter's `A` `[d_in, r]`, `B` `[r, d_out]` and scale for each layer in `paths`.
type Prepared = BTreeMap<String, (Matrix, Matrix, f64)>;

fn prepare(adapter: &PeftAdapter, paths: &BTreeSet<String>) -> Result<Prepared> {
    let patterns = adapter.config.patterns()?;
    Ok(paths
        .iter()
        .map(|path| {
            let layer = &adapter.layers[path];
            let factors =
                (layer.lora_a.transpose(), layer.lora_b.transpose(), patterns.scale_for(path));
            (path.clone(), factors)
        })
        .collect())
}

/// The layer of a float parameter's path when it is the weight of one of `prepared`'s layers.
fn layer_of<'p, const D: usize>(
    prepared: &'p Prepared,
    path: &str,
) -> Option<&'p (Matrix, Matrix, f64)> {
    path.strip_suffix(".weight").filter(|_| D == 2).and_then(|layer| prepared.get(layer))
}

/// Attaches the adapter's layers in `paths` (stock layers) to `model` as Burn's own
/// [`LoraAdapter`](BurnLoraAdapter) reparameterization, `W + s · A B` at every forward. Returns
/// the model and the ids of the attached `A` and `B` parameters.
pub(crate) fn attach<M: Module>(
    model: M,
    adapter: &PeftAdapter,
    paths: &BTreeSet<String>,
) -> Result<(M, Vec<ParamId>)> {
    struct Attach<'a> {
        prepared: Prepared,
        ids: &'a mut Vec<ParamId>,
    }
    impl Reparameterizer for Attach<'_> {
        type Reparam = BurnLoraAdapter;

        fn reparameterize<const D: usize>(
            &mut self,
            path: &str,
            param: Param<Tensor<D>>,
        ) -> (Param<Tensor<D>>, Option<BurnLoraAdapter>) {
            let Some((a, b, scale)) = layer_of::<D>(&self.prepared, path) else {
                return (param, None);
            };
            let device = param.lazy_device();
            let a = Param::from_tensor(a.to_tensor(&device));
            let b = Param::from_tensor(b.to_tensor(&device));
            self.ids.extend([a.id, b.id]);
            (param.set_require_grad(false), Some(BurnLoraAdapter { a, b, scale: *scale }))
        }
    }
    let mut ids = Vec::new();
    let prepared = prepare(adapter, paths)?;
    let model = model.apply_reparameterization(Attach { prepared, ids: &mut ids });
    Ok((model, ids))
}

/// Merges the adapter's layers in `paths` (stock layers) into their weights: `W ← W + s · A B`,
/// added in f32 and cast back to the weight's dtype.
pub(crate) fn merge<M: Module>(
    model: M,
    adapter: &PeftAdapter,
    paths: &BTreeSet<String>,
) -> Result<M> {
    struct Merge {
        prepared: Prepared,
        path: Vec<String>,
    }
    impl ModuleMapper for Merge {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }

        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }

        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some((a, b, scale)) = layer_of::<D>(&self.prepared, &self.path.join(".")) else {
                return param;
            };
            let device = param.lazy_device();
            let delta = a.to_tensor(&device).matmul(b.to_tensor(&device)).mul_scalar(*scale);
            param.map(|w| {
                let dtype = w.dtype();
                let delta: Tensor<D> = delta.reshape(w.shape());
                (w.cast(FloatDType::F32) + delta).cast(dtype)
            })
        }
    }
    let prepared = prepare(adapter, paths)?;
    Ok(model.map(&mut Merge { prepared, path: Vec::new() }))
}
