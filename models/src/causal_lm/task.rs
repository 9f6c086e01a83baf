//! [`CausalLmTask`]: how examples become token sequences (prompt style, chat template,
//! truncation), right-padded batches, the completion-only loss, and likelihood scoring.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::chat::ChatTemplate;
use super::data::{Example, Message, Prompt};
use crate::error::{ModelError, Result};
use crate::llama::{LlamaForCausalLM, LlamaTokenizer};

/// How a prompt is turned into text.
///
/// With the `clap` feature it is a `clap::ValueEnum` (`chat`, `raw`; the help of each value is
/// its summary here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum PromptStyle {
    /// Through the model's chat template: a text prompt becomes one user message, the
    /// completion the assistant's reply (ended the way the template ends a turn). The default
    /// when the model has a chat template.
    #[default]
    Chat,
    /// The prompt text as is (with the tokenizer's special tokens, e.g. BOS), the completion
    /// right after it, then the end-of-sequence token.
    Raw,
}

/// A tokenized example: prompt ids, then the completion ids the loss is taken on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tokenized {
    /// Prompt ids (not trained on).
    pub prompt: Vec<u32>,
    /// Completion ids (the loss targets).
    pub completion: Vec<u32>,
}

impl Tokenized {
    /// Total length in tokens.
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    /// Whether there are no tokens at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A right-padded batch for the completion loss: position `t` of row `i` reads `inputs[i, t]`
/// and predicts `targets[i, t]`; only the listed `completion_positions` are scored.
#[derive(Debug, Clone)]
pub struct CausalBatch {
    /// Input ids `[batch, len]` (padded with the pad id; padding sits after every real token,
    /// so causal attention keeps it away from real positions).
    pub inputs: Tensor<2, Int>,
    /// Flat indices `i · len + t` of the scored positions `[n]`.
    pub completion_positions: Tensor<1, Int>,
    /// The token each scored position must predict `[n]`.
    pub completion_targets: Tensor<1, Int>,
    /// Which example (row) each scored position belongs to.
    pub rows: Vec<usize>,
    /// Real (non-padding) tokens in the batch.
    pub tokens: usize,
}

/// A decoder LM with its tokenizer and the way examples are formatted: everything a training
/// loop or an evaluation needs to turn [`Example`]s into tensors and losses. Works with any
/// [`LlamaForCausalLM`]: the original, or its emulator with LoRA adapters.
pub struct CausalLmTask {
    tokenizer: LlamaTokenizer,
    template: Option<ChatTemplate>,
    style: PromptStyle,
    max_seq_length: usize,
    eos_token_ids: Vec<u32>,
    pad_token_id: u32,
}

impl std::fmt::Debug for CausalLmTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLmTask")
            .field("tokenizer", &self.tokenizer)
            .field("style", &self.style)
            .field("max_seq_length", &self.max_seq_length)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish_non_exhaustive()
    }
}

impl CausalLmTask {
    /// A task for `tokenizer`, stopping generation at (and ending raw completions with the first
    /// of) `eos_token_ids`. The prompt style is [`PromptStyle::Chat`] when a `template` is given,
    /// [`PromptStyle::Raw`] otherwise; sequences are cut at 512 tokens.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] if `eos_token_ids` is empty.
    pub fn new(
        tokenizer: LlamaTokenizer,
        template: Option<ChatTemplate>,
        eos_token_ids: Vec<u32>,
    ) -> Result<Self> {
        let Some(&pad_token_id) = eos_token_ids.first() else {
            return Err(ModelError::InvalidInput(
                "a causal-LM task needs at least one end-of-sequence id".into(),
            ));
        };
        let style = if template.is_some() { PromptStyle::Chat } else { PromptStyle::Raw };
        Ok(Self { tokenizer, template, style, max_seq_length: 512, eos_token_ids, pad_token_id })
    }

    /// With this prompt style.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for [`PromptStyle::Chat`] without a chat template.
    pub fn with_style(mut self, style: PromptStyle) -> Result<Self> {
        if style == PromptStyle::Chat && self.template.is_none() {
            return Err(ModelError::InvalidInput(
                "prompt style `chat` needs a chat template, and the model has none".into(),
            ));
        }
        self.style = style;
        Ok(self)
    }

