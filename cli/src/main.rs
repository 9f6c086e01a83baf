//! `emloc`: the EMLoC pipeline from the command line.

mod demo;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
