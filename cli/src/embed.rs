//! `emloc embed`: sentence embeddings from a BERT sentence encoder, as JSON on stdout.

use std::path::PathBuf;

use clap::Args;
use emloc_models::bert::SentenceEncoder;

/// Options of `emloc embed`.
#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Model directory: config.json, model.safetensors (or a sharded index), tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    device: crate::args::DeviceArgs,
    /// Texts to embed.
    #[arg(required = true)]
    texts: Vec<String>,
}

/// Loads the encoder and prints one JSON array of floats per text, in order.
pub fn run(args: &EmbedArgs) -> emloc_models::Result<()> {
    let encoder = SentenceEncoder::load(&args.model, &args.device.device()?)?;
    let model = args.device.cast(encoder.model.clone());
    let encoder = encoder.with_model(model);
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let embeddings = encoder.embed(&texts)?;
    println!("{}", serde_json::to_string(&embeddings).expect("floats serialize"));
    Ok(())
}
