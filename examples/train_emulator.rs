//! Fine-tune LoRA adapters on an emulator with ordinary Burn training code, then correct them and
//! merge them into the original model.
//!
//! ```sh
//! cargo run --example train_emulator
//! ```
//!
//! The task is a teacher/student regression: the *teacher* is the original two-layer MLP with a
//! planted low-rank change in both layers, and the adapters must learn that change. The inputs
//! have a decaying spectrum, as real activations do, so the emulator (whitened by the
//! calibration inputs) keeps what matters for this data. Two ways to train the same adapters:
//! a hand-written loop (`loss.backward()`, `GradientsParams`, `optim.step`) and Burn's `Learner`
//! (`SupervisedTraining`). Each ends in `correct` and `merge_adapter`; the held-out MSE of every
//! model is printed. Runs in a few seconds on the CPU.

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::loss::{MseLoss, Reduction};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn::train::{
    InferenceStep, Learner, RegressionOutput, SupervisedTraining, TrainOutput, TrainStep,
};
use emloc::nn::{Linear, LinearConfig};
use emloc::{
    CorrectionConfig, EmulatorConfig, LoraConfig, attach_new_adapter, correct, emulate,
    merge_adapter,
};

const D_IN: usize = 64;
const HIDDEN: usize = 128;
const D_OUT: usize = 32;

/// The user's model: written exactly as with `burn::nn::Linear`, only the `use` line differs.
#[derive(Module, Debug)]
struct Mlp {
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            up: LinearConfig::new(D_IN, HIDDEN).init(device),
            down: LinearConfig::new(HIDDEN, D_OUT).init(device),
        }
    }

    /// `[batch, D_IN]` → `[batch, D_OUT]`.
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.down.forward(gelu(self.up.forward(x)))
    }

    fn mse(&self, x: Tensor<2>, y: Tensor<2>) -> Tensor<1> {
        MseLoss::new().forward(self.forward(x), y, Reduction::Mean)
    }
}

/// Inputs with a decaying spectrum: `z · diag(0.9^i)`, `z ~ N(0, 1)`.
fn inputs(n: usize, device: &Device) -> Tensor<2> {
    let scales: Vec<f32> = (0..D_IN).map(|i| 0.9f32.powi(i as i32)).collect();
    let scales = Tensor::<1>::from_data(TensorData::new(scales, [D_IN]), device);
    Tensor::<2>::random([n, D_IN], Distribution::Normal(0.0, 1.0), device) * scales.unsqueeze::<2>()
}

/// The teacher: `original` with a rank-2 change of strength 0.5 added to both weights.
fn teacher(original: &Mlp, device: &Device) -> Mlp {
    let plant = |layer: &Linear| {
        let [d_in, d_out] = layer.weight.dims();
        let a = Tensor::<2>::random([d_in, 2], Distribution::Normal(0.0, 1.0), device);
        let b = Tensor::<2>::random([2, d_out], Distribution::Normal(0.0, 1.0), device);
        let mut changed = layer.clone();
        changed.weight =
            changed.weight.map(|w| w + a.matmul(b).mul_scalar(0.5 / (d_in as f64).sqrt()));
        changed
    };
    Mlp { up: plant(&original.up), down: plant(&original.down) }
}

#[derive(Clone, Debug)]
struct Example {
    x: Vec<f32>,
    y: Vec<f32>,
}

#[derive(Clone, Debug)]
struct Batch {
    x: Tensor<2>,
    y: Tensor<2>,
}

struct ExampleBatcher;

impl Batcher<Example, Batch> for ExampleBatcher {
    fn batch(&self, items: Vec<Example>, device: &Device) -> Batch {
        let n = items.len();
        let x = items.iter().flat_map(|e| e.x.clone()).collect();
        let y = items.iter().flat_map(|e| e.y.clone()).collect();
        Batch {
            x: Tensor::from_data(TensorData::new(x, [n, D_IN]), device),
            y: Tensor::from_data(TensorData::new(y, [n, D_OUT]), device),
        }
    }
}

/// What `Learner` trains: the steps are Burn's traits, so the model is wrapped in a local type.
#[derive(Module, Debug)]
struct Regressor {
    model: Mlp,
}

impl Regressor {
    fn regression(&self, batch: Batch) -> RegressionOutput {
        let output = self.model.forward(batch.x);
        let loss = MseLoss::new().forward(output.clone(), batch.y.clone(), Reduction::Mean);
        RegressionOutput::new(loss, output, batch.y)
    }
}

