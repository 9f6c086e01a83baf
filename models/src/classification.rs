//! Sentence classification with a [`SentenceEncoder`] and no head: a sentence is scored against
//! every label by `scale · cos(sentence, description)`, where each label's description (a short
//! text made from its name) is embedded by the same encoder. The base model classifies zero-shot;
//! fine-tuning trains LoRA on the encoder with cross-entropy over these scores, embedding the
//! descriptions through the adapted encoder at every step. The adapter is therefore plain LoRA:
//! emulation, correction and merging need nothing task-specific, and PEFT files need no
//! `modules_to_save`.
//!
//! # Data format
//! One JSON object per line with string fields `input` (the sentence) and `label`, and optionally
//! `choices` (an array of label strings). The label set is the sorted union of every `label` and
//! `choice` in the file; other fields are ignored, blank lines are skipped.

use std::collections::BTreeSet;
use std::path::Path;

use burn::optim::ModuleOptimizer;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::bert::{BertInput, BertModel, SentenceEncoder};
use crate::error::{ModelError, Result};
use crate::jsonl::{nonblank_string, parse_records};
use crate::training::train_embedding_pairs;
pub use crate::training::{Resume, StepInfo, TrainConfig, TrainReport};

/// One sentence with its class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabeledText {
    /// The sentence.
    pub input: String,
    /// Index of its label in [`ClassificationData::labels`].
    pub label: usize,
}

/// A parsed classification file: the label set and the examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassificationData {
    /// Label names, sorted.
    pub labels: Vec<String>,
    /// Examples in file order.
    pub examples: Vec<LabeledText>,
}

/// Whether a JSONL record has this task's fields (`input` and `label`): how a data file's task is
/// recognised from its first record.
pub fn is_classification_record(value: &serde_json::Value) -> bool {
    value.get("input").is_some() && value.get("label").is_some()
}

/// Parses JSONL text (see the [module docs](self)); `path` only names the source in errors.
///
/// # Errors
/// [`ModelError::Data`] with the 1-based line number for invalid JSON, a missing, non-string or
/// empty `input`/`label`, a `choices` that is not an array of non-empty strings, or a `label`
/// missing from its line's `choices`; [`ModelError::Data`] (line 0) if there is no example or
/// fewer than two labels.
pub fn parse_jsonl(text: &str, path: &Path) -> Result<ClassificationData> {
    let mut labels = BTreeSet::new();
    let raw = parse_records(text, path, "no input/label examples", |value| {
        let input = nonblank_string(value.get("input"), "input")?;
        let label = nonblank_string(value.get("label"), "label")?;
        if let Some(choices) = value.get("choices") {
            let Some(choices) = choices.as_array() else {
                return Err(format!("`choices` must be an array of strings, found {choices}"));
            };
            let choices = choices
                .iter()
                .map(|c| nonblank_string(Some(c), "choices"))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            if !choices.contains(&label) {
                return Err(format!("label `{label}` is not one of its `choices` {choices:?}"));
            }
            labels.extend(choices);
        }
        labels.insert(label.clone());
        Ok((input, label))
    })?;
    if labels.len() < 2 {
        let message = "fewer than two labels: nothing to classify".into();
        return Err(ModelError::Data { path: path.to_path_buf(), line: 0, message });
    }
    let labels: Vec<String> = labels.into_iter().collect();
    let examples = raw
        .into_iter()
        .map(|(input, label)| LabeledText {
            label: labels.binary_search(&label).expect("collected above"),
            input,
        })
        .collect();
    Ok(ClassificationData { labels, examples })
}

/// Reads a JSONL data file (see [`parse_jsonl`]).
///
/// # Errors
/// [`ModelError::Io`] if it cannot be read; otherwise as [`parse_jsonl`].
pub fn read_jsonl(path: &Path) -> Result<ClassificationData> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    parse_jsonl(&text, path)
}

/// The default description of a label: `"a {label} review"`. Zero-shot on 600 MultiEmo training
/// sentences with all-MiniLM-L6-v2 (EXPERIMENTS.md) it scored accuracy 0.36, against 0.32 for
/// the bare label name and 0.27–0.33 for other one-line templates.
pub const DEFAULT_TEMPLATE: &str = "a {label} review";

