//! End to end on a tiny transformer: emulate at ρ = 0.4, fine-tune LoRA on the emulator, correct,
//! merge into the original, and compare held-out task losses.

use burn::module::Module;
use burn::tensor::Device;
use emloc::{
    EmulatorConfig, LoraConfig, attach_adapter, correct, emulate, export_adapter, merge_adapter,
};
use emloc_models::tiny::{SyntheticTask, TinyTransformer, TinyTransformerConfig, lora_targets};

const SEQ: usize = 12;

#[test]
fn corrected_merge_beats_uncorrected_merge() {
    let device = Device::flex();
    device.seed(7);
    let original = TinyTransformerConfig::new().init(&device);
    // Only the LoRA targets (not the head) are adapted; the head stays as is.
    // Planted change of strength 0.5 with uniform tokens: the regime where the emulator's
    // mismatch is comparable to the task's change. Measured over seeds 1, 2, 3, 4, 7 (held-out
    // MSE, corrected vs uncorrected merge): 0.0039/0.0047, 0.0033/0.0037, 0.0036/0.0048,
    // 0.0029/0.0041, 0.0044/0.0053. With a stronger change (0.8) or an under-trained rank-4
    // adapter the uncorrected merge sometimes wins; see EXPERIMENTS.md's notes on the correction (the tiny demo).
    let task = SyntheticTask::new(&original, 2, 0.5, SEQ).with_skew(0.0);

    let calibration: Vec<_> = (0..4).map(|i| task.batch(16, 10_000 + i, &device)).collect();
    let (emulator, report) = emulate(
        original.clone(),
        calibration,
        |model: &TinyTransformer, batch| {
            model.forward(batch.tokens);
        },
        &EmulatorConfig::uniform(0.4),
    )
    .expect("emulate");
    assert_eq!(report.layers.len(), 12);
    assert_eq!(report.dense_layers, vec!["head".to_string()]);
    assert!(report.params_kept() * 2 < report.params_original());

    let zero_shot = task.held_out_loss(&original, 4, &device);
    let emulator_zero_shot = task.held_out_loss(&emulator, 4, &device);
    let lora = LoraConfig::new(8).with_alpha(16.0).with_target_modules(lora_targets());
    let tuned_emulator =
        task.finetune(emulator, &lora, 600, 3e-3, &device, |_, _| {}).expect("finetune");
    assert_eq!(tuned_emulator.layers[0].query.lora.as_ref().map(|l| l.rank()), Some(8));
    let tuned_emulator_loss = task.held_out_loss(&tuned_emulator, 4, &device);

    let uncorrected = export_adapter(&tuned_emulator).expect("export");
    let merged_uncorrected = merge_adapter(original.clone(), &uncorrected).expect("merge");
    let (corrected, correction) =
        correct(&original, &tuned_emulator, &Default::default()).expect("correct");
    assert_eq!(correction.layers.len(), 12);
    let merged_corrected = merge_adapter(original.clone(), &corrected).expect("merge");

    let loss_uncorrected = task.held_out_loss(&merged_uncorrected, 4, &device);
    let loss_corrected = task.held_out_loss(&merged_corrected, 4, &device);
    println!(
        "held-out MSE: original {zero_shot:.4}, emulator {emulator_zero_shot:.4}, tuned emulator \
         {tuned_emulator_loss:.4}, merged uncorrected {loss_uncorrected:.4}, merged corrected \
         {loss_corrected:.4}"
    );
    assert!(loss_corrected < loss_uncorrected, "{loss_corrected} !< {loss_uncorrected}");
    assert!(loss_corrected < zero_shot, "fine-tuning must help: {loss_corrected} !< {zero_shot}");

    // Serving the corrected adapter unmerged gives the merged model's outputs.
    let unmerged = attach_adapter(original.clone(), &corrected).expect("attach").valid();
    let batch = task.batch(8, 77, &device);
    let a = merged_corrected.forward(batch.tokens.clone());
    let b = unmerged.forward(batch.tokens);
    let diff = (a.clone() - b).abs().max().into_scalar::<f32>();
    let scale = a.abs().max().into_scalar::<f32>();
    assert!(diff <= 1e-4 * scale.max(1.0), "merged vs unmerged differ by {diff}");
}
