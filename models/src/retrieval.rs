//! Question → answer retrieval with a [`SentenceEncoder`]: the data format (GSM8K JSONL), a
//! deterministic train/validation split, Recall@k and MRR, and contrastive LoRA fine-tuning with
//! in-batch negatives.
//!
//! # Data format
//! One JSON object per line with string fields `question` and `answer` (GSM8K's format; other
//! fields are ignored, blank lines are skipped). The `i`-th answer is the one relevant document
//! of the `i`-th question; every other answer in the evaluated set is a distractor.

use std::path::Path;

use burn::optim::ModuleOptimizer;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

use crate::bert::{BertInput, BertModel, Encoded, SentenceEncoder};
use crate::error::{ModelError, Result};
use crate::jsonl::{nonblank_string, parse_records};
use crate::training::rng;
use crate::training::train_embedding_pairs;
pub use crate::training::{Resume, StepInfo, TrainConfig, TrainReport, batch_order};

/// One question with its worked answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QaPair {
    /// The query text.
    pub question: String,
    /// The relevant document.
    pub answer: String,
}

/// Parses JSONL text (see the [module docs](self)); `path` only names the source in errors.
///
/// # Errors
/// [`ModelError::Data`] with the 1-based line number for invalid JSON, a missing or non-string
/// `question`/`answer`, or an empty one; [`ModelError::Data`] (line 0) if there is no pair at all.
pub fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<QaPair>> {
    parse_records(text, path, "no question/answer pairs", |value| {
        let field = |name: &str| nonblank_string(value.get(name), name);
        Ok(QaPair { question: field("question")?, answer: field("answer")? })
    })
}

/// Reads a JSONL data file (see [`parse_jsonl`]).
///
/// # Errors
/// [`ModelError::Io`] if it cannot be read; otherwise as [`parse_jsonl`].
pub fn read_jsonl(path: &Path) -> Result<Vec<QaPair>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    parse_jsonl(&text, path)
}

/// Disjoint parts of one data file.
#[derive(Debug, Clone)]
pub struct Split<T = QaPair> {
    /// Items for training and calibration.
    pub train: Vec<T>,
    /// Held-out items: never trained or calibrated on.
    pub validation: Vec<T>,
}

/// Shuffles `pairs` (any items: every task splits its data this way) with `seed` and takes the
/// first `validation` as the validation split.
///
/// # Errors
/// [`ModelError::InvalidInput`] unless `1 <= validation < pairs.len()`.
pub fn split<T>(pairs: Vec<T>, validation: usize, seed: u64) -> Result<Split<T>> {
    if validation == 0 || validation >= pairs.len() {
        return Err(ModelError::InvalidInput(format!(
            "validation size {validation} must be in 1..{} (the number of pairs)",
            pairs.len()
        )));
    }
    let order = rng(seed).permutation(pairs.len());
    let mut slots: Vec<Option<T>> = pairs.into_iter().map(Some).collect();
    let mut shuffled = order.iter().map(|&i| slots[i].take().expect("a permutation"));
    let validation_pairs = shuffled.by_ref().take(validation).collect();
    Ok(Split { validation: validation_pairs, train: shuffled.collect() })
}

/// Retrieval quality over a set of queries, each with one relevant document.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetrievalMetrics {
    /// Fraction of queries whose relevant document ranks first.
    pub recall_at_1: f64,
    /// Fraction of queries whose relevant document is in the top 5.
    pub recall_at_5: f64,
    /// Mean reciprocal rank of the relevant document.
    pub mrr: f64,
    /// Mean contrastive loss over the whole set: `logsumexp_j(s·q_i·d_j) − s·q_i·d_i` with the
    /// training scale `s` = [`METRIC_SCALE`]. Unlike the recalls it keeps moving when they are
    /// at their ceiling.
    pub loss: f64,
    /// Number of queries (and documents).
    pub queries: usize,
}

/// Logit scale of [`RetrievalMetrics::loss`] (the default training scale).
pub const METRIC_SCALE: f64 = 20.0;

