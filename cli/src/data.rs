//! The data: files or the data sets embedded in the binary, their deterministic
//! train/validation split, and the calibration texts drawn from the training split.

use std::path::{Path, PathBuf};

use clap::Args;
use emloc::io::FileIdentity;
use emloc_models::classification::{self, ClassificationTask, LabeledText};
use emloc_models::retrieval::{self, QaPair, Split};
use serde::Serialize;

use crate::CliResult;
use crate::args::Task;

/// The GSM8K train split (MIT, `data/gsm8k/LICENSE`), embedded so the main job runs anywhere.
pub const EMBEDDED_GSM8K: &str = include_str!("../../data/gsm8k/train.jsonl");

/// A fixed-seed sample of MultiEmo's train split (CC BY 4.0, `data/multiemo/README.md`): the
/// default data of `emloc run`'s classification recipe.
pub const EMBEDDED_MULTIEMO: &str = include_str!("../../data/multiemo/train.jsonl");

/// How a BIG-bench task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Exact match of the greedy answer against any accepted target.
    ExactMatch,
    /// The most likely of the choices (MathQA).
    Choice,
}

/// One of the BIG-bench train splits embedded for `emloc run --recipe smollm2-bigbench`
/// (Apache-2.0, `data/bigbench/README.md`).
#[derive(Debug)]
pub struct BigbenchTask {
    /// The file under `data/bigbench/`, as errors name it.
    pub file: &'static str,
    /// The table's column name.
    pub short: &'static str,
    /// The JSONL text.
    pub text: &'static str,
    /// How it is scored.
    pub scoring: Scoring,
}

macro_rules! bigbench {
    ($file:literal, $short:literal, $scoring:expr) => {
        BigbenchTask {
            file: concat!("data/bigbench/", $file, " (embedded)"),
            short: $short,
            text: include_str!(concat!("../../data/bigbench/", $file)),
            scoring: $scoring,
        }
    };
}

/// The eight BIG-bench tasks of the LLM recipe, in the table's order.
pub const BIGBENCH_TASKS: [BigbenchTask; 8] = [
    bigbench!("arithmetic__2_digit_addition.train.jsonl", "2-digit +", Scoring::ExactMatch),
    bigbench!("arithmetic__3_digit_addition.train.jsonl", "3-digit +", Scoring::ExactMatch),
    bigbench!("arithmetic__2_digit_multiplication.train.jsonl", "2-digit ×", Scoring::ExactMatch),
    bigbench!("unit_conversion__unit_addition_same.train.jsonl", "units", Scoring::ExactMatch),
    bigbench!("object_counting.train.jsonl", "counting", Scoring::ExactMatch),
    bigbench!(
        "linguistic_mappings__past_tense_json.train.jsonl",
        "past tense",
        Scoring::ExactMatch
    ),
    bigbench!("linguistic_mappings__plural_json.train.jsonl", "plurals", Scoring::ExactMatch),
    bigbench!("elementary_math_qa__question_only.train.jsonl", "MathQA", Scoring::Choice),
];

/// The data sets shipped in the binary: what a command reads without `--data`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum EmbeddedData {
    /// GSM8K question → answer pairs (the stages' default).
    #[default]
    Gsm8k,
    /// MultiEmo sentences with sentiment labels (`emloc run`'s default).
    MultiEmo,
}

impl EmbeddedData {
    /// The JSONL text.
    pub fn text(self) -> &'static str {
        match self {
            Self::Gsm8k => EMBEDDED_GSM8K,
            Self::MultiEmo => EMBEDDED_MULTIEMO,
        }
    }

    /// How errors and identities name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gsm8k => "data/gsm8k/train.jsonl (embedded)",
            Self::MultiEmo => "data/multiemo/train.jsonl (embedded)",
        }
    }
}

/// The data and its deterministic train/validation split.
#[derive(Args, Debug, Clone, Serialize)]
pub struct DataArgs {
    /// JSONL file, one {"question": ..., "answer": ...} object per line (GSM8K's format).
    /// Default: the GSM8K train split shipped in data/gsm8k (embedded in the binary).
    /// `--calib` is an alias (for `emloc emulate`).
    #[arg(long, alias = "calib")]
    pub data: Option<PathBuf>,
    /// Pairs held out for validation: never trained or calibrated on.
    #[arg(long, default_value_t = 200)]
    pub validation: usize,
    /// Seed of the train/validation split (keep it fixed across stages).
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Classification: the text standing for each label, `{label}` replaced by its name; the
    /// default scored best zero-shot on MultiEmo (see EXPERIMENTS.md). Keep it fixed across
    /// stages.
    #[arg(long, default_value = emloc_models::classification::DEFAULT_TEMPLATE)]
    pub label_template: String,
    /// What is read without --data (GSM8K for the stages; set by `emloc run`'s recipe).
    #[arg(skip)]
    pub embedded: EmbeddedData,
}