    /// With sequences (prompt + completion) cut to `max_seq_length` tokens.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] if it is below 2 (one prompt and one completion token).
    pub fn with_max_seq_length(mut self, max_seq_length: usize) -> Result<Self> {
        if max_seq_length < 2 {
            return Err(ModelError::InvalidInput(format!(
                "max_seq_length {max_seq_length} must be at least 2"
            )));
        }
        self.max_seq_length = max_seq_length;
        Ok(self)
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &LlamaTokenizer {
        &self.tokenizer
    }

    /// The prompt style.
    pub fn style(&self) -> PromptStyle {
        self.style
    }

    /// Ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The id padding is filled with (never scored).
    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    fn messages(prompt: &Prompt) -> Vec<Message> {
        match prompt {
            Prompt::Text(text) => vec![Message::new("user", text.clone())],
            Prompt::Chat(messages) => messages.clone(),
        }
    }

    /// The text the model sees before its completion.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for a chat prompt in raw style, or from the chat template.
    pub fn prompt_text(&self, prompt: &Prompt) -> Result<String> {
        match (self.style, prompt) {
            (PromptStyle::Raw, Prompt::Text(text)) => Ok(text.clone()),
            (PromptStyle::Raw, Prompt::Chat(_)) => Err(ModelError::InvalidInput(
                "a {\"messages\"} example needs the chat prompt style (and a chat template)".into(),
            )),
            (PromptStyle::Chat, prompt) => self.template().render(&Self::messages(prompt), true),
        }
    }

    fn template(&self) -> &ChatTemplate {
        self.template.as_ref().expect("chat style is only set with a template")
    }

    /// Prompt ids (the tokenizer's special tokens added in raw style; in chat style the
    /// template writes them, as transformers' `apply_chat_template` does).
    ///
    /// # Errors
    /// As [`prompt_text`](Self::prompt_text); tokenizer errors; [`ModelError::InvalidInput`] for
    /// an empty prompt.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = self.prompt_text(prompt)?;
        let ids = self.tokenizer.encode(&text, self.style == PromptStyle::Raw)?;
        if ids.is_empty() {
            return Err(ModelError::InvalidInput("the prompt encodes to no tokens".into()));
        }
        Ok(ids)
    }

    /// Tokenizes `prompt` followed by `completion`: in chat style the completion is the
    /// assistant's turn as the template renders it (end-of-turn tokens included), in raw style
    /// the completion text then the end-of-sequence id. Too long a sequence keeps the end of
    /// the prompt and the start of the completion (at least one prompt token).
    ///
    /// # Errors
    /// As [`encode_prompt`](Self::encode_prompt); [`ModelError::InvalidInput`] for a completion
    /// that encodes to no tokens.
    pub fn encode_completion(&self, prompt: &Prompt, completion: &str) -> Result<Tokenized> {
        let prompt_text = self.prompt_text(prompt)?;
        let mut prompt_ids = self.tokenizer.encode(&prompt_text, self.style == PromptStyle::Raw)?;
        let mut completion_ids = match self.style {
            PromptStyle::Raw => {
                let mut ids = self.tokenizer.encode(completion, false)?;
                ids.push(self.pad_token_id);
                ids
            }
            PromptStyle::Chat => {
                let mut messages = Self::messages(prompt);
                messages.push(Message::new("assistant", completion));
                let full = self.template().render(&messages, false)?;
                // The reply's text is what the full conversation adds to the generation prompt.
                let reply = full.strip_prefix(prompt_text.as_str()).ok_or_else(|| {
                    ModelError::InvalidInput("the chat template does not render the prompt as a prefix of the conversation".into())
                })?;
                self.tokenizer.encode(reply, false)?
            }
        };
        if prompt_ids.is_empty() || completion_ids.is_empty() {
            return Err(ModelError::InvalidInput(
                "an example's prompt or completion encodes to no tokens".into(),
            ));
        }
        let max = self.max_seq_length;
        completion_ids.truncate(max - 1);
        let keep = (max - completion_ids.len()).min(prompt_ids.len());
        prompt_ids.drain(..prompt_ids.len() - keep);
        Ok(Tokenized { prompt: prompt_ids, completion: completion_ids })
    }

