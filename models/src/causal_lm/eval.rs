//! [`evaluate`]: completion loss, exact match of greedy generations, and multiple-choice
//! accuracy by likelihood.

use serde::{Deserialize, Serialize};

use super::data::Example;
use super::task::{CausalLmTask, Tokenized, row_nll};
use super::train::tokenize_all;
use crate::error::{ModelError, Result};
use crate::llama::{GenerationConfig, LlamaForCausalLM};

/// What [`evaluate`] computes and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Sequences per forward pass when scoring.
    pub batch_size: usize,
    /// Most tokens generated per example for exact match; 0 skips generation.
    pub max_new_tokens: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { batch_size: 8, max_new_tokens: 32 }
    }
}

/// Quality of a causal LM on held-out examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CausalLmMetrics {
    /// Mean negative log-likelihood per completion token of the training targets (lower is
    /// better).
    pub loss: f64,
    /// Fraction of examples whose greedy generation, trimmed to its first line, equals one of
    /// the accepted targets (trimmed); `None` when generation was skipped.
    pub exact_match: Option<f64>,
    /// Fraction of multiple-choice examples whose right option has the highest log-likelihood
    /// (summed over its tokens); `None` without multiple-choice examples.
    pub accuracy: Option<f64>,
    /// Examples evaluated.
    pub examples: usize,
    /// Completion tokens the loss averages over.
    pub completion_tokens: usize,
    /// Multiple-choice examples among them.
    pub choice_examples: usize,
}

/// The answer part of a generation that exact match compares: its first non-empty line,
/// trimmed.
pub fn answer_text(generated: &str) -> &str {
    generated.trim().lines().next().unwrap_or("").trim()
}

/// Evaluates `model` on `examples`. `on_progress(done, total)` is called as work completes
/// (units: scored sequences and generated examples).
///
/// # Errors
/// Tokenizer and template errors; [`ModelError::InvalidInput`] for no examples, a batch size of
/// 0, or a non-finite log-likelihood.
pub fn evaluate(
    task: &CausalLmTask,
    model: &LlamaForCausalLM,
    examples: &[Example],
    config: &EvalConfig,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<CausalLmMetrics> {
    if examples.is_empty() {
        return Err(ModelError::InvalidInput("no examples to evaluate".into()));
    }
    if config.batch_size == 0 {
        return Err(ModelError::InvalidInput("evaluation batch_size must be at least 1".into()));
    }
    let device = model.device();
    let targets = tokenize_all(task, examples)?;
    // Every option of every multiple-choice example, scored as a completion of its prompt.
    let mut options: Vec<(usize, Tokenized)> = Vec::new();
    for (i, example) in examples.iter().enumerate() {
        if let Some(choices) = &example.choices {
            for option in &choices.options {
                options.push((i, task.encode_completion(&example.prompt, option)?));
            }
        }
    }
    let generations = if config.max_new_tokens > 0 { examples.len() } else { 0 };
    let total = targets.len() + options.len() + generations;
    let mut done = 0;
    let mut score = |items: &[Tokenized], done: &mut usize| -> Result<Vec<(f64, usize)>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(config.batch_size) {
            out.extend(row_nll(model, &task.batch(chunk, &device), chunk.len())?);
            *done += chunk.len();
            on_progress(*done, total);
        }
        Ok(out)
    };

    let target_nll = score(&targets, &mut done)?;
    let completion_tokens: usize = target_nll.iter().map(|&(_, n)| n).sum();
    let loss = target_nll.iter().map(|&(s, _)| s).sum::<f64>() / completion_tokens as f64;

    let option_items: Vec<Tokenized> = options.iter().map(|(_, t)| t.clone()).collect();
    let option_nll = score(&option_items, &mut done)?;
    let (mut correct, mut choice_examples, mut k) = (0usize, 0usize, 0usize);
    for example in examples {
        if let Some(choices) = &example.choices {
            let nll = &option_nll[k..k + choices.options.len()];
            k += choices.options.len();
            // The most likely option; ties go to the first, as an argmax over log-likelihoods.
            let best = (0..nll.len())
                .min_by(|&a, &b| nll[a].0.total_cmp(&nll[b].0))
                .expect("two or more options");
            correct += usize::from(best == choices.answer);
            choice_examples += 1;
        }
    }

    let exact_match = if generations > 0 {
        let settings = GenerationConfig::greedy(config.max_new_tokens)
            .with_eos_token_ids(task.eos_token_ids().to_vec());
        let prompts =
            examples.iter().map(|e| task.encode_prompt(&e.prompt)).collect::<Result<Vec<_>>>()?;
        let mut matches = 0;
        for (chunk, batch) in
            examples.chunks(config.batch_size).zip(prompts.chunks(config.batch_size))
        {
            // Left-padded batched greedy decoding; each row stops at its own end of sequence.
            let generated = model.generate_batch(batch, &settings, task.pad_token_id())?;
            for (example, ids) in chunk.iter().zip(&generated) {
                let text = task.tokenizer().decode(ids, true)?;
                let answer = answer_text(&text);
                matches += usize::from(example.targets.iter().any(|t| answer_text(t) == answer));
            }
            done += chunk.len();
            on_progress(done, total);
        }
        Some(matches as f64 / examples.len() as f64)
    } else {
        None
    };
    Ok(CausalLmMetrics {
        loss,
        exact_match,
        accuracy: (choice_examples > 0).then(|| correct as f64 / choice_examples as f64),
        examples: examples.len(),
        completion_tokens,
        choice_examples,
    })
}
