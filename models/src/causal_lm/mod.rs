//! Supervised fine-tuning of decoder LMs ([`LlamaForCausalLM`](crate::llama::LlamaForCausalLM)):
//! the data formats ([`parse_jsonl`]), chat templates ([`ChatTemplate`]), a [`CausalLmTask`]
//! that turns examples into right-padded batches and the completion-only loss, a ready
//! training loop ([`finetune`]) and the evaluation ([`evaluate`]: loss, exact match, choice
//! accuracy).
//!
//! Your own Burn training loop needs only [`CausalLmTask::encode`], [`CausalLmTask::batch`] and
//! [`completion_loss`]; it trains whatever is trainable, e.g. LoRA adapters on an emulator:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use burn::module::Module;
//! use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
//! use burn::tensor::Device;
//! use emloc_models::causal_lm::{CausalLmTask, Example, Prompt, completion_loss};
//! use emloc_models::llama::{LlamaForCausalLM, LlamaTokenizer};
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny_llama");
//! let device = Device::flex();
//! let (model, config) = LlamaForCausalLM::load(dir, &device)?;
//! let task = CausalLmTask::new(LlamaTokenizer::from_dir(dir)?, None, config.eos_token_ids())?;
//! let lora = emloc::LoraConfig::new(4).with_target_modules(vec!["q_proj".into(), "v_proj".into()]);
//! let (model, _) = emloc::attach_new_adapter(model, &lora)?;
//!
//! let example = Example { prompt: Prompt::Text("the cat".into()), targets: vec!["sat on the mat".into()], choices: None };
//! let batch = task.batch(&[task.encode(&example)?], &device.clone().autodiff());
//! let mut model = model.train();
//! let mut optim = AdamWConfig::new().init();
//! let loss = completion_loss(&model, &batch);
//! let grads = GradientsParams::from_grads(loss.backward(), &model);
//! model = optim.step(1e-3, model, grads);
//!
//! let prompt = task.encode_prompt(&example.prompt)?;
//! let ids = model.valid().generate(&prompt, &emloc_models::llama::GenerationConfig::greedy(4))?;
//! println!("{}", task.tokenizer().decode(&ids, true)?);
//! # Ok(()) }
//! ```

mod chat;
mod checkpointed;
mod data;
mod eval;
mod load;
mod streaming;
mod task;
mod train;

pub use chat::ChatTemplate;
pub use checkpointed::{HEAD_CHUNK_POSITIONS, completion_gradients_checkpointed};
pub use data::{
    Choices, Example, FORMATS, Message, Prompt, is_causal_lm_record, parse_jsonl, parse_record,
    read_jsonl,
};
pub use eval::{CausalLmMetrics, EvalConfig, answer_text, evaluate};
pub use load::{CausalLm, is_gguf, load_causal_lm};
pub use streaming::{
    StreamingProgress, emulate_streaming, load_weights_skipping, parameter_paths, read_config,
};
pub use task::{
    CausalBatch, CausalLmTask, PromptStyle, Tokenized, completion_loss, row_nll, token_nll,
};
pub use train::{finetune, tokenize_all};
