//! The causal-LM task on the tiny Llama fixture: the completion-only loss and per-row
//! likelihoods against the float64 transformers logits of `tiny_llama_transformers.json`,
//! multiple-choice scoring against a host f64 computation from full-sequence logits, loading
//! from a directory and from GGUF, and fine-tuning lowering the validation loss.

mod common;

use std::collections::BTreeSet;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::*;
use emloc_models::causal_lm::{
    Choices, EvalConfig, Example, Prompt, Tokenized, completion_loss, evaluate, finetune,
    load_causal_lm, row_nll,
};
use emloc_models::training::TrainConfig;
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// f64 log-softmax of one row of logits.
fn log_softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|v| v - lse).collect()
}

#[test]
fn completion_loss_matches_the_float64_reference_with_masking_and_padding() {
    let expected = read_expected("tiny_llama_transformers.json");
    let rows: Vec<Vec<u32>> = expected["input_ids"].as_array().unwrap().iter().map(ids).collect();
    let shape: Vec<usize> = expected["logits"]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let values: Vec<f64> = expected["logits"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let (seq, vocab) = (shape[1], shape[2]);
    let logit_row = |b: usize, t: usize| &values[(b * seq + t) * vocab..(b * seq + t + 1) * vocab];

    let lm =
        load_causal_lm(&fixtures().join("tiny_llama"), &Device::flex(), &BTreeSet::new()).unwrap();
    // Row 0: prompt of 3 tokens, completion of 5 (the whole row); row 1: prompt of 2, completion
    // of 4, cut at 6 tokens so the batch is right-padded (causal attention keeps the cut away).
    let items = [
        Tokenized { prompt: rows[0][..3].to_vec(), completion: rows[0][3..].to_vec() },
        Tokenized { prompt: rows[1][..2].to_vec(), completion: rows[1][2..6].to_vec() },
    ];
    let mut reference = Vec::new();
    for (b, item) in items.iter().enumerate() {
        let sequence: Vec<u32> = item.prompt.iter().chain(&item.completion).copied().collect();
        let mut sum = 0.0;
        for t in item.prompt.len() - 1..sequence.len() - 1 {
            sum -= log_softmax(logit_row(b, t))[sequence[t + 1] as usize];
        }
        reference.push((sum, item.completion.len()));
    }
    let batch = lm.task.batch(&items, &Device::flex());
    assert_eq!(batch.inputs.dims(), [2, 7]);
    let rows_nll = row_nll(&lm.model, &batch, 2).unwrap();
    for ((got, n), (want, m)) in rows_nll.iter().zip(&reference) {
        assert_eq!(n, m);
        assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "row nll {got} vs {want}");
    }
    let loss = f64::from(completion_loss(&lm.model, &batch).into_scalar::<f32>());
    let mean = reference.iter().map(|r| r.0).sum::<f64>()
        / reference.iter().map(|r| r.1).sum::<usize>() as f64;
    assert!((loss - mean).abs() < 1e-4 * mean.max(1.0), "loss {loss} vs {mean}");
}

fn example(prompt: &str, target: &str, options: Option<(&[&str], usize)>) -> Example {
    Example {
        prompt: Prompt::Text(prompt.into()),
        targets: vec![target.into()],
        choices: options.map(|(o, answer)| Choices {
            options: o.iter().map(|s| s.to_string()).collect(),
            answer,
        }),
    }
}

#[test]
fn choice_accuracy_and_loss_follow_full_sequence_likelihoods() {
    let lm =
        load_causal_lm(&fixtures().join("tiny_llama"), &Device::flex(), &BTreeSet::new()).unwrap();
    let options = ["cat sat", "dog runs fast", "bird sings"];
    let examples: Vec<Example> = (0..3)
        .map(|answer| example("the big", options[answer], Some((&options, answer))))
        .collect();
    // Host reference: each option's summed log-probability from the full logits of its sequence.
    let scores: Vec<f64> = options
        .iter()
        .map(|option| {
            let t = lm.task.encode_completion(&examples[0].prompt, option).unwrap();
            let sequence: Vec<u32> = t.prompt.iter().chain(&t.completion).copied().collect();
            let data = TensorData::new(
                sequence.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [1, sequence.len()],
            );
            let logits = lm.model.forward(Tensor::<2, Int>::from_data(data, &Device::flex()), None);
            let values: Vec<f64> = logits.into_data().iter::<f32>().map(f64::from).collect();
            let vocab = lm.model.vocab_size();
            (t.prompt.len() - 1..sequence.len() - 1)
                .map(|p| log_softmax(&values[p * vocab..(p + 1) * vocab])[sequence[p + 1] as usize])
                .sum()
        })
        .collect();
    let best = (0..3).max_by(|&a, &b| scores[a].total_cmp(&scores[b])).unwrap();
    let metrics = evaluate(
        &lm.task,
        &lm.model,
        &examples,
        &EvalConfig { batch_size: 2, max_new_tokens: 3 },
        |_, _| {},
    )
    .unwrap();
    assert_eq!(metrics.choice_examples, 3);
    assert!(
        (metrics.accuracy.unwrap() - 1.0 / 3.0).abs() < 1e-12,
        "only example {best} is right: {metrics:?}"
    );
    // The loss is the mean NLL per completion token over the three targets (each target is one
    // of the options, so its NLL is minus the option's score).
    let tokens: usize = options
        .iter()
        .map(|o| lm.task.encode_completion(&examples[0].prompt, o).unwrap().completion.len())
        .sum();
    let reference = -scores.iter().sum::<f64>() / tokens as f64;
    assert!((metrics.loss - reference).abs() < 1e-4 * reference, "{} vs {reference}", metrics.loss);
    assert_eq!(metrics.completion_tokens, tokens);
    assert!(metrics.exact_match.is_some());
}

