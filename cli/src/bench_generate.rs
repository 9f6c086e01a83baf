//! `emloc bench-generate`: greedy decoding speed (prefill and per token, KV cache) of a
//! Llama-family model against HF transformers on the same file, prompt ids and thread count.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use emloc_models::causal_lm::{Prompt, PromptStyle, load_causal_lm};
use emloc_models::llama::{GenerationConfig, LlamaForCausalLM};
use serde::{Deserialize, Serialize};

use crate::CliResult;
use crate::peer::{PeerScript, run_peer};

/// The transformers peer, shipped inside the binary.
const PEER: PeerScript = PeerScript {
    name: "generate_peer.py",
    text: include_str!("../../benches/peers/generate_peer.py"),
    what: "the transformers peer",
    needs: "torch transformers gguf",
};

/// Options of `emloc bench-generate`.
#[derive(Args, Debug)]
pub struct BenchGenerateArgs {
    /// Model: a `.gguf` file (what the peer, transformers with `gguf_file=`, also reads) or an
    /// HF directory.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub device: crate::args::DeviceArgs,
    /// The prompt, tokenised raw (no chat template).
    #[arg(long, default_value = "def fibonacci(n):")]
    pub prompt: String,
    /// Tokens to generate (no early stop at end-of-sequence ids, so both sides do the same work).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Runs of each side; the median run is reported (the first is a warm-up when there are
    /// more than one).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// PyTorch's thread count (emloc uses rayon's, `RAYON_NUM_THREADS` or every core).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Python interpreter with torch, transformers and gguf.
    #[arg(long, default_value = "python3")]
    pub python: PathBuf,
    /// Time emloc only.
    #[arg(long)]
    pub no_peer: bool,
}

/// One side's timings: prefill (the prompt's forward pass and the first token) and the mean of
/// the other tokens, in seconds, with the ids generated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecodeTiming {
    /// Prompt's forward pass plus the first token.
    pub prefill_seconds: f64,
    /// Mean seconds per later token.
    pub per_token_seconds: f64,
    /// The generated ids.
    pub ids: Vec<u32>,
}

impl DecodeTiming {
    fn tokens_per_second(&self) -> f64 {
        1.0 / self.per_token_seconds.max(1e-12)
    }
}

/// What the peer is asked to do.
#[derive(Serialize)]
struct PeerSpec<'a> {
    model: String,
    prompt_ids: &'a [u32],
    new_tokens: usize,
    runs: usize,
    threads: usize,
}

/// What the peer answers.
#[derive(Deserialize)]
struct PeerResult {
    runs: Vec<DecodeTiming>,
    versions: serde_json::Value,
}

/// The run with the median per-token time, the first run left out when there are several.
fn median_run(runs: &[DecodeTiming]) -> DecodeTiming {
    let mut kept: Vec<&DecodeTiming> = runs.iter().skip(usize::from(runs.len() > 1)).collect();
    kept.sort_by(|a, b| a.per_token_seconds.total_cmp(&b.per_token_seconds));
    kept[kept.len() / 2].clone()
}

/// `runs` timed greedy generations of `settings.max_new_tokens` (≥ 2) tokens after `prompt`.
fn time_emloc(
    model: &LlamaForCausalLM,
    prompt: &[u32],
    settings: &GenerationConfig,
    runs: usize,
) -> CliResult<Vec<DecodeTiming>> {
    let prompts = [prompt.to_vec()];
    let mut timings = Vec::new();
    for run in 0..runs {
        let started = Instant::now();
        let mut prefill = None;
        let ids = model.generate_batch_with(&prompts, settings, 0, |_| {
            prefill.get_or_insert_with(|| started.elapsed().as_secs_f64());
        })?;
        let total = started.elapsed().as_secs_f64();
        let prefill = prefill.expect("at least one step");
        let timing = DecodeTiming {
            prefill_seconds: prefill,
            per_token_seconds: (total - prefill) / (settings.max_new_tokens - 1) as f64,
            ids: ids.into_iter().next().expect("one row"),
        };
        eprintln!(
            "emloc run {}: prefill {:.3} s, {:.1} tokens/s",
            run + 1,
            timing.prefill_seconds,
            timing.tokens_per_second()
        );
        timings.push(timing);
    }
    Ok(timings)
}

/// Times emloc's greedy decoding, then the peer's, and prints both and their ratio.
///
/// # Errors
/// Bad options (checked before loading), loading errors, a failing peer (its stderr included).
pub fn bench_generate(args: &BenchGenerateArgs) -> CliResult<()> {
    if args.new_tokens < 2 || args.runs == 0 || args.threads == 0 {
        return Err("--new-tokens must be at least 2, --runs and --threads at least 1".into());
    }
    // No stop ids: both sides generate exactly `new_tokens`.
    let settings = GenerationConfig::greedy(args.new_tokens);
    let context = emloc_models::causal_lm::read_config(&args.model)?.max_position_embeddings;
    settings.check_context(0, context)?;
    let mut lm = load_causal_lm(&args.model, &args.device.device()?, &BTreeSet::new())?;
    lm.model = args.device.cast(lm.model);
    let task = lm.task.with_style(PromptStyle::Raw)?;
    let prompt = task.encode_prompt(&Prompt::Text(args.prompt.clone()))?;
    settings.check_context(prompt.len(), context)?;
    let runs = time_emloc(&lm.model, &prompt, &settings, args.runs)?;
    let ours = median_run(&runs);
    println!(
        "greedy decoding, {} ({} prompt tokens, {} new), median of {} runs",
        args.model.display(),
        prompt.len(),
        args.new_tokens,
        args.runs
    );
    println!("| side | prefill s | per token ms | tokens/s | × transformers |");
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, t: &DecodeTiming, ratio: &str| {
        println!(
            "| {name} | {:.3} | {:.1} | {:.2} | {ratio} |",
            t.prefill_seconds,
            1e3 * t.per_token_seconds,
            t.tokens_per_second()
        );
    };
    if args.no_peer {
        row("emloc", &ours, "-");
        return Ok(());
    }
    let model =
        std::fs::canonicalize(&args.model).map_err(|e| format!("{}: {e}", args.model.display()))?;
    let spec = PeerSpec {
        model: model.display().to_string(),
        prompt_ids: &prompt,
        new_tokens: args.new_tokens,
        runs: args.runs,
        threads: args.threads,
    };
    let peer: PeerResult = run_peer(&args.python, &PEER, &spec)?;
    let theirs = median_run(&peer.runs);
    row("emloc", &ours, &format!("{:.2}", ours.tokens_per_second() / theirs.tokens_per_second()));
    row("transformers", &theirs, "1.00");
    let agree = ours.ids.iter().zip(&theirs.ids).take_while(|(a, b)| a == b).count();
    println!(
        "the two sides' greedy ids agree on the first {agree} of {} tokens; peer: {}",
        args.new_tokens, peer.versions
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(per_token: f64) -> DecodeTiming {
        DecodeTiming { prefill_seconds: 0.0, per_token_seconds: per_token, ids: Vec::new() }
    }

    #[test]
    fn the_median_leaves_the_warm_up_run_out() {
        let runs: Vec<_> = [9.0, 1.0, 3.0, 2.0].map(timing).to_vec();
        assert_eq!(median_run(&runs).per_token_seconds, 2.0);
        assert_eq!(median_run(&[timing(5.0)]).per_token_seconds, 5.0);
    }
}
