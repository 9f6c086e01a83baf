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

use burn::optim::{ModuleOptimizer, OptimizerRecord};
use emloc::peft::PeftAdapter;
use emloc::{adapter_param_ids, export_adapter};
use burn::module::Module;
use serde::{Deserialize, Serialize};

use crate::common::{CliResult, TrainArgs, write_json};

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.bpk";

/// `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// The hyperparameters of the run (a resumed run must use the same).
    pub train: TrainArgs,
    /// `[A, B]` parameter ids per adapted layer.
    pub param_ids: BTreeMap<String, [u64; 2]>,
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

/// Writes `OUT/checkpoint-STEP` atomically (see the [module docs](self)).
pub fn save<M: Module>(out: &Path, step: usize, train: &TrainArgs, model: &M, optim: &ModuleOptimizer) -> CliResult<()> {
    let target = out.join(format!("checkpoint-{step}"));
    let temp = out.join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
    if temp.exists() {
        std::fs::remove_dir_all(&temp)?;
    }
    let written = (|| -> CliResult<()> {
        export_adapter(model)?.save(&temp)?;
        optim.to_record().save(temp.join(OPTIMIZER_FILE)).map_err(|e| format!("{}: {e:?}", temp.display()))?;
        let state = TrainerState { step, train: train.clone(), param_ids: adapter_param_ids(model) };
        write_json(&temp.join(STATE_FILE), &state)?;
        if target.exists() {
            std::fs::remove_dir_all(&target)?;
        }
        std::fs::rename(&temp, &target).map_err(|e| format!("{}: {e}", target.display()))?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    written
}

/// The checkpoint with the highest step in `out`, if any (temporary directories are ignored).
pub fn latest(out: &Path) -> CliResult<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(None) };
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) else { continue };
        if entry.path().join(STATE_FILE).is_file() && best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// With `--resume`, the latest checkpoint of `out` (an error if there is none), checked against
/// `train`'s hyperparameters; without, `None`.
pub fn resume(out: &Path, train: &TrainArgs, resume: bool) -> CliResult<Option<TrainingCheckpoint>> {
    if !resume {
        return Ok(None);
    }
    let Some(dir) = latest(out)? else {
        return Err(format!("--resume: no checkpoint-STEP in {}", out.display()).into());
    };
    let loaded = load(&dir, train)?;
    eprintln!("resuming from {} (step {})", loaded.dir.display(), loaded.state.step);
    Ok(Some(loaded))
}

/// Reads a checkpoint and checks that it was made with `train`'s hyperparameters.
pub fn load(dir: &Path, train: &TrainArgs) -> CliResult<TrainingCheckpoint> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| format!("{}: {e}", state_path.display()))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", state_path.display()))?;
    let (saved, now) = (serde_json::to_value(&state.train)?, serde_json::to_value(train)?);
    if saved != now {
        return Err(format!(
            "{}: the checkpoint was made with other training options ({saved}); resume with the same ones (now {now})",
            state_path.display()
        )
        .into());
    }
    let adapter = PeftAdapter::load(dir)?;
    let optimizer_path = dir.join(OPTIMIZER_FILE);
    let optimizer = OptimizerRecord::load(&optimizer_path).map_err(|e| format!("{}: {e:?}", optimizer_path.display()))?;
    Ok(TrainingCheckpoint { dir: dir.to_path_buf(), adapter, state, optimizer })
}