impl DataArgs {
    /// Reads and splits supervised causal-LM data (any of
    /// [`emloc_models::causal_lm::FORMATS`]; the embedded GSM8K is question → answer).
    pub fn split_examples(&self) -> CliResult<Split<emloc_models::causal_lm::Example>> {
        use emloc_models::causal_lm::{parse_jsonl, read_jsonl};
        let examples = match &self.data {
            Some(path) => read_jsonl(path)?,
            None => parse_jsonl(self.embedded.text(), Path::new(self.embedded.name()))?,
        };
        Ok(retrieval::split(examples, self.validation, self.split_seed)?)
    }

    /// Reads and splits the data.
    pub fn split(&self) -> CliResult<Split> {
        let pairs = match &self.data {
            Some(path) => retrieval::read_jsonl(path)?,
            None => retrieval::parse_jsonl(self.embedded.text(), Path::new(self.embedded.name()))?,
        };
        Ok(retrieval::split(pairs, self.validation, self.split_seed)?)
    }

    /// Reads and splits classification data; returns the task (labels described by
    /// `--label-template`, scale 20 as the retrieval loss) with the split.
    pub fn split_classes(&self) -> CliResult<(ClassificationTask, Split<LabeledText>)> {
        let data = match &self.data {
            Some(path) => classification::read_jsonl(path)?,
            None => {
                classification::parse_jsonl(self.embedded.text(), Path::new(self.embedded.name()))?
            }
        };
        let task =
            ClassificationTask::new(data.labels, &self.label_template, CLASSIFICATION_SCALE)?;
        Ok((task, retrieval::split(data.examples, self.validation, self.split_seed)?))
    }

    /// Whether the data's first record has classification fields (`input` and `label`); the
    /// parser reports any malformed line later.
    pub fn is_classification(&self) -> CliResult<bool> {
        use std::io::BufRead;
        let first = match &self.data {
            Some(path) => {
                let file =
                    std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let mut lines = std::io::BufReader::new(file).lines();
                // Only the first record is read: data files can be large.
                lines
                    .find(|l| !matches!(l, Ok(l) if l.trim().is_empty()))
                    .transpose()
                    .map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => self.embedded.text().lines().find(|l| !l.trim().is_empty()).map(str::to_string),
        };
        Ok(first.is_some_and(|line| {
            serde_json::from_str(&line).is_ok_and(|v| classification::is_classification_record(&v))
        }))
    }
}

/// Logit scale of classification training and of its loss metric (the retrieval task's 20:
/// cosines in [-1, 1] need it for a softmax that can approach one-hot).
pub const CLASSIFICATION_SCALE: f64 = 20.0;

impl DataArgs {
    /// The identity of the data file (or of the embedded GSM8K split).
    pub fn identity(&self) -> CliResult<FileIdentity> {
        Ok(match &self.data {
            Some(path) => FileIdentity::of(path)?,
            None => FileIdentity::of_bytes(self.embedded.name(), self.embedded.text().as_bytes()),
        })
    }

    /// How the data is split, by option name (recorded beside [`DataArgs::identity`]).
    pub fn selection(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        let mut selection: std::collections::BTreeMap<String, serde_json::Value> =
            [("validation", self.validation.into()), ("split_seed", self.split_seed.into())]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        // Classification's label descriptions are part of its data: the same sentences under
        // another template are another task.
        if self.is_classification().unwrap_or(false) {
            selection.insert("label_template".into(), self.label_template.clone().into());
        }
        selection
    }
}

/// Calibration texts: the question and the answer of the first `pairs` training pairs.
pub fn calibration_texts(train: &[QaPair], pairs: usize) -> CliResult<Vec<String>> {
    if pairs == 0 || pairs > train.len() {
        return Err(format!("--calibration-pairs {pairs} must be in 1..={}", train.len()).into());
    }
    Ok(train[..pairs].iter().flat_map(|p| [p.question.clone(), p.answer.clone()]).collect())
}

/// Classification calibration texts: the first `2 · pairs` training sentences (as many texts as
/// retrieval's `pairs` pairs) and every label description, which training embeds at every step.
pub fn classification_calibration_texts(
    task: &ClassificationTask,
    train: &[LabeledText],
    pairs: usize,
) -> CliResult<Vec<String>> {
    let most = train.len() / 2;
    if pairs == 0 || pairs > most {
        return Err(format!(
            "--calibration-pairs {pairs} must be in 1..={most} (two training sentences each)"
        )
        .into());
    }
    Ok(train[..2 * pairs]
        .iter()
        .map(|e| e.input.clone())
        .chain(task.descriptions.iter().cloned())
        .collect())
}

/// The calibration texts of an encoder task: [`calibration_texts`] or
/// [`classification_calibration_texts`] over the training split of `data`.
pub fn encoder_calibration_texts(
    task: Task,
    data: &DataArgs,
    pairs: usize,
) -> CliResult<Vec<String>> {
    if task == Task::Classification {
        let (task, split) = data.split_classes()?;
        return classification_calibration_texts(&task, &split.train, pairs);
    }
    calibration_texts(&data.split()?.train, pairs)
}