    /// Tokenizes an example with its training target.
    ///
    /// # Errors
    /// As [`encode_completion`](Self::encode_completion).
    pub fn encode(&self, example: &Example) -> Result<Tokenized> {
        self.encode_completion(&example.prompt, example.target())
    }

    /// Right-pads `items` into a [`CausalBatch`] on `device`.
    ///
    /// # Panics
    /// If `items` is empty or an item has no prompt or no completion token.
    pub fn batch(&self, items: &[Tokenized], device: &Device) -> CausalBatch {
        assert!(!items.is_empty(), "CausalLmTask::batch: no items");
        let len = items.iter().map(|t| t.len() - 1).max().expect("non-empty");
        let mut inputs = vec![self.pad_token_id as i64; items.len() * len];
        let (mut positions, mut targets, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        let mut tokens = 0;
        for (row, item) in items.iter().enumerate() {
            assert!(
                !item.prompt.is_empty() && !item.completion.is_empty(),
                "CausalLmTask::batch: empty prompt or completion"
            );
            let sequence: Vec<u32> = item.prompt.iter().chain(&item.completion).copied().collect();
            tokens += sequence.len();
            for (t, &id) in sequence[..sequence.len() - 1].iter().enumerate() {
                inputs[row * len + t] = id as i64;
            }
            // Position t predicts token t + 1; the completion starts at index prompt.len().
            for t in item.prompt.len() - 1..sequence.len() - 1 {
                positions.push((row * len + t) as i64);
                targets.push(sequence[t + 1] as i64);
                rows.push(row);
            }
        }
        let n = positions.len();
        CausalBatch {
            inputs: Tensor::from_data(TensorData::new(inputs, [items.len(), len]), device),
            completion_positions: Tensor::from_data(TensorData::new(positions, [n]), device),
            completion_targets: Tensor::from_data(TensorData::new(targets, [n]), device),
            rows,
            tokens,
        }
    }
}

/// Negative log-likelihood of every scored token of `batch` under `model`: logits are computed
/// only at the scored positions (the LM head, 49 k wide for SmolLM2, is the largest product).
///
/// # Shapes
/// - output: `[n]` (one value per scored position, in `batch.rows` order)
///
/// # Panics
/// As [`LlamaForCausalLM::forward`] (e.g. an id outside the vocabulary on some backends).
pub fn token_nll(model: &LlamaForCausalLM, batch: &CausalBatch) -> Tensor<1> {
    let hidden = model.model.forward(batch.inputs.clone(), None);
    let [b, s, d] = hidden.dims();
    let n = batch.rows.len();
    let scored = hidden.reshape([b * s, d]).select(0, batch.completion_positions.clone());
    let logits = model.logits(scored.reshape([1, n, d])).reshape([n, model.vocab_size()]);
    // In f32 whatever the frozen weights' dtype (`emloc::cast_frozen`).
    let log_probs = log_softmax(logits.cast(FloatDType::F32), 1);
    log_probs.gather(1, batch.completion_targets.clone().reshape([n, 1])).reshape([n]).neg()
}

/// The completion-only loss: mean negative log-likelihood over the scored (completion) tokens
/// of `batch`, what supervised fine-tuning minimises.
///
/// # Shapes
/// - output: `[1]`
///
/// # Panics
/// As [`token_nll`].
pub fn completion_loss(model: &LlamaForCausalLM, batch: &CausalBatch) -> Tensor<1> {
    token_nll(model, batch).mean()
}

/// Sum of the completion tokens' negative log-likelihoods of every row of `batch` (host side,
/// f64), and their count per row.
///
/// # Errors
/// [`ModelError::InvalidInput`] if a value is NaN or infinite (a diverged model).
pub fn row_nll(
    model: &LlamaForCausalLM,
    batch: &CausalBatch,
    rows: usize,
) -> Result<Vec<(f64, usize)>> {
    let values = token_nll(model, batch)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    let mut sums = vec![(0.0f64, 0usize); rows];
    for (&row, &v) in batch.rows.iter().zip(&values) {
        if !v.is_finite() {
            return Err(ModelError::InvalidInput(format!(
                "the model's log-likelihood is {v} on example {row} of a batch"
            )));
        }
        sums[row].0 += f64::from(v);
        sums[row].1 += 1;
    }
    Ok(sums)
}
