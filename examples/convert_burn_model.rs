//! Converts a Burn model into an EMLoC emulator in one call.
//!
//! The model below is ordinary Burn code. Written with Burn's modules its imports read
//!
//! ```text
//! use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig,
//!     generate_autoregressive_mask};
//! use burn::nn::transformer::{PositionWiseFeedForward, PositionWiseFeedForwardConfig};
//! use burn::nn::{Linear, LinearConfig, SwiGlu, SwiGluConfig};
//! ```
//!
//! and `emloc::emulate` would find no layer to convert: those modules hard-code
//! `burn::nn::Linear`. Swapping the imports for `emloc::nn`'s drop-ins (same configs, fields,
//! forward signatures and record layout, so existing checkpoints still load) is the only change;
//! the struct, its `new` and its `forward` are untouched.
//!
//! Run with `cargo run --example convert_burn_model`.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Distribution, Tensor};
use emloc::nn::attention::{
    MhaInput, MultiHeadAttention, MultiHeadAttentionConfig, generate_autoregressive_mask,
};
use emloc::nn::{
    Linear, LinearConfig, PositionWiseFeedForward, PositionWiseFeedForwardConfig, SwiGlu,
    SwiGluConfig,
};
use emloc::{EmulatorConfig, emulate};

/// One pre-norm decoder layer: causal self-attention, then a SwiGLU gate and a feed-forward
/// block.
#[derive(Module, Debug)]
struct DecoderLayer {
    norm_attn: LayerNorm,
    attn: MultiHeadAttention,
    norm_ffn: LayerNorm,
    gate: SwiGlu,
    ffn: PositionWiseFeedForward,
}

/// A small decoder over `[batch, seq, d_model]` features with a linear output head.
#[derive(Module, Debug)]
struct Decoder {
    layers: Vec<DecoderLayer>,
    head: Linear,
}

impl Decoder {
    fn new(d_model: usize, n_heads: usize, n_layers: usize, d_out: usize, device: &Device) -> Self {
        let layer = || DecoderLayer {
            norm_attn: LayerNormConfig::new(d_model).init(device),
            attn: MultiHeadAttentionConfig::new(d_model, n_heads).init(device),
            norm_ffn: LayerNormConfig::new(d_model).init(device),
            gate: SwiGluConfig::new(d_model, d_model).init(device),
            ffn: PositionWiseFeedForwardConfig::new(d_model, 4 * d_model).init(device),
        };
        Self {
            layers: (0..n_layers).map(|_| layer()).collect(),
            head: LinearConfig::new(d_model, d_out).init(device),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let mask = generate_autoregressive_mask(batch, seq, &x.device());
        let mut h = x;
        for layer in &self.layers {
            let a = layer.norm_attn.forward(h.clone());
            h = h + layer.attn.forward(MhaInput::self_attn(a).mask_attn(mask.clone())).context;
            let f = layer.gate.forward(layer.norm_ffn.forward(h.clone()));
            h = h + layer.ffn.forward(f);
        }
        self.head.forward(h)
    }
}

fn main() -> emloc::Result<()> {
    let device = Device::flex();
    device.seed(0);
    let model = Decoder::new(64, 4, 2, 16, &device);
    // Random features with structure, as real activations have: 16 latent directions mixed into
    // 64 features, plus a little isotropic noise.
    let mix = Tensor::<2>::random([16, 64], Distribution::Normal(0.0, 1.0), &device);
    let random = |batch| {
        let z = Tensor::<3>::random([batch, 32, 16], Distribution::Normal(0.0, 1.0), &device);
        z.matmul(mix.clone().unsqueeze())
            + Tensor::random([batch, 32, 64], Distribution::Normal(0.0, 0.05), &device)
    };
    let calibration: Vec<Tensor<3>> = (0..8).map(|_| random(4)).collect();

    // The one call: calibrate on the batches, replace every linear layer (including the ones
    // inside attention, SwiGLU and the feed-forward blocks) by a rank-ρ·min(d_in, d_out) factored
    // emulator layer.
    let (emulator, report) = emulate(
        model.clone(),
        calibration,
        |m: &Decoder, x| {
            m.forward(x);
        },
        &EmulatorConfig::all_layers(0.4),
    )?;

    println!(
        "{:<28} {:>5} {:>5} {:>5} {:>9} {:>9} {:>9}",
        "layer", "d_in", "d_out", "rank", "params", "kept", "rel.err"
    );
    for l in &report.layers {
        println!(
            "{:<28} {:>5} {:>5} {:>5} {:>9} {:>9} {:>9.4}",
            l.path,
            l.d_in,
            l.d_out,
            l.rank,
            l.params_original,
            l.params_kept,
            l.relative_whitened_error
        );
    }
    println!(
        "{} layers emulated ({} left dense): {} → {} parameters ({:.1}%); calibration {} batches \
         in {:.2} s, construction {:.2} s",
        report.layers.len(),
        report.dense_layers.len(),
        report.params_original(),
        report.params_kept(),
        100.0 * report.params_kept() as f64 / report.params_original() as f64,
        report.calibration_batches,
        report.calibration_seconds,
        report.construction_seconds,
    );
    println!("whole model: {} → {} parameters", model.num_params(), emulator.num_params());

    let x = random(2);
    let (original, emulated) = (model.forward(x.clone()), emulator.forward(x));
    let scale = original.clone().abs().max().into_scalar::<f32>();
    let diff = (emulated - original).abs().max().into_scalar::<f32>();
    println!("held-out output: max |emulator − original| / max |original| = {:.3}", diff / scale);
    Ok(())
}
