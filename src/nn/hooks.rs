//! How emloc's model-wide transforms reach every `emloc::nn::Linear` inside any user module.
//!
//! A Burn visitor or mapper sees parameters, not the modules around them, and a mapper cannot
//! change a module's structure (turn a dense layer into an emulator layer). So `Linear`'s
//! hand-written `visit`/`map` first call [`on_visit`]/[`on_map`]; while a transform started by
//! [`for_each_linear`] or [`map_linears`] is running on this thread, the hook hands it the whole
//! layer together with its module path. Outside such a call the hooks do nothing.
//!
//! Other layers take part by presenting a `Linear` *view* of themselves: `emloc::nn::Conv2d`
//! (groups = 1) is the linear map `W [C_out, C_in·kh·kw]` on unfolded patches, so it hands the
//! transforms a `Linear` sharing its weight's `ParamId` and turns the returned `Linear` back
//! into a convolution ([`is_visiting`], [`is_mapping`], [`on_visit_layer`]). Layers that cannot
//! be viewed that way report themselves through [`on_unsupported`].

use std::cell::RefCell;

use burn::module::{Module, ModuleMapper, ModuleVisitor};

use super::Linear;

/// A convolution's kernel size `[kh, kw]`; `None` for a `Linear`.
type KernelSize = Option<[usize; 2]>;
type VisitFn = dyn FnMut(&str, &Linear, KernelSize);
type MapFn = dyn FnMut(&str, Linear) -> Linear;
type UnsupportedFn = dyn FnMut(&str, &str);

#[derive(Clone, Copy)]
enum Active {
    Visit(*mut VisitFn),
    Map(*mut MapFn),
    Unsupported(*mut UnsupportedFn),
}