impl TrainStep for Regressor {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> TrainOutput<RegressionOutput> {
        let item = self.regression(batch);
        TrainOutput::new(self, item.loss.backward(), item)
    }
}

impl InferenceStep for Regressor {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> RegressionOutput {
        self.regression(batch)
    }
}

fn examples(x: &Tensor<2>, y: &Tensor<2>) -> Vec<Example> {
    let xs: Vec<f32> = x.to_data().try_to_vec().expect("f32");
    let ys: Vec<f32> = y.to_data().try_to_vec().expect("f32");
    xs.chunks(D_IN)
        .zip(ys.chunks(D_OUT))
        .map(|(x, y)| Example { x: x.to_vec(), y: y.to_vec() })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::flex();
    device.seed(7);
    let original = Mlp::new(&device);
    let teacher = teacher(&original, &device);
    let (train_x, valid_x) = (inputs(2048, &device), inputs(512, &device));
    let (train_y, valid_y) = (teacher.forward(train_x.clone()), teacher.forward(valid_x.clone()));
    let held_out = |model: &Mlp| model.mse(valid_x.clone(), valid_y.clone()).into_scalar::<f32>();

    // 1. The emulator, calibrated on a few batches of the task's inputs, ρ = 0.4 on every layer
    //    (`EmulatorConfig::uniform` would keep layers named like heads dense).
    let calibration: Vec<Tensor<2>> =
        (0..4).map(|i| train_x.clone().slice(i * 64..(i + 1) * 64)).collect();
    let config = EmulatorConfig::all_layers(0.4);
    let (emulator, report) =
        emulate(original.clone(), calibration, |m: &Mlp, x| drop(m.forward(x)), &config)?;
    for layer in &report.layers {
        println!(
            "emulated {:<5} rank {:>3}, whitened error {:.3}",
            layer.path, layer.rank, layer.relative_whitened_error
        );
    }
    let lora =
        LoraConfig::new(4).with_alpha(8.0).with_target_modules(vec!["up".into(), "down".into()]);

    // 2a. A hand-written loop.
    device.seed(1);
    let (mut model, _) = attach_new_adapter(emulator.clone(), &lora)?;
    model = model.train(); // autodiff on, parameters tracked
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let train_x_ad = train_x.clone().to_device(&device.clone().autodiff());
    let train_y_ad = train_y.clone().to_device(&device.clone().autodiff());
    for step in 0..300 {
        let start = (step * 64) % 2048;
        let loss = model.mse(
            train_x_ad.clone().slice(start..start + 64),
            train_y_ad.clone().slice(start..start + 64),
        );
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    let by_hand = model.valid();

    // 2b. Burn's Learner on the same emulator and data.
    device.seed(1);
    let (model, _) = attach_new_adapter(emulator, &lora)?;
    let train_device = device.clone().autodiff();
    let loader = |x: &Tensor<2>, y: &Tensor<2>, shuffle: Option<u64>| {
        let builder =
            DataLoaderBuilder::new(ExampleBatcher).batch_size(64).set_device(train_device.clone());
        let builder = match shuffle {
            Some(seed) => builder.shuffle(seed),
            None => builder,
        };
        builder.build(InMemDataset::new(examples(x, y)))
    };
    let dir = tempfile::tempdir()?;
    let learner = Learner::new(
        Regressor { model }.train(),
        AdamWConfig::new().with_weight_decay(0.0).init(),
        3e-3,
    );
    let result = SupervisedTraining::new(
        dir.path(),
        loader(&train_x, &train_y, Some(1)),
        loader(&valid_x, &valid_y, None),
    )
    .num_epochs(10)
    .launch(learner);
    let with_learner = result.model.model.valid();

    // 3. Correct each run's adapters for the original, then merge.
    println!("\nheld-out MSE (teacher = original + planted change)");
    println!("  original model                     {:.5}", held_out(&original));
    for (name, tuned) in [("hand-written loop", &by_hand), ("Learner", &with_learner)] {
        let (adapter, _) = correct(&original, tuned, &CorrectionConfig::default())?;
        let uncorrected = emloc::export_adapter(tuned)?;
        let merged = merge_adapter(original.clone(), &adapter)?;
        let merged_uncorrected = merge_adapter(original.clone(), &uncorrected)?;
        println!("  {name:<18} on the emulator   {:.5}", held_out(tuned));
        println!("  {name:<18} merged, corrected {:.5}", held_out(&merged));
        println!("  {name:<18} merged, as trained {:.5}", held_out(&merged_uncorrected));
    }
    Ok(())
}
