//! A tiny pre-LN transformer encoder and a synthetic regression task, for tests, examples and
//! the demo pipeline: small enough to train in seconds on a CPU, structured like the real models
//! (attention `query`/`key`/`value`/`output` and MLP `up`/`down` projections, an output head).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use emloc::nn::{Linear, LinearConfig};
use emloc::{LoraConfig, attach_new_adapter};

/// Sizes of a [`TinyTransformer`].
#[derive(Config, Debug)]
pub struct TinyTransformerConfig {
    /// Vocabulary size.
    #[config(default = 64)]
    pub vocab_size: usize,
    /// Longest input sequence.
    #[config(default = 16)]
    pub max_len: usize,
    /// Model width.
    #[config(default = 32)]
    pub d_model: usize,
    /// MLP hidden width.
    #[config(default = 64)]
    pub d_ff: usize,
    /// Number of blocks.
    #[config(default = 2)]
    pub n_layers: usize,
    /// Outputs of the regression head.
    #[config(default = 8)]
    pub n_outputs: usize,
}

/// One pre-LN block: single-head self-attention and a GELU MLP.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention.
    pub norm1: LayerNorm,
    /// Query projection.
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
    /// Attention output projection.
    pub output: Linear,
    /// Norm before the MLP.
    pub norm2: LayerNorm,
    /// MLP up projection.
    pub up: Linear,
    /// MLP down projection.
    pub down: Linear,
}

impl Block {
    /// # Shapes
    /// - input and output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let d = x.dims()[2];
        let h = self.norm1.forward(x.clone());
        let q = self.query.forward(h.clone());
        let k = self.key.forward(h.clone());
        let v = self.value.forward(h);
        let scores = q.matmul(k.swap_dims(1, 2)).div_scalar((d as f64).sqrt());
        let attended = softmax(scores, 2).matmul(v);
        let x = x + self.output.forward(attended);
        let h = self.norm2.forward(x.clone());
        x + self.down.forward(gelu(self.up.forward(h)))
    }
}

/// Token embedding + learned positions, `n_layers` blocks, mean pooling and a linear head.
#[derive(Module, Debug)]
pub struct TinyTransformer {
    /// Token embeddings.
    pub embed: Embedding,
    /// Learned positional embeddings `[max_len, d_model]`.
    pub positions: Param<Tensor<2>>,
    /// The blocks.
    pub layers: Vec<Block>,
    /// Final norm.
    pub norm: LayerNorm,
    /// Regression head (kept dense by the default emulator rules).
    pub head: Linear,
}

impl TinyTransformerConfig {
    /// Builds the model with random weights on `device`.
    pub fn init(&self, device: &Device) -> TinyTransformer {
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let (d, f) = (self.d_model, self.d_ff);
        TinyTransformer {
            embed: EmbeddingConfig::new(self.vocab_size, d).init(device),
            positions: Param::from_tensor(Tensor::random(
                [self.max_len, d],
                Distribution::Normal(0.0, 0.5),
                device,
            )),
            layers: (0..self.n_layers)
                .map(|_| Block {
                    norm1: LayerNormConfig::new(d).init(device),
                    query: linear(d, d),
                    key: linear(d, d),
                    value: linear(d, d),
                    output: linear(d, d),
                    norm2: LayerNormConfig::new(d).init(device),
                    up: linear(d, f),
                    down: linear(f, d),
                })
                .collect(),
            norm: LayerNormConfig::new(d).init(device),
            head: linear(d, self.n_outputs),
        }
    }
}

impl TinyTransformer {
    /// # Shapes
    /// - tokens: `[batch, seq]` with `seq <= max_len`
    /// - output: `[batch, n_outputs]`
    ///
    /// # Panics
    /// If `seq > max_len`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [_, seq] = tokens.dims();
        let positions = self.positions.val().narrow(0, 0, seq).unsqueeze::<3>();
        let mut x = self.embed.forward(tokens) + positions;
        for layer in &self.layers {
            x = layer.forward(x);
        }
        let pooled = self.norm.forward(x).mean_dim(1).squeeze_dim::<2>(1);
        self.head.forward(pooled)
    }
}

/// A synthetic fine-tuning task: regress the outputs of a *teacher*, the same network with a
/// planted low-rank change in every block's `value` and `up` projections (what a fine-tune
/// would learn). Inputs are token sequences drawn from a skewed (Zipf-like) distribution, so
/// activations are anisotropic like real ones.
#[derive(Debug, Clone)]
pub struct SyntheticTask {
    /// Sequence length.
    pub seq_len: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Token frequency skew: token `t` is drawn with probability ∝ roughly `1 / (t + 1)^skew`
    /// (0 = uniform).
    pub skew: f64,
    teacher: TinyTransformer,
}