thread_local! {
    static ACTIVE: RefCell<Option<Active>> = const { RefCell::new(None) };
    static PATH: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Installs a transform for the duration of one traversal; uninstalls it even on panic.
struct Installed {
    previous_path: Vec<String>,
}

impl Installed {
    fn new(active: Active) -> Self {
        ACTIVE.with(|a| {
            assert!(a.borrow().is_none(), "emloc transforms cannot be nested");
            *a.borrow_mut() = Some(active);
        });
        Self { previous_path: PATH.with(|p| std::mem::take(&mut *p.borrow_mut())) }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        ACTIVE.with(|a| *a.borrow_mut() = None);
        PATH.with(|p| *p.borrow_mut() = std::mem::take(&mut self.previous_path));
    }
}

/// Disarms the transform while its callback runs (so the callback may traverse modules itself)
/// and re-arms it afterwards.
struct Disarmed(Active);

impl Disarmed {
    fn take<T>(pick: impl FnOnce(Active) -> Option<T>) -> Option<(Self, T)> {
        ACTIVE.with(|a| {
            let active = (*a.borrow())?;
            let picked = pick(active)?;
            *a.borrow_mut() = None;
            Some((Self(active), picked))
        })
    }
}

impl Drop for Disarmed {
    fn drop(&mut self) {
        ACTIVE.with(|a| *a.borrow_mut() = Some(self.0));
    }
}

fn current_path() -> String {
    PATH.with(|p| p.borrow().join("."))
}

/// Called by `Linear::visit` before it visits its fields.
pub(crate) fn on_visit(linear: &Linear) {
    on_visit_layer(linear, None);
}

/// Whether a [`for_each_layer`] traversal is running on this thread (so that a layer presenting
/// a `Linear` view builds it only when it is wanted).
pub(crate) fn is_visiting() -> bool {
    ACTIVE.with(|a| matches!(*a.borrow(), Some(Active::Visit(_))))
}

/// Whether a [`map_linears`] traversal is running on this thread.
pub(crate) fn is_mapping() -> bool {
    ACTIVE.with(|a| matches!(*a.borrow(), Some(Active::Map(_))))
}

/// [`on_visit`] for a layer's `Linear` view; `kernel` is `Some([kh, kw])` for a convolution.
pub(crate) fn on_visit_layer(linear: &Linear, kernel: Option<[usize; 2]>) {
    let Some((_rearm, f)) = Disarmed::take(|a| match a {
        Active::Visit(f) => Some(f),
        _ => None,
    }) else {
        return;
    };
    let path = current_path();
    // SAFETY: `f` points to the closure borrowed by `for_each_linear`, which outlives the traversal
    // and uninstalls it (guard `Installed`) before returning; it is disarmed while it runs, so it is
    // never aliased.
    unsafe { (*f)(&path, linear, kernel) }
}

/// Called by a layer that emloc cannot transform (e.g. a grouped convolution) from its `visit`,
/// with the reason (built only while [`unsupported_layers`] runs).
pub(crate) fn on_unsupported(reason: impl FnOnce() -> String) {
    let Some((_rearm, f)) = Disarmed::take(|a| match a {
        Active::Unsupported(f) => Some(f),
        _ => None,
    }) else {
        return;
    };
    let path = current_path();
    // SAFETY: as in `on_visit`, for the closure borrowed by `unsupported_layers`.
    unsafe { (*f)(&path, &reason()) }
}

/// Called by `Linear::map` before it maps its fields.
pub(crate) fn on_map(linear: Linear) -> Linear {
    let Some((_rearm, f)) = Disarmed::take(|a| match a {
        Active::Map(f) => Some(f),
        _ => None,
    }) else {
        return linear;
    };
    let path = current_path();
    // SAFETY: as in `on_visit`, for the closure borrowed by `map_linears`.
    unsafe { (*f)(&path, linear) }
}

/// Tracks the module path in the thread-local stack the hooks read.
struct PathTracker;

impl ModuleVisitor for PathTracker {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        PATH.with(|p| p.borrow_mut().push(name.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        PATH.with(|p| p.borrow_mut().pop());
    }
}

impl ModuleMapper for PathTracker {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        PATH.with(|p| p.borrow_mut().push(name.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        PATH.with(|p| p.borrow_mut().pop());
    }
}

/// Calls `f(path, layer)` for every `emloc::nn::Linear` in `model` (and the `Linear` view of
/// every `emloc::nn::Conv2d` with groups = 1), in traversal order.
pub(crate) fn for_each_linear<M: Module>(model: &M, mut f: impl FnMut(&str, &Linear)) {
    for_each_layer(model, |path, linear, _| f(path, linear));
}

/// [`for_each_linear`] that also tells `f` the kernel size `[kh, kw]` of a convolution's view
/// (`None` for a `Linear`).
pub(crate) fn for_each_layer<M: Module>(
    model: &M,
    mut f: impl FnMut(&str, &Linear, Option<[usize; 2]>),
) {
    let f: &mut dyn FnMut(&str, &Linear, KernelSize) = &mut f;
    // SAFETY: only the lifetime is erased; `Installed` removes the pointer before `f` goes away.
    let f: *mut VisitFn = unsafe { std::mem::transmute(f) };
    let _installed = Installed::new(Active::Visit(f));
    model.visit(&mut PathTracker);
}

/// Rebuilds `model`, replacing every `emloc::nn::Linear` by `f(path, layer)`.
pub(crate) fn map_linears<M: Module>(model: M, mut f: impl FnMut(&str, Linear) -> Linear) -> M {
    let f: &mut dyn FnMut(&str, Linear) -> Linear = &mut f;
    // SAFETY: as in `for_each_linear`.
    let f: *mut MapFn = unsafe { std::mem::transmute(f) };
    let _installed = Installed::new(Active::Map(f));
    model.map(&mut PathTracker)
}

/// Module paths of the layers of `model` that emloc cannot transform, each with the reason.
pub(crate) fn unsupported_layers<M: Module>(model: &M) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut f = |path: &str, reason: &str| found.push((path.to_string(), reason.to_string()));
    let f: &mut dyn FnMut(&str, &str) = &mut f;
    // SAFETY: as in `for_each_linear`.
    let f: *mut UnsupportedFn = unsafe { std::mem::transmute(f) };
    {
        let _installed = Installed::new(Active::Unsupported(f));
        model.visit(&mut PathTracker);
    }
    found
}

/// Module paths of every layer named `Linear` (emloc's or Burn's), found by the container name
/// that both share; used to tell users which layers are stock `burn::nn::Linear`.
pub(crate) fn all_linear_paths<M: Module>(model: &M) -> Vec<String> {
    find_layer_paths(model, false)
}

/// [`all_linear_paths`] plus every `emloc::nn::Conv2d` (found by its `factors` field, which
/// Burn's `Conv2d` lacks): the layers an emulator report lists as kept dense.
pub(crate) fn all_layer_paths<M: Module>(model: &M) -> Vec<String> {
    find_layer_paths(model, true)
}

fn find_layer_paths<M: Module>(model: &M, with_conv: bool) -> Vec<String> {
    #[derive(Default)]
    struct Finder {
        with_conv: bool,
        path: Vec<String>,
        found: Vec<String>,
    }
    impl ModuleVisitor for Finder {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            if (name == "weight" && container_type == "Struct:Linear")
                || (self.with_conv && name == "factors" && container_type == "Struct:Conv2d")
            {
                self.found.push(self.path.join("."));
            }
            self.path.push(name.to_string());
        }

        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
    }
    let mut finder = Finder { with_conv, ..Default::default() };
    model.visit(&mut finder);
    finder.found
}

/// The field-by-field part of `Module` for an emloc layer whose parameters are `weight`, `bias`,
/// `factors` and `lora` (`Linear`, `Conv2d`): what `#[derive(Module)]` would generate, so the
/// hand-written impls only add the hook calls. `visit_fields!(self, visitor, CONTAINER)` and
/// `map_fields!(this, mapper, CONTAINER)` (yielding the four mapped fields) go inside `visit` and
/// `map`; `delegate_fields!()` writes the six remaining methods; fields other than the four are
/// copied unchanged.
macro_rules! visit_fields {
    ($layer:expr, $visitor:expr, $container:expr) => {{
        $visitor.enter_module("weight", $container);
        $layer.weight.visit($visitor);
        $visitor.exit_module("weight", $container);
        $visitor.enter_module("bias", $container);
        $layer.bias.visit($visitor);
        $visitor.exit_module("bias", $container);
        $visitor.enter_module("factors", $container);
        $layer.factors.visit($visitor);
        $visitor.exit_module("factors", $container);
        $visitor.enter_module("lora", $container);
        $layer.lora.visit($visitor);
        $visitor.exit_module("lora", $container);
    }};
}

macro_rules! map_fields {
    ($layer:expr, $mapper:expr, $container:expr) => {{
        $mapper.enter_module("weight", $container);
        let weight = Module::map($layer.weight, $mapper);
        $mapper.exit_module("weight", $container);
        $mapper.enter_module("bias", $container);
        let bias = Module::map($layer.bias, $mapper);
        $mapper.exit_module("bias", $container);
        $mapper.enter_module("factors", $container);
        let factors = Module::map($layer.factors, $mapper);
        $mapper.exit_module("factors", $container);
        $mapper.enter_module("lora", $container);
        let lora = Module::map($layer.lora, $mapper);
        $mapper.exit_module("lora", $container);
        (weight, bias, factors, lora)
    }};
}

macro_rules! delegate_fields {
    () => {
        fn collect_devices(&self, devices: burn::module::Devices) -> burn::module::Devices {
            let devices = self.weight.collect_devices(devices);
            let devices = self.bias.collect_devices(devices);
            let devices = self.factors.collect_devices(devices);
            self.lora.collect_devices(devices)
        }

        fn fork(self, device: &burn::tensor::Device) -> Self {
            $crate::nn::hooks::delegate_fields!(@each self, self, |field| field.fork(device))
        }

        fn to_device(self, device: &burn::tensor::Device) -> Self {
            $crate::nn::hooks::delegate_fields!(@each self, self, |field| field.to_device(device))
        }

        fn valid(&self) -> Self {
            let layer = self.clone();
            $crate::nn::hooks::delegate_fields!(@each layer, layer, |field| field.valid())
        }

        fn train(self) -> Self {
            $crate::nn::hooks::delegate_fields!(@each self, self, |field| field.train())
        }

        fn materialize(self) -> Self {
            $crate::nn::hooks::delegate_fields!(@each self, self, |field| field.materialize())
        }
    };
    (@each $layer:expr, $rest:expr, |$field:ident| $call:expr) => {{
        #[allow(clippy::needless_update)]
        let layer = Self {
            weight: {
                let $field = $layer.weight;
                $call
            },
            bias: {
                let $field = $layer.bias;
                $call
            },
            factors: {
                let $field = $layer.factors;
                $call
            },
            lora: {
                let $field = $layer.lora;
                $call
            },
            ..$rest
        };
        layer
    }};
}

pub(crate) use {delegate_fields, map_fields, visit_fields};
