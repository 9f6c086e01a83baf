//! `emloc`: the EMLoC pipeline from the command line.

#![warn(missing_docs)]

mod args;
mod bench;
mod bench_generate;
mod bench_memory;
mod bench_step;
mod bench_step_causal;
mod causal;
mod checkpoint;
mod data;
mod demo;
mod embed;
mod generate;
mod memory;
mod output;
mod peer;
mod plan;
mod progress;
mod run;
mod run_causal;
mod run_classification;
mod run_scale;
mod source;
mod stages;
mod training;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Errors of the command-line tool: every library error, plus messages of its own.
pub type CliResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Exact heap accounting for the per-phase memory reports.
#[global_allocator]
static ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

/// EMLoC: fine-tune a model within the memory it takes to run it.
#[derive(Parser, Debug)]
#[command(name = "emloc", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole pipeline (emulate → LoRA on the emulator → correct → merge) on a tiny
    /// transformer and a synthetic task, against LoRA on the full model, and print the table.
    Demo(demo::DemoArgs),
    /// Print sentence embeddings of TEXT... as JSON (one array of floats per text, in order)
    /// from a sentence-transformers BERT directory (e.g. all-MiniLM-L6-v2).
    Embed(embed::EmbedArgs),
    /// The main job: EMLoC on all-MiniLM-L6-v2 for MultiEmo sentiment classification (zero-shot,
    /// LoRA on the full model, EMLoC corrected and uncorrected, plain-SVD emulator, global rank
    /// allocation, layer drop and structured pruning at equal size), as a table; `--recipe
    /// gsm8k-retrieval` for GSM8K question → answer retrieval.
    Run(run::RunArgs),
    /// Calibrate on the downstream data and write the emulator (factors + JSON description).
    Emulate(stages::EmulateArgs),
    /// Train LoRA adapters (on an emulator, or on the model as the baseline); PEFT output.
    Finetune(stages::FinetuneArgs),
    /// Correct an adapter trained on an emulator for the original model.
    Correct(stages::CorrectArgs),
    /// Merge a PEFT adapter into a model directory's safetensors (host-side, no model built).
    Merge(stages::MergeArgs),
    /// Print metrics on the validation split as JSON: retrieval (Recall@1, Recall@5, MRR, loss)
    /// or classification (accuracy, macro-F1, loss) for encoders; loss, exact match and choice
    /// accuracy for decoders.
    Eval(stages::EvalArgs),
    /// Per-layer ranks for a parameter or memory budget: uniform ρ vs the global allocation by
    /// whitened spectrum, with fine-tuning memory estimates; writes a rules file.
    Plan(plan::PlanArgs),
    /// P6: time the closed-form correction per 100 M parameters of adapted layers.
    BenchCorrection(bench::BenchCorrectionArgs),
    /// P2: whitening + truncated SVD of one layer, exact vs randomized.
    BenchSvd(bench::BenchSvdArgs),
    /// P5: peak memory of fine-tuning on the emulator vs running the original (MiniLM, or a
    /// random ~1 B Llama), each phase in its own process.
    BenchMemory(bench_memory::BenchMemoryArgs),
    /// P3: forward + backward of one emulator layer with LoRA vs the dense layer with LoRA.
    BenchLayer(bench::BenchLayerArgs),
    /// The CPU training step of the main job (LoRA on MiniLM, MultiEmo classification) on the
    /// full model and on the emulator, against HF PEFT on PyTorch on the same batches; with a
    /// decoder as --model, the smollm2-bigbench recipe's step on the same token batches.
    BenchStep(bench_step::BenchStepArgs),
    /// Greedy decoding speed (prefill, per token) against HF transformers on the same file.
    BenchGenerate(bench_generate::BenchGenerateArgs),
    Generate(generate::GenerateArgs),
}

fn main() -> ExitCode {
    // The matches stay at hand: `emloc run` needs to know which options were given.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args).map_err(|e| e.to_string()),
        Command::Embed(args) => embed::run(&args).map_err(|e| e.to_string()),
        Command::Run(args) => {
            let run_matches =
                matches.subcommand_matches("run").expect("the `run` subcommand was parsed");
            run::run_recipe(&args, run_matches).map_err(|e| e.to_string())
        }
        Command::Emulate(args) => stages::emulate(&args).map_err(|e| e.to_string()),
        Command::Finetune(args) => stages::finetune(&args).map_err(|e| e.to_string()),
        Command::Correct(args) => stages::correct_adapter(&args).map_err(|e| e.to_string()),
        Command::Merge(args) => stages::merge(&args).map_err(|e| e.to_string()),
        Command::Eval(args) => stages::eval(&args).map_err(|e| e.to_string()),
        Command::Plan(args) => plan::plan(&args).map_err(|e| e.to_string()),
        Command::BenchCorrection(args) => bench::bench_correction(&args).map_err(|e| e.to_string()),
        Command::BenchSvd(args) => bench::bench_svd(&args).map_err(|e| e.to_string()),
        Command::BenchLayer(args) => bench::bench_layer(&args).map_err(|e| e.to_string()),
        Command::BenchStep(args) => bench_step::bench_step(&args).map_err(|e| e.to_string()),
        Command::BenchMemory(args) => bench_memory::bench_memory(&args).map_err(|e| e.to_string()),
        Command::BenchGenerate(args) => {
            bench_generate::bench_generate(&args).map_err(|e| e.to_string())
        }
        Command::Generate(args) => generate::run(&args).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