/// One batch: tokens `[batch, seq]` and targets `[batch, n_outputs]`.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input tokens.
    pub tokens: Tensor<2, Int>,
    /// Regression targets.
    pub targets: Tensor<2>,
}

impl SyntheticTask {
    /// Builds the teacher from `base` by adding `strength · u vᵀ` (rank `rank`) to every block's
    /// `value` and `up` weights.
    pub fn new(base: &TinyTransformer, rank: usize, strength: f64, seq_len: usize) -> Self {
        let mut teacher = base.clone();
        for block in &mut teacher.layers {
            for layer in [&mut block.value, &mut block.up] {
                let [d_in, d_out] = layer.weight.val().dims();
                let device = layer.weight.val().device();
                let u = Tensor::<2>::random([d_in, rank], Distribution::Normal(0.0, 1.0), &device);
                let v = Tensor::<2>::random([rank, d_out], Distribution::Normal(0.0, 1.0), &device);
                let delta = u.matmul(v).mul_scalar(strength / (d_in as f64).sqrt());
                layer.weight = layer.weight.clone().map(|w| w + delta);
            }
        }
        let vocab_size = base.embed.weight.val().dims()[0];
        Self { seq_len, vocab_size, skew: 1.0, teacher }
    }

    /// The same task with token skew `skew` (see [`skew`](Self::skew)).
    pub fn with_skew(mut self, skew: f64) -> Self {
        self.skew = skew;
        self
    }

    /// `batch` sequences from seed `seed` (deterministic), with the teacher's outputs as targets.
    pub fn batch(&self, batch: usize, seed: u64, device: &Device) -> Batch {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let tokens: Vec<i64> = (0..batch * self.seq_len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                let token = if self.skew == 0.0 {
                    u * self.vocab_size as f64
                } else {
                    // Inverse CDF of a density ∝ (t + 1)^-skew on [0, vocab): low ids dominate.
                    let n = self.vocab_size as f64 + 1.0;
                    if (self.skew - 1.0).abs() < 1e-12 {
                        n.powf(u) - 1.0
                    } else {
                        let e = 1.0 - self.skew;
                        (1.0 + u * (n.powf(e) - 1.0)).powf(1.0 / e) - 1.0
                    }
                };
                (token.floor() as i64).clamp(0, self.vocab_size as i64 - 1)
            })
            .collect();
        let tokens =
            Tensor::<2, Int>::from_data(TensorData::new(tokens, [batch, self.seq_len]), device);
        let targets = self.teacher.forward(tokens.clone()).detach();
        Batch { tokens, targets }
    }
}

/// Mean squared error, averaged over every element.
pub fn mse(prediction: Tensor<2>, target: Tensor<2>) -> Tensor<1> {
    (prediction - target).powf_scalar(2.0).mean()
}

impl SyntheticTask {
    /// Held-out MSE of `model` over `batches` batches of 64 sequences; the seeds (from 50 000)
    /// never overlap the training or calibration seeds used by [`finetune`](Self::finetune).
    pub fn held_out_loss(&self, model: &TinyTransformer, batches: u64, device: &Device) -> f32 {
        let model = model.valid();
        let total: f32 = (0..batches)
            .map(|i| {
                let batch = self.batch(64, 50_000 + i, device);
                mse(model.forward(batch.tokens), batch.targets).into_scalar::<f32>()
            })
            .sum();
        total / batches as f32
    }

    /// Attaches LoRA adapters per `lora` and trains them for `steps` AdamW steps (learning rate
    /// `lr`, batches of 32 from seeds `0..steps`) on the autodiff version of `device`.
    /// `on_step(step, loss)` reports progress. Returns the model in inference mode, adapters
    /// attached.
    pub fn finetune(
        &self,
        model: TinyTransformer,
        lora: &LoraConfig,
        steps: usize,
        lr: f64,
        device: &Device,
        mut on_step: impl FnMut(usize, f32),
    ) -> emloc::Result<TinyTransformer> {
        let (model, _) = attach_new_adapter(model, lora)?;
        let train_device = device.clone().autodiff();
        let mut model = model.train();
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
        for step in 0..steps {
            let batch = self.batch(32, step as u64, device);
            let prediction = model.forward(batch.tokens.to_device(&train_device));
            let loss = mse(prediction, batch.targets.to_device(&train_device));
            on_step(step, loss.clone().into_scalar::<f32>());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
        }
        Ok(model.valid())
    }
}

/// The LoRA targets of a [`TinyTransformer`]: every projection of every block (not the head).
pub fn lora_targets() -> Vec<String> {
    ["query", "key", "value", "output", "up", "down"].map(String::from).to_vec()
}
