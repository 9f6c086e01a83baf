//! Text generation with a [`LlamaForCausalLM`]: greedy decoding and temperature / nucleus
//! (top-p) sampling from a seeded [`XorShiftRng`], so sampled outputs are reproducible.
//!
//! The prompts are left-padded to one length and run once (filling the
//! [`KvCache`](super::KvCache)), then one token per step for every row. Sampling happens on the
//! host in f64 over the last position's logits, each row with its own generator.

use burn::tensor::{Int, Tensor, TensorData};

use super::LlamaForCausalLM;
use super::mask::PaddingMask;
use super::model::check_ids;
use crate::error::{ModelError, Result};
use crate::rng::XorShiftRng;

/// How [`LlamaForCausalLM::generate`] picks tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate (the prompt not counted).
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` means greedy decoding (argmax).
    pub temperature: f64,
    /// Nucleus sampling: sample from the smallest set of most likely tokens whose probability
    /// reaches `top_p` (at least the most likely one). `1` samples from the whole distribution;
    /// values near `0` keep only the most likely token (greedy).
    pub top_p: f64,
    /// Seed of the sampling generator (row `r` of a batch uses [`row_seed`](Self::row_seed)).
    pub seed: u64,
    /// Generation stops after any of these ids (it is included in the output); e.g. both
    /// `<|im_end|>` and `<|endoftext|>`.
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    /// 32 greedy tokens, no stop ids.
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, ..Self::default() }
    }

    /// Sampling at `temperature` with nucleus `top_p` from `seed`.
    pub fn sampling(max_new_tokens: usize, temperature: f64, top_p: f64, seed: u64) -> Self {
        Self { max_new_tokens, temperature, top_p, seed, eos_token_ids: Vec::new() }
    }

    /// Sets the stop ids.
    pub fn with_eos_token_ids(mut self, ids: Vec<u32>) -> Self {
        self.eos_token_ids = ids;
        self
    }

    /// The seed of row `row`'s generator in
    /// [`generate_batch`](LlamaForCausalLM::generate_batch): `seed` for row 0 (so a batch of
    /// one samples as [`generate`](LlamaForCausalLM::generate)), a fixed mix of `seed` and the
    /// row for the others. Row `r` of a batch samples what `generate` samples with
    /// `seed = row_seed(r)` (up to float rounding of batched logits).
    pub fn row_seed(&self, row: usize) -> u64 {
        self.seed.wrapping_add((row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// Checks that a prompt of `prompt_tokens` tokens followed by `max_new_tokens` new ones fits
    /// a context window of `context` tokens (the config's `max_position_embeddings`): past it a
    /// model was never trained, and a token budget given by mistake (say `10¹¹`) must be refused
    /// before anything is sized by it. `prompt_tokens = 0` checks the budget alone, before the
    /// prompt is tokenized.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] naming the budget, the prompt's length and the window, and
    /// the largest budget that fits.
    pub fn check_context(&self, prompt_tokens: usize, context: usize) -> Result<()> {
        let fits = context.saturating_sub(prompt_tokens);
        if self.max_new_tokens > fits {
            let prompt = if prompt_tokens == 0 {
                String::new()
            } else {
                format!("a prompt of {prompt_tokens} tokens plus ")
            };
            return Err(ModelError::InvalidInput(format!(
                "{prompt}max_new_tokens {} exceeds the model's context window of {context} \
                 tokens (max_position_embeddings); at most {fits} new tokens fit",
                self.max_new_tokens
            )));
        }
        Ok(())
    }

    /// Checks the temperature (finite, `>= 0`) and `top_p` (in `[0, 1]`).
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] naming the bad setting.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::InvalidInput(format!(
                "temperature {} must be finite and non-negative",
                self.temperature
            )));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(ModelError::InvalidInput(format!(
                "top_p {} is outside [0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Index of the largest logit (the first one on ties; NaNs are never chosen over numbers).
///
/// # Panics
/// If `logits` is empty.
pub fn argmax(logits: &[f32]) -> u32 {
    assert!(!logits.is_empty(), "argmax of no logits");
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || (logits[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best as u32
}

/// Checks that every logit is finite.
///
/// # Errors
/// [`ModelError::InvalidInput`] naming the first NaN or infinite logit (a diverged or broken
/// model: sampling from it would return a meaningless token).
pub fn check_logits(logits: &[f32]) -> Result<()> {
    match logits.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(ModelError::InvalidInput(format!(
            "logit {} of token {i} is not finite: the model produced NaN/Inf logits",
            logits[i]
        ))),
        None => Ok(()),
    }
}

/// Picks the next token from one position's logits: [`argmax`] when `temperature` is 0,
/// otherwise a draw from `softmax(logits / temperature)` restricted to the top-`top_p` nucleus
/// (most likely tokens first, ties by lower id; the nucleus always holds the most likely
/// token) and renormalised. Logits should be finite (see [`check_logits`]); NaNs are ordered
/// by [`f64::total_cmp`] and never panic.
///
/// # Panics
/// If `logits` is empty.
pub fn sample_token(logits: &[f32], temperature: f64, top_p: f64, rng: &mut XorShiftRng) -> u32 {
    if temperature == 0.0 {
        return argmax(logits);
    }
    let max = logits[argmax(logits) as usize] as f64;
    let weights: Vec<f64> =
        logits.iter().map(|&x| ((x as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable: equal probabilities keep the lower id first, as argmax does.
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    let mut nucleus = Vec::new();
    let mut mass = 0.0;
    for &i in &order {
        nucleus.push(i);
        mass += weights[i] / total;
        if mass >= top_p {
            break;
        }
    }
    let nucleus_total: f64 = nucleus.iter().map(|&i| weights[i]).sum();
    let mut u = rng.next_f64() * nucleus_total;
    for &i in &nucleus {
        u -= weights[i];
        if u < 0.0 {
            return i as u32;
        }
    }
    *nucleus.last().expect("the nucleus holds at least one token") as u32
}

impl LlamaForCausalLM {
    /// Continues `prompt` (token ids, batch of one) by up to `config.max_new_tokens` tokens and
    /// returns the new ids (without the prompt). Stops early after an id of
    /// `config.eos_token_ids` (included in the output). The same as
    /// [`generate_batch`](Self::generate_batch) with one row.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for an empty prompt, an id outside the vocabulary, an
    /// invalid [`GenerationConfig`] or non-finite logits.
    pub fn generate(&self, prompt: &[u32], config: &GenerationConfig) -> Result<Vec<u32>> {
        let mut out = self.generate_batch(&[prompt.to_vec()], config, 0)?;
        Ok(out.pop().expect("one row"))
    }

    /// Continues every prompt by up to `config.max_new_tokens` tokens and returns, per prompt,
    /// only the new ids. The prompts are left-padded with `pad_id` to the longest one (masked:
    /// the pad id never influences real tokens) and run in one forward call, then every row
    /// advances one token per step through the KV cache. A row stops after emitting an id of
    /// `config.eos_token_ids` (included in its output); it is then fed masked pads to keep the
    /// batch's shape, and the loop ends when every row stopped or after `max_new_tokens` steps.
    /// Row `r` samples from its own generator, seeded with
    /// [`GenerationConfig::row_seed`], so results are reproducible and each row's output equals
    /// [`generate`](Self::generate) of its prompt alone (with that seed), up to float rounding
    /// of the batched logits. No prompts give no outputs.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for an empty prompt, an id (or `pad_id`) outside the
    /// vocabulary, an invalid [`GenerationConfig`] or non-finite logits.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
        pad_id: u32,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_batch_with(prompts, config, pad_id, |_| {})
    }

    /// [`generate_batch`](Self::generate_batch), calling `on_step` with the tokens of every row
    /// so far after each step (the first call comes after the prompts' forward pass: to stream
    /// the output, or to time prefill and decoding apart).
    ///
    /// # Errors
    /// As [`generate_batch`](Self::generate_batch).
    pub fn generate_batch_with(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
        pad_id: u32,
        mut on_step: impl FnMut(&[Vec<u32>]),
    ) -> Result<Vec<Vec<u32>>> {
        config.validate()?;
        let vocab = self.vocab_size();
        for (r, prompt) in prompts.iter().enumerate() {
            if prompt.is_empty() {
                return Err(ModelError::InvalidInput(format!("empty prompt (row {r})")));
            }
            check_ids(prompt, vocab).map_err(|e| in_row(e, &format!("prompt {r}")))?;
        }
        if pad_id as usize >= vocab {
            return Err(ModelError::InvalidInput(format!(
                "pad id {pad_id} is outside the vocabulary (vocab_size {vocab})"
            )));
        }
        let batch = prompts.len();
        // The budget is the user's: it bounds the loop, never an allocation made up front.
        let mut generated = vec![Vec::with_capacity(config.max_new_tokens.min(256)); batch];
        if batch == 0 || config.max_new_tokens == 0 {
            return Ok(generated);
        }
        let device = self.device();
        let mut rngs: Vec<XorShiftRng> =
            (0..batch).map(|r| XorShiftRng::new(config.row_seed(r))).collect();
        let mut cache = self.new_cache();
        let mut done = vec![false; batch];

        let width = prompts.iter().map(Vec::len).max().expect("a prompt");
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let mut ids: Vec<i64> = Vec::with_capacity(batch * width);
        for prompt in prompts {
            ids.extend(std::iter::repeat_n(i64::from(pad_id), width - prompt.len()));
            ids.extend(prompt.iter().map(|&i| i64::from(i)));
        }
        let mut input = (ids, width, PaddingMask::left_padded(&lengths, width));
        loop {
            let (ids, n, mask) = input;
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, n]), &device);
            // The head runs on the last position only (the prompts' other logits are unused).
            let hidden = self.model.forward_padded(ids, mask, Some(&mut cache));
            let d = hidden.dims()[2];
            let last: Vec<f32> = self
                .logits(hidden.slice([0..batch, n - 1..n, 0..d]))
                .into_data()
                .iter::<f32>()
                .collect();
            for (r, logits) in last.chunks(vocab).enumerate() {
                if done[r] {
                    continue;
                }
                check_logits(logits)
                    .map_err(|e| in_row(e, &format!("row {r}, step {}", generated[r].len())))?;
                let token = sample_token(logits, config.temperature, config.top_p, &mut rngs[r]);
                generated[r].push(token);
                done[r] = config.eos_token_ids.contains(&token)
                    || generated[r].len() >= config.max_new_tokens;
            }
            on_step(&generated);
            if done.iter().all(|&d| d) {
                break;
            }
            // Stopped rows are fed a masked pad.
            let ids = (0..batch)
                .map(|r| i64::from(if done[r] { pad_id } else { *generated[r].last().unwrap() }))
                .collect();
            let flags = done.iter().map(|&d| !d).collect();
            input = (ids, 1, PaddingMask::new(batch, 1, flags));
        }
        Ok(generated)
    }
}

/// Prefixes an [`ModelError::InvalidInput`] message with `context`.
fn in_row(error: ModelError, context: &str) -> ModelError {
    match error {
        ModelError::InvalidInput(m) => ModelError::InvalidInput(format!("{context}: {m}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_uniform_enough() {
        let mut a = XorShiftRng::new(42);
        let mut b = XorShiftRng::new(42);
        let xs: Vec<f64> = (0..10_000).map(|_| a.next_f64()).collect();
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        assert_eq!(xs[..10], (0..10).map(|_| b.next_f64()).collect::<Vec<_>>()[..]);
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        assert_ne!(XorShiftRng::new(1).next_u64(), XorShiftRng::new(2).next_u64());
    }

    #[test]
    fn a_budget_past_the_context_window_is_refused_with_what_fits() {
        let config = GenerationConfig::greedy(100_000_000_000);
        let err = config.check_context(0, 2048).unwrap_err().to_string();
        assert!(err.contains("100000000000") && err.contains("2048"), "{err}");
        let err = GenerationConfig::greedy(60).check_context(10, 64).unwrap_err().to_string();
        assert!(err.contains("a prompt of 10 tokens") && err.contains("at most 54"), "{err}");
        GenerationConfig::greedy(54).check_context(10, 64).unwrap();
        assert!(GenerationConfig::greedy(1).check_context(70, 64).is_err());
    }

    #[test]
    fn top_p_restricts_to_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps tokens 0 and 1 only.
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let mut rng = XorShiftRng::new(3);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample_token(&logits, 1.0, 0.7, &mut rng) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[2] == 0 && seen[3] == 0, "{seen:?}");
        // Renormalised within the nucleus: 0.64 / 0.88 ≈ 0.73.
        let share = seen[0] as f64 / 2000.0;
        assert!((share - 0.73).abs() < 0.05, "{share}");
        // top_p = 1 reaches every token; top_p = 0 is greedy; temperature 0 is greedy.
        let mut all = [0usize; 4];
        for _ in 0..4000 {
            all[sample_token(&logits, 1.0, 1.0, &mut rng) as usize] += 1;
        }
        assert!(all.iter().all(|&c| c > 0), "{all:?}");
        assert_eq!(sample_token(&[0.0, 3.0, 3.0, 1.0], 1.0, 0.0, &mut rng), 1);
        assert_eq!(sample_token(&[0.0, 3.0, 3.0, 1.0], 0.0, 1.0, &mut rng), 1);
    }

    #[test]
    fn non_finite_logits_are_reported_and_never_panic_the_sort() {
        assert!(check_logits(&[0.0, 1.0, -3.0]).is_ok());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            match check_logits(&[0.0, bad, 1.0]) {
                Err(ModelError::InvalidInput(m)) => assert!(m.contains("token 1"), "{m}"),
                other => panic!("expected InvalidInput, got {other:?}"),
            }
        }
        // total_cmp orders NaN weights without panicking; the draw is still a valid index.
        let mut rng = XorShiftRng::new(1);
        let t = sample_token(&[0.0, f32::NAN, 1.0], 1.0, 1.0, &mut rng);
        assert!(t < 3);
    }
}