/// The label set with the texts that stand for each label, and the logit scale.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationTask {
    /// Label names, in class-index order.
    pub labels: Vec<String>,
    /// One description per label, embedded to score sentences against.
    pub descriptions: Vec<String>,
    /// Logit scale: scores are `scale · cos`.
    pub scale: f64,
}

impl ClassificationTask {
    /// Describes each label by `template` with every `{label}` replaced by the label's name.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for fewer than two labels, a template without `{label}`
    /// (every label would get the same description), or a scale that is not positive.
    pub fn new(labels: Vec<String>, template: &str, scale: f64) -> Result<Self> {
        if labels.len() < 2 {
            return Err(ModelError::InvalidInput(format!(
                "{} labels: classification needs at least two",
                labels.len()
            )));
        }
        if !template.contains("{label}") {
            return Err(ModelError::InvalidInput(format!(
                "label template `{template}` has no `{{label}}`"
            )));
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(ModelError::InvalidInput(format!("logit scale {scale} must be positive")));
        }
        let descriptions = labels.iter().map(|l| template.replace("{label}", l)).collect();
        Ok(Self { labels, descriptions, scale })
    }
}

/// Counts of one class over an evaluated set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCounts {
    /// The label.
    pub label: String,
    /// Examples of this class.
    pub support: usize,
    /// Examples predicted as this class.
    pub predicted: usize,
    /// Examples of this class predicted as it.
    pub correct: usize,
}

/// Classification quality over a set of examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationMetrics {
    /// Fraction of examples whose label scores strictly highest.
    pub accuracy: f64,
    /// Mean F1 over the classes present in the targets or the predictions (scikit-learn's
    /// default label set for `f1_score(average="macro")`).
    pub macro_f1: f64,
    /// Mean cross-entropy of the softmax over `scale · cos`.
    pub loss: f64,
    /// Number of examples.
    pub examples: usize,
    /// Per class, in label order.
    pub per_class: Vec<ClassCounts>,
}

