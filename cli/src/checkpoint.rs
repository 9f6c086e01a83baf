//! Training checkpoints of `emloc finetune`: `OUT/checkpoint-STEP/` holds the adapter (PEFT),
//! the optimizer state (`optimizer.bpk`, Burn's burnpack) and `trainer_state.json` (step,
//! hyperparameters, the adapters' parameter ids that the optimizer state is keyed by). The batch
//! order, the learning-rate schedule and the dropout RNG (reseeded every step) are functions of
//! the seed and the step, so nothing else is needed to continue bit for bit.
//!
//! A checkpoint is written into a temporary directory beside its final name and renamed into
//! place, so an interrupted write never leaves a half-written `checkpoint-STEP`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use emloc::peft::PeftAdapter;
use emloc::{AdapterParamIds, adapter_param_ids, export_adapter};
use serde::{Deserialize, Serialize};

use emloc::io::FileIdentity;

use crate::CliResult;
use crate::args::TrainArgs;
use crate::output::write_json;

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.bpk";

/// `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// The hyperparameters of the run (a resumed run must use the same, except a larger
    /// `steps`).
    pub train: TrainArgs,
    /// `[A, B]` parameter ids per adapted layer.
    pub param_ids: AdapterParamIds,
    /// What the run trained on (absent in checkpoints written before it was recorded).
    #[serde(default)]
    pub inputs: Option<TrainingInputs>,
}

/// The inputs of a training run, by content: a resumed run must train the same model (or
/// emulator) on the same data split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingInputs {
    /// The model's files.
    pub model: Vec<FileIdentity>,
    /// The emulator's files, when training on one.
    pub emulator: Option<Vec<FileIdentity>>,
    /// The data file.
    pub data: FileIdentity,
    /// How the data is split (validation size, split seed).
    pub selection: BTreeMap<String, serde_json::Value>,
}

impl TrainingInputs {
    /// The first difference from `now`, in words, or `None` when both name the same inputs
    /// (content, not paths: a moved file is still the same input).
    fn difference(&self, now: &TrainingInputs) -> Option<String> {
        let (same, show) = (FileIdentity::same_files, FileIdentity::describe);
        if !same(&self.model, &now.model) {
            return Some(format!(
                "--model: the checkpoint trained {}, now {}",
                show(&self.model),
                show(&now.model)
            ));
        }
        match (&self.emulator, &now.emulator) {
            (None, None) => {}
            (Some(a), Some(b)) if same(a, b) => {}
            (a, b) => {
                let show_opt =
                    |f: &Option<Vec<FileIdentity>>| f.as_deref().map_or("no emulator".into(), show);
                return Some(format!(
                    "--emulator: the checkpoint trained on {}, now {}",
                    show_opt(a),
                    show_opt(b)
                ));
            }
        }
        if !self.data.same_content(&now.data) {
            return Some(format!(
                "--data: the checkpoint trained on {}, now {}",
                show(std::slice::from_ref(&self.data)),
                show(std::slice::from_ref(&now.data))
            ));
        }
        if self.selection != now.selection {
            return Some(format!(
                "the data split: the checkpoint used {:?}, now {:?}",
                self.selection, now.selection
            ));
        }
        None
    }
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct TrainingCheckpoint {
    /// Where it was read from.
    pub dir: PathBuf,
    /// The adapter after `state.step` steps.
    pub adapter: PeftAdapter,
    /// Step, hyperparameters, parameter ids.
    pub state: TrainerState,
    /// AdamW's state.
    pub optimizer: OptimizerRecord,
}

/// Writes `OUT/checkpoint-STEP` atomically (see the [module docs](self)). An existing
/// `checkpoint-STEP` is swapped for the new one in one step (Linux `renameat2` with
/// `RENAME_EXCHANGE`), so there is never a moment without a complete checkpoint of that step.
pub fn save<M: Module>(
    out: &Path,
    step: usize,
    train: &TrainArgs,
    inputs: &TrainingInputs,
    model: &M,
    optim: &ModuleOptimizer,
) -> CliResult<()> {
    let target = out.join(format!("checkpoint-{step}"));
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    // A fresh directory of this run's own (never a name that may hold someone's files).
    let temp =
        tempfile::Builder::new().prefix(&format!(".checkpoint-{step}.tmp-")).tempdir_in(out)?;
    let state = TrainerState {
        step,
        train: train.clone(),
        param_ids: adapter_param_ids(model),
        inputs: Some(inputs.clone()),
    };
    export_adapter(model)?.save(temp.path())?;
    optim
        .to_record()
        .save(temp.path().join(OPTIMIZER_FILE))
        .map_err(|e| format!("{}: {e:?}", temp.path().display()))?;
    write_json(&temp.path().join(STATE_FILE), &state)?;
    if target.exists() {
        // After the exchange the temporary directory holds the old checkpoint; dropping it
        // removes that.
        exchange(temp.path(), &target)
            .map_err(|e| format!("replacing {}: {e}", target.display()))?;
    } else {
        let temp = temp.keep();
        std::fs::rename(&temp, &target).map_err(|e| format!("{}: {e}", target.display()))?;
    }
    Ok(())
}

/// Atomically swaps two directory entries.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Swaps two directory entries where no atomic exchange exists: `b` is absent for a moment.
#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let aside = b.with_extension("replaced");
    std::fs::rename(b, &aside)?;
    std::fs::rename(a, b)?;
    std::fs::rename(&aside, a)
}

