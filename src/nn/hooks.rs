//! How emloc's model-wide transforms reach every `emloc::nn::Linear` inside any user module.
//!
//! A Burn visitor or mapper sees parameters, not the modules around them, and a mapper cannot
//! change a module's structure (turn a dense layer into an emulator layer). So `Linear`'s
//! hand-written `visit`/`map` first call [`on_visit`]/[`on_map`]; while a transform started by
//! [`for_each_linear`] or [`map_linears`] is running on this thread, the hook hands it the whole
//! layer together with its module path. Outside such a call the hooks do nothing.

use std::cell::RefCell;

use burn::module::{Module, ModuleMapper, ModuleVisitor};

use super::Linear;

type VisitFn = dyn FnMut(&str, &Linear);
type MapFn = dyn FnMut(&str, Linear) -> Linear;

#[derive(Clone, Copy)]
enum Active {
    Visit(*mut VisitFn),
    Map(*mut MapFn),
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
    let Some((_rearm, f)) = Disarmed::take(|a| match a {
        Active::Visit(f) => Some(f),
        Active::Map(_) => None,
    }) else {
        return;
    };
    let path = current_path();
    // SAFETY: `f` points to the closure borrowed by `for_each_linear`, which outlives the traversal
    // and uninstalls it (guard `Installed`) before returning; it is disarmed while it runs, so it is
    // never aliased.
    unsafe { (*f)(&path, linear) }
}

/// Called by `Linear::map` before it maps its fields.
pub(crate) fn on_map(linear: Linear) -> Linear {
    let Some((_rearm, f)) = Disarmed::take(|a| match a {
        Active::Map(f) => Some(f),
        Active::Visit(_) => None,
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

/// Calls `f(path, layer)` for every `emloc::nn::Linear` in `model`, in traversal order.
pub(crate) fn for_each_linear<M: Module>(model: &M, mut f: impl FnMut(&str, &Linear)) {
    let f: &mut dyn FnMut(&str, &Linear) = &mut f;
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

/// Module paths of every layer named `Linear` (emloc's or Burn's), found by the container name
/// that both share; used to tell users which layers are stock `burn::nn::Linear`.
pub(crate) fn all_linear_paths<M: Module>(model: &M) -> Vec<String> {
    #[derive(Default)]
    struct Finder {
        path: Vec<String>,
        found: Vec<String>,
    }
    impl ModuleVisitor for Finder {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            if name == "weight" && container_type == "Struct:Linear" {
                self.found.push(self.path.join("."));
            }
            self.path.push(name.to_string());
        }

        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
    }
    let mut finder = Finder::default();
    model.visit(&mut finder);
    finder.found
}