/// Scores every sentence against every label description by `scale · dot` (cosine for unit
/// vectors). The prediction is the highest-scoring label; a tie with the target counts against
/// it (the tied other label is predicted), so a constant embedding scores accuracy 0, not 1.
///
/// # Errors
/// [`ModelError::InvalidInput`] naming the first sentence or label whose embedding holds a NaN or
/// an infinity (a diverged model: no prediction is defined), or a target out of range.
///
/// # Panics
/// If `sentences` and `targets` differ in length, either is empty, or vectors differ in width.
pub fn classification_metrics(
    sentences: &[Vec<f32>],
    targets: &[usize],
    descriptions: &[Vec<f32>],
    task: &ClassificationTask,
) -> Result<ClassificationMetrics> {
    assert_eq!(sentences.len(), targets.len(), "one target per sentence");
    assert!(!sentences.is_empty(), "no sentences");
    assert_eq!(descriptions.len(), task.labels.len(), "one description embedding per label");
    for (what, list) in [("sentence", sentences), ("label description", descriptions)] {
        if let Some(i) = list.iter().position(|v| v.iter().any(|x| !x.is_finite())) {
            return Err(ModelError::InvalidInput(format!(
                "the embedding of {what} {i} holds NaN or infinity (a diverged model?); no metric is defined"
            )));
        }
    }
    if let Some(t) = targets.iter().find(|&&t| t >= task.labels.len()) {
        return Err(ModelError::InvalidInput(format!(
            "target {t} is not a label index (there are {})",
            task.labels.len()
        )));
    }
    let classes = task.labels.len();
    let mut confusion = vec![vec![0usize; classes]; classes];
    let mut loss = 0.0f64;
    for (sentence, &target) in sentences.iter().zip(targets) {
        let scores: Vec<f64> = descriptions
            .iter()
            .map(|d| {
                assert_eq!(d.len(), sentence.len(), "embedding widths differ");
                task.scale
                    * sentence
                        .iter()
                        .zip(d)
                        .map(|(x, y)| f64::from(*x) * f64::from(*y))
                        .sum::<f64>()
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // Ties go against the target: the first other label at the maximum wins.
        let predicted =
            if scores[target] == max && scores.iter().filter(|&&s| s == max).count() == 1 {
                target
            } else {
                (0..classes)
                    .find(|&c| c != target && scores[c] == max)
                    .expect("some label attains the maximum")
            };
        confusion[target][predicted] += 1;
        loss += scores.iter().map(|s| (s - max).exp()).sum::<f64>().ln() + max - scores[target];
    }
    let per_class: Vec<ClassCounts> = (0..classes)
        .map(|c| ClassCounts {
            label: task.labels[c].clone(),
            support: confusion[c].iter().sum(),
            predicted: confusion.iter().map(|row| row[c]).sum(),
            correct: confusion[c][c],
        })
        .collect();
    let present: Vec<f64> = per_class
        .iter()
        .filter(|c| c.support + c.predicted > 0)
        .map(|c| 2.0 * c.correct as f64 / (c.support + c.predicted) as f64)
        .collect();
    let n = sentences.len() as f64;
    Ok(ClassificationMetrics {
        accuracy: per_class.iter().map(|c| c.correct).sum::<usize>() as f64 / n,
        macro_f1: present.iter().sum::<f64>() / present.len() as f64,
        loss: loss / n,
        examples: sentences.len(),
        per_class,
    })
}

/// Embeds the examples and the label descriptions through `model` with `encoder` and scores them
/// (see [`classification_metrics`]).
///
/// # Errors
/// As [`SentenceEncoder::embed`] and [`classification_metrics`]; [`ModelError::InvalidInput`] if
/// `examples` is empty.
pub fn evaluate(
    encoder: &SentenceEncoder,
    model: &BertModel,
    task: &ClassificationTask,
    examples: &[LabeledText],
) -> Result<ClassificationMetrics> {
    if examples.is_empty() {
        return Err(ModelError::InvalidInput("no examples to evaluate".into()));
    }
    let inputs: Vec<&str> = examples.iter().map(|e| e.input.as_str()).collect();
    let targets: Vec<usize> = examples.iter().map(|e| e.label).collect();
    let descriptions: Vec<&str> = task.descriptions.iter().map(String::as_str).collect();
    let sentences = encoder.embed_with(model, &inputs)?;
    let labels = encoder.embed_with(model, &descriptions)?;
    classification_metrics(&sentences, &targets, &labels, task)
}

/// Mean cross-entropy of `softmax(scale · s dᵀ)` against `targets`.
///
/// # Shapes
/// - `sentences`: `[batch, d]`, `descriptions`: `[classes, d]`, unit-norm rows
/// - `targets`: `[batch]`, class indices
/// - output: `[1]`
pub fn classification_loss(
    sentences: Tensor<2>,
    descriptions: Tensor<2>,
    targets: Tensor<1, Int>,
    scale: f64,
) -> Tensor<1> {
    let batch = sentences.dims()[0];
    let scores = sentences.matmul(descriptions.transpose()).mul_scalar(scale);
    let log_probs = log_softmax(scores.cast(FloatDType::F32), 1);
    log_probs.gather(1, targets.reshape([batch, 1])).mean().neg()
}

/// Trains the trainable parameters of `model` (e.g. LoRA adapters, on the original model or on
/// its emulator) to classify `examples` with [`classification_loss`] at `task.scale`, the label
/// descriptions embedded through the model being trained at every step, with the shared loop
/// ([`train`](crate::training::train): AdamW, warmup + cosine, seeded batch order, resumable). `config.scale` is unused:
/// the task's scale is the one evaluation uses. With `config.gradient_checkpointing` the
/// encoder's layers are recomputed in the backward pass
/// ([`SentenceEncoder::gradients_checkpointed`]).
/// Returns the model in inference mode.
///
/// # Errors
/// As [`train`](crate::training::train); tokenizer errors of [`SentenceEncoder::tokenize`].
pub fn finetune(
    encoder: &SentenceEncoder,
    model: BertModel,
    task: &ClassificationTask,
    examples: &[LabeledText],
    config: &TrainConfig,
    resume: Option<Resume>,
    on_step: impl FnMut(&StepInfo, &BertModel, &ModuleOptimizer),
) -> Result<(BertModel, TrainReport)> {
    let train_device: Device = encoder.device().clone().autodiff();
    let descriptions: Vec<&str> = task.descriptions.iter().map(String::as_str).collect();
    let described = encoder.tokenize(&descriptions)?;
    let description_tokens: usize = described.iter().map(|e| e.ids.len()).sum();
    let descriptions = encoder.batch(&described).to_device(&train_device);
    let prepare = |indices: &[usize]| -> Result<([BertInput; 2], Tensor<1, Int>, usize)> {
        let inputs: Vec<&str> = indices.iter().map(|&i| examples[i].input.as_str()).collect();
        let encoded = encoder.tokenize(&inputs)?;
        let tokens = encoded.iter().map(|e| e.ids.len()).sum::<usize>() + description_tokens;
        let targets: Vec<i64> = indices.iter().map(|&i| examples[i].label as i64).collect();
        let targets =
            Tensor::<1, Int>::from_data(TensorData::new(targets, [indices.len()]), &train_device);
        let sentences = encoder.batch(&encoded).to_device(&train_device);
        Ok(([sentences, descriptions.clone()], targets, tokens))
    };
    let loss = |s, d, targets| classification_loss(s, d, targets, task.scale);
    let items = examples.len();
    train_embedding_pairs(encoder, model, items, config, resume, prepare, loss, on_step)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(labels: &[&str]) -> ClassificationTask {
        ClassificationTask::new(labels.iter().map(|s| s.to_string()).collect(), "{label}", 20.0)
            .unwrap()
    }

    #[test]
    fn jsonl_gives_sorted_labels_and_errors_name_the_line() {
        let path = Path::new("data.jsonl");
        let text = "{\"input\": \"good\", \"label\": \"pos\", \"choices\": [\"pos\", \"neg\", \"mixed\"]}\n\n{\"input\": \"bad\", \"label\": \"neg\"}\n";
        let data = parse_jsonl(text, path).unwrap();
        assert_eq!(data.labels, ["mixed", "neg", "pos"]);
        assert_eq!(
            data.examples,
            [
                LabeledText { input: "good".into(), label: 2 },
                LabeledText { input: "bad".into(), label: 1 }
            ]
        );
        let good = r#"{"input": "a", "label": "x"}"#;
        let cases = [
            (format!("{good}\nnot json\n"), 2, "invalid JSON"),
            (format!("{good}\n{{\"input\": \"b\"}}"), 2, "missing field `label`"),
            (r#"{"input": 3, "label": "x"}"#.to_string(), 1, "must be a string"),
            (r#"{"input": "a", "label": " "}"#.to_string(), 1, "is empty"),
            (r#"{"input": "a", "label": "x", "choices": "x"}"#.to_string(), 1, "array of strings"),
            (
                r#"{"input": "a", "label": "x", "choices": ["y", 2]}"#.to_string(),
                1,
                "must be a string",
            ),
            (
                r#"{"input": "a", "label": "x", "choices": ["y", "z"]}"#.to_string(),
                1,
                "not one of its `choices`",
            ),
            (format!("{good}\n{good}\n"), 0, "fewer than two labels"),
            ("\n".to_string(), 0, "no input/label examples"),
        ];
        for (text, line, needle) in cases {
            match parse_jsonl(&text, path) {
                Err(ModelError::Data { line: l, message, .. }) => {
                    assert_eq!(l, line, "{message}");
                    assert!(message.contains(needle), "{message}");
                }
                other => panic!("expected a data error for {text:?}, got {other:?}"),
            }
        }
        assert!(is_classification_record(&serde_json::from_str(good).unwrap()));
        assert!(!is_classification_record(&serde_json::json!({"question": "q", "answer": "a"})));
    }

    #[test]
    fn task_validates_its_template_and_scale() {
        let t =
            ClassificationTask::new(vec!["a".into(), "b".into()], "it is {label}.", 5.0).unwrap();
        assert_eq!(t.descriptions, ["it is a.", "it is b."]);
        assert!(ClassificationTask::new(vec!["a".into(), "b".into()], "same", 5.0).is_err());
        assert!(ClassificationTask::new(vec!["a".into()], "{label}", 5.0).is_err());
        assert!(ClassificationTask::new(vec!["a".into(), "b".into()], "{label}", 0.0).is_err());
    }

    #[test]
    fn metrics_match_a_hand_computed_confusion_matrix() {
        // Three classes along the axes; sentences point at the class they are predicted as.
        let d = vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]];
        let s = vec![
            vec![1.0, 0.0, 0.0],
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 0.0, 1.0],
            vec![0.0, 1.0, 0.0],
        ];
        let targets = [0, 1, 1, 1, 2];
        // Confusion (row target, column predicted): [1 0 0; 1 1 1; 0 1 0].
        let m = classification_metrics(&s, &targets, &d, &task(&["a", "b", "c"])).unwrap();
        assert_eq!(m.accuracy, 2.0 / 5.0);
        let f1 = [2.0 * 1.0 / (1.0 + 2.0), 2.0 * 1.0 / (3.0 + 2.0), 0.0];
        assert!((m.macro_f1 - f1.iter().sum::<f64>() / 3.0).abs() < 1e-12, "{}", m.macro_f1);
        let counts: Vec<(usize, usize, usize)> =
            m.per_class.iter().map(|c| (c.support, c.predicted, c.correct)).collect();
        assert_eq!(counts, [(1, 2, 1), (3, 2, 1), (1, 1, 0)]);
        // Right: ln(1 + 2e^-20); wrong: ln(1 + 2e^-20) + 20.
        let right = (1.0 + 2.0 * (-20.0f64).exp()).ln();
        assert!((m.loss - (5.0 * right + 3.0 * 20.0) / 5.0).abs() < 1e-9, "{}", m.loss);
    }

    #[test]
    fn ties_count_against_the_target_and_nan_is_an_error() {
        let d = vec![vec![1.0, 0.0], vec![1.0, 0.0]];
        let m = classification_metrics(
            &[vec![1.0, 0.0], vec![1.0, 0.0]],
            &[0, 1],
            &d,
            &task(&["a", "b"]),
        )
        .unwrap();
        assert_eq!(m.accuracy, 0.0);
        assert_eq!(m.macro_f1, 0.0);
        let e = classification_metrics(&[vec![f32::NAN, 0.0]], &[0], &d, &task(&["a", "b"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sentence 0") && e.contains("NaN"), "{e}");
        let bad = vec![vec![1.0, 0.0], vec![f32::INFINITY, 0.0]];
        let e = classification_metrics(&[vec![1.0, 0.0]], &[0], &bad, &task(&["a", "b"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("label description 1"), "{e}");
        assert!(classification_metrics(&[vec![1.0, 0.0]], &[2], &d, &task(&["a", "b"])).is_err());
    }

    #[test]
    fn loss_matches_a_float64_reference() {
        let device = Device::flex();
        let s = [[0.6f32, 0.8], [1.0, 0.0]];
        let d = [[1.0f32, 0.0], [0.0, 1.0], [0.8, 0.6]];
        let targets = [2i64, 1];
        let loss = classification_loss(
            Tensor::<2>::from_data(s, &device),
            Tensor::<2>::from_data(d, &device),
            Tensor::<1, Int>::from_data(TensorData::new(targets.to_vec(), [2]), &device),
            10.0,
        );
        let loss = f64::from(loss.into_scalar::<f32>());
        let mut expected = 0.0;
        for (si, &t) in s.iter().zip(&targets) {
            let z: Vec<f64> = d
                .iter()
                .map(|dj| {
                    10.0 * (f64::from(si[0]) * f64::from(dj[0])
                        + f64::from(si[1]) * f64::from(dj[1]))
                })
                .collect();
            expected += z.iter().map(|v| v.exp()).sum::<f64>().ln() - z[t as usize];
        }
        expected /= 2.0;
        assert!((loss - expected).abs() < 1e-4 * expected.max(1.0), "{loss} vs {expected}");
    }
}
