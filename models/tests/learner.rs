//! Adapters on an emulator train with Burn's `Learner` (not only with a hand-written loop), and
//! what it returns goes through correction and merge.

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::optim::AdamWConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::{
    InferenceStep, Learner, RegressionOutput, SupervisedTraining, TrainOutput, TrainStep,
};
use emloc::{EmulatorConfig, LoraConfig, attach_new_adapter, correct, emulate, merge_adapter};
use emloc_models::tiny::{
    SyntheticTask, TinyTransformer, TinyTransformerConfig, lora_targets, mse,
};

const SEQ: usize = 12;

/// The tiny transformer as a Learner model (a local type: the step traits are foreign).
#[derive(Module, Debug)]
struct Regressor {
    model: TinyTransformer,
}

#[derive(Clone, Debug)]
struct Example {
    tokens: Vec<i64>,
    target: Vec<f32>,
}

#[derive(Clone, Debug)]
struct ExampleBatch {
    tokens: Tensor<2, Int>,
    targets: Tensor<2>,
}

struct ExampleBatcher;

impl Batcher<Example, ExampleBatch> for ExampleBatcher {
    fn batch(&self, items: Vec<Example>, device: &Device) -> ExampleBatch {
        let n = items.len();
        let outputs = items[0].target.len();
        let tokens = items.iter().flat_map(|e| e.tokens.clone()).collect();
        let targets = items.iter().flat_map(|e| e.target.clone()).collect();
        ExampleBatch {
            tokens: Tensor::from_data(TensorData::new(tokens, [n, SEQ]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n, outputs]), device),
        }
    }
}

impl Regressor {
    fn regression(&self, batch: ExampleBatch) -> RegressionOutput {
        let output = self.model.forward(batch.tokens);
        RegressionOutput::new(mse(output.clone(), batch.targets.clone()), output, batch.targets)
    }
}

impl TrainStep for Regressor {
    type Input = ExampleBatch;
    type Output = RegressionOutput;

    fn step(&self, batch: ExampleBatch) -> TrainOutput<RegressionOutput> {
        let item = self.regression(batch);
        TrainOutput::new(self, item.loss.backward(), item)
    }
}

impl InferenceStep for Regressor {
    type Input = ExampleBatch;
    type Output = RegressionOutput;

    fn step(&self, batch: ExampleBatch) -> RegressionOutput {
        self.regression(batch)
    }
}

fn examples(task: &SyntheticTask, seeds: std::ops::Range<u64>, device: &Device) -> Vec<Example> {
    seeds
        .flat_map(|seed| {
            let batch = task.batch(16, seed, device);
            let tokens: Vec<i64> =
                batch.tokens.into_data().convert::<i64>().try_into_vec().unwrap();
            let targets: Vec<f32> = batch.targets.into_data().try_into_vec().unwrap();
            let outputs = targets.len() / 16;
            (0..16)
                .map(|i| Example {
                    tokens: tokens[i * SEQ..(i + 1) * SEQ].to_vec(),
                    target: targets[i * outputs..(i + 1) * outputs].to_vec(),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn learner_trains_emulator_adapters() {
    let device = Device::flex();
    device.seed(11);
    let original = TinyTransformerConfig::new().init(&device);
    let task = SyntheticTask::new(&original, 2, 0.5, SEQ).with_skew(0.0);
    let calibration: Vec<_> = (0..4).map(|i| task.batch(16, 10_000 + i, &device)).collect();
    let (emulator, _) = emulate(
        original.clone(),
        calibration,
        |m: &TinyTransformer, batch| {
            m.forward(batch.tokens);
        },
        &EmulatorConfig::uniform(0.4),
    )
    .unwrap();
    let lora = LoraConfig::new(8).with_alpha(16.0).with_target_modules(lora_targets());
    let (emulator, _) = attach_new_adapter(emulator, &lora).unwrap();
    let before = task.held_out_loss(&emulator, 4, &device);
    let frozen_before = emulator.layers[0].query.factors.as_ref().unwrap().w_v.val().into_data();

    let train_device = device.clone().autodiff();
    let train = DataLoaderBuilder::new(ExampleBatcher)
        .batch_size(32)
        .shuffle(1)
        .set_device(train_device.clone())
        .build(InMemDataset::new(examples(&task, 0..40, &device)));
    let valid = DataLoaderBuilder::new(ExampleBatcher)
        .batch_size(32)
        .set_device(train_device.clone())
        .build(InMemDataset::new(examples(&task, 40..44, &device)));
    let dir = tempfile::tempdir().unwrap();
    let learner = Learner::new(
        Regressor { model: emulator }.train(),
        AdamWConfig::new().with_weight_decay(0.0).init(),
        3e-3,
    );
    let result = SupervisedTraining::new(dir.path(), train, valid).num_epochs(8).launch(learner);
    let tuned = result.model.model;

    let after = task.held_out_loss(&tuned, 4, &device);
    assert!(after < 0.5 * before, "Learner training must lower the loss: {before} → {after}");
    let frozen_after = tuned.layers[0].query.factors.as_ref().unwrap().w_v.val().into_data();
    assert_eq!(frozen_before, frozen_after, "emulator factors must stay frozen");

    let (adapter, _) = correct(&original, &tuned, &Default::default()).unwrap();
    let merged = merge_adapter(original.clone(), &adapter).unwrap();
    assert!(task.held_out_loss(&merged, 4, &device) < task.held_out_loss(&original, 4, &device));
}