/// Ranks every document for every query by dot product (cosine for unit vectors); query `i`'s
/// relevant document is document `i`. A tie with the relevant document counts against it, so a
/// constant embedding scores Recall@1 = 0, not 1.
///
/// # Errors
/// [`ModelError::InvalidInput`] naming the first query or document whose embedding holds a NaN
/// or an infinity (a diverged model): no rank is defined then, and comparisons with NaN would
/// otherwise count as a perfect rank.
///
/// # Panics
/// If the lists differ in length, are empty, or vectors differ in width.
pub fn retrieval_metrics(queries: &[Vec<f32>], documents: &[Vec<f32>]) -> Result<RetrievalMetrics> {
    assert_eq!(queries.len(), documents.len(), "one relevant document per query");
    assert!(!queries.is_empty(), "no queries");
    for (what, list) in [("query", queries), ("document", documents)] {
        if let Some(i) = list.iter().position(|v| v.iter().any(|x| !x.is_finite())) {
            return Err(ModelError::InvalidInput(format!(
                "the embedding of {what} {i} holds NaN or infinity (a diverged model?); no metric is defined"
            )));
        }
    }
    let dot = |a: &[f32], b: &[f32]| -> f64 {
        assert_eq!(a.len(), b.len(), "embedding widths differ");
        a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
    };
    let (mut top1, mut top5, mut reciprocal, mut loss) = (0usize, 0usize, 0.0f64, 0.0f64);
    for (i, query) in queries.iter().enumerate() {
        let scores: Vec<f64> = documents.iter().map(|d| dot(query, d)).collect();
        let relevant = scores[i];
        let rank = scores.iter().enumerate().filter(|&(j, &s)| j != i && s >= relevant).count();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = scores.iter().map(|s| (METRIC_SCALE * (s - max)).exp()).sum::<f64>().ln();
        loss += log_sum + METRIC_SCALE * (max - relevant);
        top1 += usize::from(rank == 0);
        top5 += usize::from(rank < 5);
        reciprocal += 1.0 / (rank + 1) as f64;
    }
    let n = queries.len() as f64;
    // Finite f32 embeddings cannot overflow these f64 sums, so every metric is finite here.
    Ok(RetrievalMetrics {
        recall_at_1: top1 as f64 / n,
        recall_at_5: top5 as f64 / n,
        mrr: reciprocal / n,
        loss: loss / n,
        queries: queries.len(),
    })
}

/// Embeds the questions and answers of `pairs` with `encoder` through `model` and scores the
/// retrieval of each question's answer among all answers.
///
/// # Errors
/// As [`SentenceEncoder::embed`]; [`ModelError::InvalidInput`] if `pairs` is empty.
pub fn evaluate(
    encoder: &SentenceEncoder,
    model: &BertModel,
    pairs: &[QaPair],
) -> Result<RetrievalMetrics> {
    if pairs.is_empty() {
        return Err(ModelError::InvalidInput("no pairs to evaluate".into()));
    }
    let questions: Vec<&str> = pairs.iter().map(|p| p.question.as_str()).collect();
    let answers: Vec<&str> = pairs.iter().map(|p| p.answer.as_str()).collect();
    let q = encoder.embed_with(model, &questions)?;
    let a = encoder.embed_with(model, &answers)?;
    retrieval_metrics(&q, &a)
}

/// Multiple-negatives ranking loss (InfoNCE with in-batch negatives): cross-entropy of
/// `scale · q aᵀ` with question `i`'s target being answer `i`.
///
/// # Shapes
/// - `questions`, `answers`: `[batch, d]`, unit-norm rows
/// - output: `[1]`
///
/// # Panics
/// If the shapes differ.
pub fn contrastive_loss(questions: Tensor<2>, answers: Tensor<2>, scale: f64) -> Tensor<1> {
    assert_eq!(questions.dims(), answers.dims(), "contrastive_loss: shapes differ");
    let batch = questions.dims()[0];
    let device = questions.device();
    let scores = questions.matmul(answers.transpose()).mul_scalar(scale);
    let log_probs = log_softmax(scores.cast(FloatDType::F32), 1);
    let diagonal = log_probs * Tensor::<2>::eye(batch, &device);
    diagonal.sum().div_scalar(batch as f64).neg()
}