#[test]
fn finetuning_lowers_the_validation_loss_and_gguf_loads_the_same_way() {
    let lm =
        load_causal_lm(&fixtures().join("tiny_llama"), &Device::flex(), &BTreeSet::new()).unwrap();
    let animals = ["cat", "dog", "bird", "fish"];
    let data: Vec<Example> = (0..16)
        .map(|i| {
            example(
                &format!("the {} in the park", animals[i % 4]),
                &format!("{} runs fast", animals[i % 4]),
                None,
            )
        })
        .collect();
    let eval = EvalConfig { batch_size: 4, max_new_tokens: 0 };
    let before = evaluate(&lm.task, &lm.model, &data[12..], &eval, |_, _| {}).unwrap();
    let lora = emloc::LoraConfig::new(4).with_alpha(8.0).with_target_modules(vec![
        "q_proj".into(),
        "v_proj".into(),
        "down_proj".into(),
    ]);
    let (model, _) = emloc::attach_new_adapter(lm.model.clone(), &lora).unwrap();
    let config = TrainConfig {
        steps: 20,
        batch_size: 4,
        lr: 1e-2,
        warmup_steps: 2,
        ..TrainConfig::default()
    };
    let mut steps = 0;
    let (tuned, report) =
        finetune(&lm.task, model, &data[..12], &config, None, |_, _, _| steps += 1).unwrap();
    assert_eq!(steps, 20);
    assert!(report.last_loss < report.first_loss, "{report:?}");
    let after = evaluate(&lm.task, &tuned, &data[12..], &eval, |_, _| {}).unwrap();
    assert!(after.loss < 0.5 * before.loss, "{} → {}", before.loss, after.loss);

    // The GGUF fixture loads with its own tokenizer, chat template and stop ids.
    let gguf =
        load_causal_lm(&fixtures().join("gguf/tiny_llama.gguf"), &Device::flex(), &BTreeSet::new())
            .unwrap();
    assert_eq!(gguf.task.style(), emloc_models::causal_lm::PromptStyle::Chat);
    assert!(gguf.task.eos_token_ids().contains(&2), "{:?}", gguf.task.eos_token_ids());
    let t = gguf
        .task
        .encode_completion(&Prompt::Text("is the cat on the mat?".into()), "the cat is.")
        .unwrap();
    let im_end = 2;
    assert_eq!(
        t.completion.iter().filter(|&&i| i == im_end).count(),
        1,
        "the assistant turn ends with <|im_end|>: {t:?}"
    );
}

/// Every float parameter's gradient in `a` and `b` (present in both or neither), compared
/// within `tol` relative to the larger magnitude.
struct SameGradients<'a> {
    a: &'a burn::optim::GradientsParams,
    b: &'a burn::optim::GradientsParams,
    tol: f32,
    compared: usize,
}

impl burn::module::ModuleVisitor for SameGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        match (self.a.get::<D>(param.id), self.b.get::<D>(param.id)) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                let (a, b) = (values(a), values(b));
                let scale = a.iter().chain(&b).fold(1e-3f32, |m, v| m.max(v.abs()));
                let diff = max_abs_diff(&a, &b);
                assert!(diff <= self.tol * scale, "param {}: diff {diff}, scale {scale}", param.id);
                self.compared += 1;
            }
            (a, b) => panic!("param {}: gradient in one only ({a:?} / {b:?})", param.id),
        }
    }
}

fn assert_same_gradients(
    model: &emloc_models::llama::LlamaForCausalLM,
    a: &burn::optim::GradientsParams,
    b: &burn::optim::GradientsParams,
    tol: f32,
) -> usize {
    use burn::module::Module;
    let mut visitor = SameGradients { a, b, tol, compared: 0 };
    model.visit(&mut visitor);
    visitor.compared
}

