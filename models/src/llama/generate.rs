//! Text generation with a [`LlamaForCausalLM`]: greedy decoding and temperature / nucleus
//! (top-p) sampling from a seeded [`XorShiftRng`], so sampled outputs are reproducible.
//!
//! The prompt is run once (filling the [`KvCache`](super::KvCache)), then one token per step.
//! Sampling happens on the host in f64 over the last position's logits.

use burn::tensor::{Int, Tensor, TensorData};

use super::LlamaForCausalLM;
use super::model::check_ids;
use crate::rng::XorShiftRng;
use crate::error::{ModelError, Result};

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
    /// Seed of the sampling generator.
    pub seed: u64,
    /// Generation stops after any of these ids (it is included in the output).
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

/// Picks the next token from one position's logits: [`argmax`] when `temperature` is 0,
/// otherwise a draw from `softmax(logits / temperature)` restricted to the top-`top_p` nucleus
/// (most likely tokens first, ties by lower id; the nucleus always holds the most likely
/// token) and renormalised.
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
    order
        .sort_by(|&a, &b| weights[b].partial_cmp(&weights[a]).unwrap_or(std::cmp::Ordering::Equal));
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
    /// `config.eos_token_ids`.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for an empty prompt, an id outside the vocabulary or an
    /// invalid [`GenerationConfig`].
    pub fn generate(&self, prompt: &[u32], config: &GenerationConfig) -> Result<Vec<u32>> {
        config.validate()?;
        if prompt.is_empty() {
            return Err(ModelError::InvalidInput("empty prompt".into()));
        }
        check_ids(prompt, self.vocab_size())?;
        let device = self.device();
        let mut rng = XorShiftRng::new(config.seed);
        let mut cache = self.new_cache();
        let mut generated = Vec::with_capacity(config.max_new_tokens);
        let mut input = prompt.to_vec();
        while generated.len() < config.max_new_tokens {
            let ids: Vec<i64> = input.iter().map(|&i| i as i64).collect();
            let n = ids.len();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
            // The head runs on the last position only (the prompt's other logits are unused).
            let hidden = self.model.forward(ids, Some(&mut cache));
            let d = hidden.dims()[2];
            let last: Vec<f32> = self
                .logits(hidden.slice([0..1, n - 1..n, 0..d]))
                .into_data()
                .iter::<f32>()
                .collect();
            let token = sample_token(&last, config.temperature, config.top_p, &mut rng);
            generated.push(token);
            if config.eos_token_ids.contains(&token) {
                break;
            }
            input = vec![token];
        }
        Ok(generated)
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
}