/// Trains the trainable parameters of `model` (e.g. LoRA adapters attached with
/// [`emloc::attach_new_adapter`], on the original model or on its emulator) for question → answer
/// retrieval on `pairs` with [`contrastive_loss`], AdamW and a warmup + cosine schedule.
/// `on_step` is called after every optimizer step with the step's figures and the model (to
/// log or checkpoint it, with the optimizer whose [`ModuleOptimizer::to_record`] is the state
/// to save). Returns the model in inference mode.
///
/// Deterministic for a given seed on a deterministic backend: the batch order comes from
/// [`batch_order`], the schedule from the step index, and the device RNG (dropout) is reseeded
/// from the seed and the step before each step. So a run resumed from `resume` reaches the same
/// adapters as an uninterrupted one, bit for bit (on a backend whose RNG is per device, not
/// shared with other threads drawing at the same time).
///
/// # Errors
/// [`ModelError::InvalidInput`] for a bad config or fewer pairs than `batch_size`; tokenizer
/// errors of [`SentenceEncoder::tokenize`]; [`ModelError::InvalidInput`] if the loss becomes
/// non-finite (naming the step).
pub fn finetune(
    encoder: &SentenceEncoder,
    model: BertModel,
    pairs: &[QaPair],
    config: &TrainConfig,
    resume: Option<Resume>,
    on_step: impl FnMut(&StepInfo, &BertModel, &ModuleOptimizer),
) -> Result<(BertModel, TrainReport)> {
    if config.batch_size < 2 {
        return Err(ModelError::InvalidInput(
            "training config: batch_size must be at least 2 (in-batch negatives)".into(),
        ));
    }
    let train_device: Device = encoder.device().clone().autodiff();
    let prepare = |indices: &[usize]| -> Result<([BertInput; 2], (), usize)> {
        let questions: Vec<&str> = indices.iter().map(|&i| pairs[i].question.as_str()).collect();
        let answers: Vec<&str> = indices.iter().map(|&i| pairs[i].answer.as_str()).collect();
        let (q, a) = (encoder.tokenize(&questions)?, encoder.tokenize(&answers)?);
        let tokens = count_tokens(&q) + count_tokens(&a);
        let batch = |e: &[Encoded]| encoder.batch(e).to_device(&train_device);
        Ok(([batch(&q), batch(&a)], (), tokens))
    };
    let loss = |q, a, ()| contrastive_loss(q, a, config.scale);
    train_embedding_pairs(encoder, model, pairs.len(), config, resume, prepare, loss, on_step)
}