#[test]
fn checkpointed_gradients_equal_plain_autodiff_and_the_chunked_head_the_whole_one() {
    use burn::module::Module;
    use burn::optim::{AdamWConfig, GradientsParams};
    use emloc_models::causal_lm::completion_gradients_checkpointed;

    // Untied head (Llama) and tied head with q/k/v biases (Qwen2).
    for fixture in ["tiny_llama", "tiny_qwen2"] {
        let device = Device::flex();
        let dir = fixtures().join(fixture);
        let (model, config) = emloc_models::llama::LlamaForCausalLM::load(&dir, &device).unwrap();
        let tokenizer = emloc_models::llama::LlamaTokenizer::from_dir(&dir)
            .or_else(|_| {
                emloc_models::llama::LlamaTokenizer::from_dir(fixtures().join("tiny_llama"))
            })
            .unwrap();
        let task =
            emloc_models::causal_lm::CausalLmTask::new(tokenizer, None, config.eos_token_ids())
                .unwrap();
        let lora = emloc::LoraConfig::new(4).with_alpha(8.0).with_target_modules(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                .map(String::from)
                .to_vec(),
        );
        let (model, _) = emloc::attach_new_adapter(model, &lora).unwrap();
        let train_device = device.clone().autodiff();
        let items: Vec<Tokenized> = [
            ("the cat sat on", "the mat"),
            ("a dog runs in", "the park and the cat sat"),
            ("the bird", "sat"),
        ]
        .iter()
        .map(|(p, c)| task.encode(&example(p, c, None)).unwrap())
        .collect();
        let batch = task.batch(&items, &train_device);
        // One plain step first, so that B ≠ 0 and every A has a gradient too.
        let mut model = model.train();
        let mut optim = AdamWConfig::new().init();
        let grads = GradientsParams::from_grads(completion_loss(&model, &batch).backward(), &model);
        model = optim.step(1e-2, model, grads);

        let plain_loss = completion_loss(&model, &batch).mul_scalar(0.5);
        let plain_value = f64::from(plain_loss.clone().into_scalar::<f32>());
        let plain = GradientsParams::from_grads(plain_loss.backward(), &model);
        // 3 positions per chunk: the scored positions span several chunks and one partial one.
        let (value, checkpointed) = completion_gradients_checkpointed(&model, &batch, 0.5, 3);
        assert!((value - plain_value).abs() < 1e-5 * plain_value.abs(), "{value} vs {plain_value}");
        let compared = assert_same_gradients(&model, &plain, &checkpointed, 1e-4);
        // 7 adapted projections × 2 layers × (A, B).
        assert_eq!(compared, 28, "{fixture}");
        let (whole_value, whole) = completion_gradients_checkpointed(&model, &batch, 0.5, 10_000);
        assert!((value - whole_value).abs() < 1e-5 * value.abs(), "{value} vs {whole_value}");
        assert_same_gradients(&model, &whole, &checkpointed, 1e-5);
    }
}

#[test]
fn finetuning_with_gradient_checkpointing_reaches_the_adapters_of_plain_finetuning() {
    let lm =
        load_causal_lm(&fixtures().join("tiny_llama"), &Device::flex(), &BTreeSet::new()).unwrap();
    let data: Vec<Example> =
        (0..8).map(|i| example(&format!("the cat {i} in the"), "park runs fast", None)).collect();
    let lora = emloc::LoraConfig::new(4).with_alpha(8.0).with_target_modules(vec![
        "q_proj".into(),
        "v_proj".into(),
        "down_proj".into(),
    ]);
    let (model, _) = emloc::attach_new_adapter(lm.model.clone(), &lora).unwrap();
    let plain = TrainConfig {
        steps: 4,
        batch_size: 4,
        grad_accumulation: 2,
        lr: 1e-2,
        warmup_steps: 1,
        ..TrainConfig::default()
    };
    let checkpointed = TrainConfig { gradient_checkpointing: true, ..plain.clone() };
    let run = |config: &TrainConfig| {
        finetune(&lm.task, model.clone(), &data, config, None, |_, _, _| {}).unwrap()
    };
    let ((a, report_a), (b, report_b)) = (run(&plain), run(&checkpointed));
    assert!((report_a.last_loss - report_b.last_loss).abs() < 1e-4, "{report_a:?} {report_b:?}");
    for (x, y) in a.model.layers.iter().zip(&b.model.layers) {
        for (p, q) in
            [(&x.self_attn.q_proj, &y.self_attn.q_proj), (&x.mlp.down_proj, &y.mlp.down_proj)]
        {
            let (p, q) = (p.lora.as_ref().unwrap(), q.lora.as_ref().unwrap());
            assert_within("B", &values(q.b.val()), &values(p.b.val()), 1e-4);
            assert_within("A", &values(q.a.val()), &values(p.a.val()), 1e-4);
        }
    }
}