/// The checkpoint with the highest step in `out`, if any (temporary directories are ignored).
pub fn latest(out: &Path) -> CliResult<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(None) };
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() && best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// With `--resume`, the latest checkpoint of `out` (an error if there is none), checked against
/// `train`'s hyperparameters and the run's `inputs`; without, `None`, after checking that `out`
/// holds no checkpoint of an earlier run (a fresh run would overwrite them).
pub fn resume(
    out: &Path,
    train: &TrainArgs,
    inputs: &TrainingInputs,
    resume: bool,
) -> CliResult<Option<TrainingCheckpoint>> {
    let Some(dir) = latest(out)? else {
        if resume {
            return Err(format!("--resume: no checkpoint-STEP in {}", out.display()).into());
        }
        return Ok(None);
    };
    if !resume {
        return Err(format!(
            "{} holds {} of an earlier run; pass --resume to continue it, or choose another --out",
            out.display(),
            dir.display()
        )
        .into());
    }
    let loaded = load(&dir, train, inputs)?;
    eprintln!("resuming from {} (step {})", loaded.dir.display(), loaded.state.step);
    Ok(Some(loaded))
}

/// Reads a checkpoint and checks that it was made with `train`'s hyperparameters (a larger
/// `--steps` extends the run, on the longer schedule) and from the same `inputs`.
pub fn load(
    dir: &Path,
    train: &TrainArgs,
    inputs: &TrainingInputs,
) -> CliResult<TrainingCheckpoint> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| format!("{}: {e}", state_path.display()))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", state_path.display()))?;
    let without_steps = |t: &TrainArgs| -> CliResult<serde_json::Value> {
        let mut value = serde_json::to_value(t)?;
        value.as_object_mut().map(|o| o.remove("steps"));
        Ok(value)
    };
    let (saved, now) = (without_steps(&state.train)?, without_steps(train)?);
    if saved != now {
        return Err(format!(
            "{}: the checkpoint was made with other training options ({saved}); resume with the same ones (now {now})",
            state_path.display()
        )
        .into());
    }
    if train.steps < state.step {
        return Err(format!(
            "{}: the checkpoint is at step {}, past --steps {}; resume with --steps {} or more",
            state_path.display(),
            state.step,
            train.steps,
            state.step
        )
        .into());
    }
    match &state.inputs {
        Some(saved) => {
            if let Some(difference) = saved.difference(inputs) {
                return Err(format!(
                    "{}: resuming on other inputs than the checkpoint's: {difference}",
                    state_path.display()
                )
                .into());
            }
        }
        None => eprintln!(
            "warning: {} records no input identities; their match is not checked",
            state_path.display()
        ),
    }
    let adapter = PeftAdapter::load(dir)?;
    let optimizer_path = dir.join(OPTIMIZER_FILE);
    let optimizer = OptimizerRecord::load(&optimizer_path)
        .map_err(|e| format!("{}: {e:?}", optimizer_path.display()))?;
    Ok(TrainingCheckpoint { dir: dir.to_path_buf(), adapter, state, optimizer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_swaps_two_directories_in_place() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("new"), root.path().join("checkpoint-2"));
        for (dir, text) in [(&a, "new"), (&b, "old")] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join(STATE_FILE), text).unwrap();
        }
        exchange(&a, &b).unwrap();
        assert_eq!(std::fs::read_to_string(b.join(STATE_FILE)).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(a.join(STATE_FILE)).unwrap(), "old");
        assert!(exchange(&a, &root.path().join("missing")).is_err());
    }
}
