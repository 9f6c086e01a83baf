//! `emloc generate`: text continuation with a Llama-family causal LM (Llama, TinyLlama, SmolLM,
//! Llama 3, Qwen2), greedy or sampled, printed on stdout.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Device;
use clap::Args;
use emloc_models::ModelError;
use emloc_models::llama::{GenerationConfig, LlamaForCausalLM, LlamaTokenizer};

/// Options of `emloc generate`.
#[derive(Args, Debug)]
#[command(about = "Continue PROMPT with a Llama-family model directory (config.json, \
                   model.safetensors or a sharded index, tokenizer.json) and print the text")]
pub struct GenerateArgs {
    /// Model directory: config.json, model.safetensors (or a sharded index), tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate (generation also stops at the config's eos ids).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (0..=1).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON (`prompt_ids`, `generated_ids`, `text`) instead of plain text.
    #[arg(long)]
    pub json: bool,
}

impl GenerateArgs {
    /// The generation settings these options describe, stopping at `eos_token_ids`.
    pub fn generation_config(&self, eos_token_ids: Vec<u32>) -> GenerationConfig {
        GenerationConfig::sampling(self.max_new_tokens, self.temperature, self.top_p, self.seed)
            .with_eos_token_ids(eos_token_ids)
    }
}

/// Loads the model and tokenizer, continues the prompt and prints the prompt with its
/// continuation (special tokens removed); timing goes to stderr.
///
/// # Errors
/// Loading errors of [`LlamaForCausalLM::load`] and [`LlamaTokenizer::from_dir`] (a missing
/// `tokenizer.json` included), and [`ModelError::InvalidInput`] for bad settings or a prompt
/// the tokenizer maps outside the vocabulary.
pub fn run(args: &GenerateArgs) -> emloc_models::Result<()> {
    let device = Device::flex();
    let tokenizer = LlamaTokenizer::from_dir(&args.model)?;
    let (model, config) = LlamaForCausalLM::load(&args.model, &device)?;
    let settings = args.generation_config(config.eos_token_ids());
    settings.validate()?;
    let prompt = tokenizer.encode(&args.prompt, true)?;
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput("the prompt encodes to no tokens".into()));
    }
    let start = Instant::now();
    let generated = model.generate(&prompt, &settings)?;
    let seconds = start.elapsed().as_secs_f64();
    let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
    let text = tokenizer.decode(&all, true)?;
    if args.json {
        let out = serde_json::json!({
            "prompt_ids": prompt,
            "generated_ids": generated,
            "text": text,
        });
        println!("{out}");
    } else {
        println!("{text}");
    }
    eprintln!(
        "{} prompt tokens, {} generated in {seconds:.2} s ({:.1} tokens/s)",
        prompt.len(),
        generated.len(),
        generated.len() as f64 / seconds.max(1e-9)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn fixture(name: &str) -> String {
        format!("{}/../models/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn options_map_to_generation_settings() {
        let cli = Cli::parse_from([
            "generate",
            "--model",
            "m",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--seed",
            "3",
        ]);
        let settings = cli.args.generation_config(vec![2]);
        assert_eq!(
            settings,
            GenerationConfig::sampling(5, 0.7, 0.9, 3).with_eos_token_ids(vec![2])
        );
        let defaults = Cli::parse_from(["generate", "--model", "m", "--prompt", "hi"]);
        assert_eq!(defaults.args.generation_config(vec![]), GenerationConfig::greedy(32));
    }

    #[test]
    fn runs_on_the_tiny_fixture_and_reports_a_missing_tokenizer() {
        let cli = Cli::parse_from([
            "generate",
            "--model",
            &fixture("tiny_llama"),
            "--prompt",
            "hello world",
            "--json",
        ]);
        run(&cli.args).unwrap();
        let cli = Cli::parse_from(["generate", "--model", &fixture("tiny_qwen2"), "--prompt", "x"]);
        assert!(matches!(run(&cli.args), Err(ModelError::MissingFile { .. })));
        let cli = Cli::parse_from([
            "generate",
            "--model",
            &fixture("tiny_llama"),
            "--prompt",
            "x",
            "--top-p",
            "2",
        ]);
        assert!(matches!(run(&cli.args), Err(ModelError::InvalidInput(_))));
    }
}