fn count_tokens(encoded: &[Encoded]) -> usize {
    encoded.iter().map(|e| e.ids.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_errors_name_the_line() {
        let path = Path::new("data.jsonl");
        let good = r#"{"question": "q1", "answer": "a1", "extra": 3}"#;
        assert_eq!(parse_jsonl(&format!("{good}\n\n{good}\n"), path).unwrap().len(), 2);
        let cases = [
            (format!("{good}\nnot json\n"), 2, "invalid JSON"),
            (format!("{good}\n{good}\n{{\"question\": \"q\"}}"), 3, "missing field `answer`"),
            (r#"{"question": 3, "answer": "a"}"#.to_string(), 1, "must be a string"),
            (r#"{"question": " ", "answer": "a"}"#.to_string(), 1, "is empty"),
            ("\n\n".to_string(), 0, "no question/answer pairs"),
        ];
        for (text, line, needle) in cases {
            match parse_jsonl(&text, path) {
                Err(ModelError::Data { line: l, message, .. }) => {
                    assert_eq!(l, line, "{message}");
                    assert!(message.contains(needle), "{message}");
                }
                other => panic!("expected a data error, got {other:?}"),
            }
        }
    }

    fn pairs(n: usize) -> Vec<QaPair> {
        (0..n).map(|i| QaPair { question: format!("q{i}"), answer: format!("a{i}") }).collect()
    }

    #[test]
    fn split_is_a_deterministic_partition() {
        let s = split(pairs(50), 10, 3).unwrap();
        assert_eq!((s.validation.len(), s.train.len()), (10, 40));
        let mut all: Vec<String> =
            s.train.iter().chain(&s.validation).map(|p| p.question.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 50);
        assert_eq!(split(pairs(50), 10, 3).unwrap().validation, s.validation);
        assert_ne!(split(pairs(50), 10, 4).unwrap().validation, s.validation);
        assert!(split(pairs(5), 5, 0).is_err() && split(pairs(5), 0, 0).is_err());
    }

    #[test]
    fn metrics_match_hand_computed_ranks() {
        // Query 0 ranks its document first, query 1 second, query 2 third (ties count against).
        let q = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![1.0, 1.0]];
        let d = vec![vec![1.0, 0.0], vec![0.5, 0.5], vec![0.5, 0.5]];
        let m = retrieval_metrics(&q, &d).unwrap();
        assert_eq!(m.recall_at_1, 1.0 / 3.0);
        assert!((m.mrr - (1.0 + 1.0 / 2.0 + 1.0 / 3.0) / 3.0).abs() < 1e-12, "{}", m.mrr);
        assert_eq!(m.recall_at_5, 1.0);
        // Query 0: scores 20·[1, .5, .5] → loss ln(1 + 2e^-10).
        let l0 = (1.0 + 2.0 * (-10.0f64).exp()).ln();
        // Query 1: scores 20·[0, .5, .5] → ln(1 + 2e^10) − 10; query 2: 20·[1, 1, 1] → ln 3.
        let l1 = (1.0 + 2.0 * 10.0f64.exp()).ln() - 10.0;
        let l2 = 3.0f64.ln();
        assert!((m.loss - (l0 + l1 + l2) / 3.0).abs() < 1e-12, "{}", m.loss);
    }

    #[test]
    fn non_finite_embeddings_are_an_error_not_a_perfect_score() {
        // A NaN score used to rank first (`s >= NaN` is false for every s): Recall@1 = MRR = 1.
        let q = vec![vec![f32::NAN, 0.0], vec![0.0, 1.0]];
        let d = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let e = retrieval_metrics(&q, &d).unwrap_err().to_string();
        assert!(e.contains("query 0") && e.contains("NaN"), "{e}");
        let d = vec![vec![1.0, 0.0], vec![f32::INFINITY, 1.0]];
        let q = vec![d[0].clone(), d[0].clone()];
        let e = retrieval_metrics(&q, &d).unwrap_err().to_string();
        assert!(e.contains("document 1"), "{e}");
        let big = vec![vec![f32::MAX, f32::MAX], vec![-f32::MAX, f32::MAX]];
        assert!(retrieval_metrics(&big, &big).unwrap().loss.is_finite());
    }

    #[test]
    fn contrastive_loss_matches_a_float64_reference() {
        let device = Device::flex();
        let raw = [[0.6f32, 0.8], [1.0, 0.0], [0.0, 1.0]];
        let q = Tensor::<2>::from_data([[1.0f32, 0.0], [0.0, 1.0], [0.6, 0.8]], &device);
        let a = Tensor::<2>::from_data(raw, &device);
        let loss = f64::from(contrastive_loss(q, a, 20.0).into_scalar::<f32>());
        let qs = [[1.0f64, 0.0], [0.0, 1.0], [0.6, 0.8]];
        let mut expected = 0.0;
        for (i, qi) in qs.iter().enumerate() {
            let s: Vec<f64> =
                raw.iter().map(|aj| 20.0 * (qi[0] * aj[0] as f64 + qi[1] * aj[1] as f64)).collect();
            let lse = s.iter().map(|v| v.exp()).sum::<f64>().ln();
            expected += lse - s[i];
        }
        expected /= 3.0;
        assert!((loss - expected).abs() < 1e-4 * expected.max(1.0), "{loss} vs {expected}");
    }
}
