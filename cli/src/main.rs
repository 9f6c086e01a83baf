//! `emloc`: the EMLoC pipeline from the command line.

mod demo;
mod embed;
mod generate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Generate(generate::GenerateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args).map_err(|e| e.to_string()),
        Command::Embed(args) => embed::run(&args).map_err(|e| e.to_string()),
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
