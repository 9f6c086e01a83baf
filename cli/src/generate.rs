//! `emloc generate`: text continuation with a Llama-family causal LM (Llama, TinyLlama, SmolLM,
//! Llama 3, Qwen2; HF directory or GGUF file), greedy or sampled, raw or through the model's chat
//! template; the completion is printed on stdout.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use emloc_models::causal_lm::{Prompt, PromptStyle, load_causal_lm, read_config};
use emloc_models::llama::GenerationConfig;

/// Options of `emloc generate`.
#[derive(Args, Debug)]
#[command(about = "Continue PROMPT with a Llama-family model (HF directory or .gguf file) and \
                   print the completion")]
pub struct GenerateArgs {
    /// Model directory (config.json, model.safetensors or a sharded index, tokenizer.json) or
    /// a `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub device: crate::args::DeviceArgs,
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
    /// Send PROMPT as a user message through the model's chat template (the reply is printed).
    #[arg(long)]
    pub chat: bool,
}

impl GenerateArgs {
    /// The generation settings these options describe, stopping at `eos_token_ids`.
    pub fn generation_config(&self, eos_token_ids: Vec<u32>) -> GenerationConfig {
        GenerationConfig::sampling(self.max_new_tokens, self.temperature, self.top_p, self.seed)
            .with_eos_token_ids(eos_token_ids)
    }
}

/// Loads the model and tokenizer, continues the prompt and prints the completion (special
/// tokens removed); timing goes to stderr. Generation stops at the model's end-of-sequence ids
/// and at its chat template's end-of-turn token.
///
/// # Errors
/// Loading errors of [`load_causal_lm`] (a missing `tokenizer.json` included), and
/// [`ModelError::InvalidInput`](emloc_models::ModelError::InvalidInput) for bad settings (a
/// token budget past the model's context window included, refused before the weights are
/// read), `--chat` without a chat template, or a prompt the tokenizer maps outside the
/// vocabulary.
pub fn run(args: &GenerateArgs) -> emloc_models::Result<()> {
    // Settings are checked against the config alone, before the weights are read.
    let context = read_config(&args.model)?.max_position_embeddings;
    args.generation_config(Vec::new()).validate()?;
    args.generation_config(Vec::new()).check_context(0, context)?;
    let mut lm = load_causal_lm(&args.model, &args.device.device()?, &BTreeSet::new())?;
    lm.model = args.device.cast(lm.model);
    let settings = args.generation_config(lm.task.eos_token_ids().to_vec());
    let style = if args.chat { PromptStyle::Chat } else { PromptStyle::Raw };
    let task = lm.task.with_style(style)?;
    let prompt = task.encode_prompt(&Prompt::Text(args.prompt.clone()))?;
    settings.check_context(prompt.len(), context)?;
    let start = Instant::now();
    let generated = lm.model.generate(&prompt, &settings)?;
    let seconds = start.elapsed().as_secs_f64();
    let text = task.tokenizer().decode(&generated, true)?;
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
    use emloc_models::ModelError;

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

    #[test]
    fn a_token_budget_past_the_context_window_is_refused_not_allocated() {
        let run_with = |budget: &str, prompt: &str| {
            let cli = Cli::parse_from([
                "generate",
                "--model",
                &fixture("tiny_llama"),
                "--prompt",
                prompt,
                "--max-new-tokens",
                budget,
            ]);
            run(&cli.args)
        };
        // Before the fix this asked the allocator for 400 GB and aborted the process.
        let Err(ModelError::InvalidInput(message)) = run_with("100000000000", "x") else {
            panic!("an oversized budget must be refused");
        };
        assert!(message.contains("context window of 64 tokens"), "{message}");
        // Within the window alone, but not with the prompt: refused after tokenizing.
        let Err(ModelError::InvalidInput(message)) = run_with("63", "hello world hello") else {
            panic!("prompt + budget past the window must be refused");
        };
        assert!(message.contains("a prompt of"), "{message}");
    }
}
