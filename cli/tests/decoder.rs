//! The command-line pipeline for decoder LMs on the tiny Llama fixture: emulate → finetune →
//! correct → merge → eval on completion data, the task inference and its errors, and
//! `generate` printing only the completion.

mod common;

use std::path::Path;

use common::{correct_args, fails_with, fixture, ok, read_json};

/// Completion data in the tiny word-level vocabulary: the target repeats the input's animal,
/// so the task is learnable; every fourth line is multiple choice.
fn write_data(path: &Path) {
    let animals = ["cat", "dog", "bird", "fish"];
    let places = ["park", "house", "tree", "sea"];
    let mut lines = Vec::new();
    for i in 0..40usize {
        let (a, p) = (animals[i % 4], places[(i / 4) % 4]);
        let input = format!("the {a} in the {p}");
        let line = if i % 4 == 0 {
            serde_json::json!({"input": input, "label": a, "choices": animals, "target": a})
        } else {
            serde_json::json!({"input": input, "target": format!("{a} runs fast")})
        };
        lines.push(line.to_string());
    }
    std::fs::write(path, lines.join("\n")).unwrap();
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).unwrap()
}

#[test]
fn decoder_pipeline_runs_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    write_data(&dir.path().join("data.jsonl"));
    let model = fixture("tiny_llama").display().to_string();
    let data = p("data.jsonl");
    let common = [
        "--model",
        model.as_str(),
        "--data",
        data.as_str(),
        "--validation",
        "8",
        "--max-seq-length",
        "16",
    ];
    let args = |cmd: &str, extra: &[&str]| -> Vec<String> {
        std::iter::once(cmd)
            .chain(common)
            .chain(extra.iter().copied())
            .map(str::to_string)
            .collect()
    };
    let run = |cmd: &str, extra: &[&str]| ok(&args(cmd, extra));

    let zero_shot = run("eval", &["--max-new-tokens", "4"]);
    let zero_shot: serde_json::Value = serde_json::from_str(&zero_shot).unwrap();
    assert!(zero_shot["loss"].as_f64().unwrap() > 0.0, "{zero_shot}");
    assert!(
        zero_shot["exact_match"].as_f64().is_some() && zero_shot["accuracy"].as_f64().is_some(),
        "{zero_shot}"
    );

    // Frozen weights in bf16 (`--dtype`): the loss within bf16's rounding of f32's.
    let bf16: serde_json::Value =
        serde_json::from_str(&run("eval", &["--max-new-tokens", "0", "--dtype", "bf16"])).unwrap();
    let (got, want) = (bf16["loss"].as_f64().unwrap(), zero_shot["loss"].as_f64().unwrap());
    assert!((got - want).abs() < 0.02 * want, "bf16 loss {got} vs f32 {want}");

    run("emulate", &["--ratio", "0.5", "--calibration-pairs", "8", "--out", &p("emulator")]);
    let description = read_json(dir.path().join("emulator/emulator.json"));
    assert!(description.to_string().contains("model.layers.1.mlp.down_proj"), "{description}");
    // Sequential calibration with the refit: recorded in the description, reported per layer.
    let sequential = ["--ratio", "0.5", "--calibration-pairs", "8", "--sequential", "--refit"];
    run("emulate", &[&sequential[..], &["--out", &p("emulator-sequential")]].concat());
    let description = read_json(dir.path().join("emulator-sequential/emulator.json"));
    assert_eq!(description["config"]["sequential"]["refit"], "output", "{description}");
    let layers = description["report"]["layers"].as_array().unwrap();
    assert!(layers.iter().all(|l| l["refit"]["relative_output_error"].is_number()), "{layers:?}");

    let (emulator, adapter) = (p("emulator"), p("adapter"));
    let train = [
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--rank",
        "2",
        "--alpha",
        "4",
        "--lr",
        "0.02",
        "--warmup-steps",
        "1",
    ];
    let mut extra =
        vec!["--emulator", emulator.as_str(), "--checkpoint-every", "3", "--out", adapter.as_str()];
    extra.extend(train);
    run("finetune", &extra);
    let config = read_json(dir.path().join("adapter/adapter_config.json"));
    assert_eq!(config["task_type"], "CAUSAL_LM", "{config}");
    assert_eq!(config["target_modules"].as_array().map(Vec::len), Some(2 * 7), "{config}");
    assert!(dir.path().join("adapter/checkpoint-6/trainer_state.json").is_file());
    // The same training on bf16 frozen weights (the adapter stays f32) learns as well.
    let bf16_adapter = p("adapter-bf16");
    let mut extra =
        vec!["--emulator", emulator.as_str(), "--dtype", "bf16", "--out", &bf16_adapter];
    extra.extend(train);
    run("finetune", &extra);
    let report = read_json(dir.path().join("adapter-bf16/report.json"));
    let loss = |key: &str| report["details"][key].as_f64().or(report[key].as_f64());
    let (first, last) = (loss("first_loss"), loss("last_loss"));
    assert!(matches!((first, last), (Some(f), Some(l)) if l < f), "{report}");

    ok(&correct_args(&model, &emulator, &adapter, &p("corrected"), &[]));
    ok(&["merge", "--model", &model, "--adapter", &p("corrected"), "--out", &p("merged")]);

    // Serving the corrected adapter beside the model equals merging it (within f32 rounding).
    let served = run("eval", &["--adapter", &p("corrected"), "--max-new-tokens", "0"]);
    let served: serde_json::Value = serde_json::from_str(&served).unwrap();
    let merged = p("merged");
    let merged = eval_json(&[
        "eval",
        "--model",
        &merged,
        "--data",
        &data,
        "--validation",
        "8",
        "--max-seq-length",
        "16",
        "--max-new-tokens",
        "0",
    ]);
    let (a, b) = (served["loss"].as_f64().unwrap(), merged["loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-4 * a.max(1.0), "served {a} vs merged {b}");
    assert!(merged["exact_match"].is_null(), "{merged}");
    // A global rank plan at the uniform plan's size, used as emulator rules.
    let table = run(
        "plan",
        &["--calibration-pairs", "8", "--seq-len", "16", "--batch", "4", "--out", &p("rules.json")],
    );
    assert!(table.contains("| global"), "{table}");
    run(
        "emulate",
        &["--config", &p("rules.json"), "--calibration-pairs", "8", "--out", &p("emulator-global")],
    );
    // The emulator alone evaluates too (its replaced weights never loaded).
    let emulated = run("eval", &["--emulator", &emulator, "--max-new-tokens", "0"]);
    assert!(emulated.contains("\"loss\""), "{emulated}");
}

#[test]
fn the_task_follows_the_model_and_bad_combinations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_data(&data);
    let data = data.display().to_string();
    let llama = fixture("tiny_llama").display().to_string();
    let bert = fixture("tiny_bert").display().to_string();
    fails_with(
        &["eval", "--model", &llama, "--data", &data, "--task", "retrieval"],
        "needs a sentence encoder",
    );
    fails_with(
        &["eval", "--model", &bert, "--data", &data, "--task", "causal-lm"],
        "needs a decoder model",
    );
    // An encoder reads a first record with `input` and `label` as classification data; this
    // file's second line has no label.
    fails_with(&["eval", "--model", &bert, "--data", &data], "data.jsonl:2: missing field `label`");
    fails_with(
        &["eval", "--model", &bert, "--data", &data, "--task", "retrieval"],
        "missing field `question`",
    );
    // An unsupported architecture is named.
    let other = dir.path().join("gpt2");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    fails_with(
        &["eval", "--model", &other.display().to_string(), "--data", &data],
        "model_type `gpt2` is not supported",
    );
    // A malformed line is named by file and line, before any work.
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"input\": \"the cat\", \"target\": \"sat\"}\n{\"input\": \"x\"}\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.jsonl").display().to_string();
    fails_with(
        &[
            "finetune",
            "--model",
            &llama,
            "--data",
            &bad,
            "--out",
            &dir.path().join("o").display().to_string(),
        ],
        "bad.jsonl:2:",
    );
    assert!(!dir.path().join("o").exists());
    // Raw prompts only: the tiny model has no chat template.
    fails_with(
        &["generate", "--model", &llama, "--prompt", "the cat", "--chat"],
        "needs a chat template",
    );
}

#[test]
fn generate_prints_only_the_completion() {
    let llama = fixture("tiny_llama").display().to_string();
    let out = ok(&[
        "generate",
        "--model",
        &llama,
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    let generated = value["generated_ids"].as_array().unwrap();
    assert!(!generated.is_empty() && generated.len() <= 3, "{value}");
    let text = ok(&["generate", "--model", &llama, "--prompt", "the cat", "--max-new-tokens", "3"]);
    assert!(!text.trim_start().starts_with("the cat"), "the prompt is echoed: {text}");
}

#[test]
fn bench_generate_times_emloc_and_refuses_bad_budgets_before_loading() {
    let llama = fixture("tiny_llama").display().to_string();
    let args = ["bench-generate", "--model", &llama, "--prompt", "the cat", "--no-peer"];
    let out = ok(&[&args[..], &["--new-tokens", "5", "--runs", "2"]].concat());
    let row = out.lines().find(|l| l.starts_with("| emloc |")).expect(&out);
    let tokens_per_second: f64 = row.split('|').nth(4).unwrap().trim().parse().unwrap();
    assert!(tokens_per_second > 0.0, "{out}");
    fails_with(&[&args[..], &["--new-tokens", "100000000000"]].concat(), "context window of 64");
    fails_with(&[&args[..], &["--new-tokens", "1"]].concat(), "--new-tokens must be at least 2");
}

/// Lowercase completion data the tiny GGUF's 50-token byte-level vocabulary can spell.
fn write_gguf_data(path: &Path) {
    let words = ["cat", "hat", "mat", "sat"];
    let lines: Vec<String> = (0..24usize)
        .map(|i| {
            let (a, b) = (words[i % 4], words[(i / 4) % 4]);
            serde_json::json!({"input": format!("is the {a} on the {b}?"), "target": format!("the {a} is.")}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

#[test]
fn gguf_decoder_goes_through_every_stage_and_merges_into_an_hf_directory() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    write_gguf_data(&dir.path().join("data.jsonl"));
    let model = fixture("gguf/tiny_llama.gguf").display().to_string();
    let data = p("data.jsonl");
    let common = ["--data", data.as_str(), "--validation", "6", "--max-seq-length", "48"];
    let run = |cmd: &str, model: &str, extra: &[&str]| {
        let args: Vec<&str> = [cmd, "--model", model]
            .into_iter()
            .chain(common)
            .chain(extra.iter().copied())
            .collect();
        ok(&args)
    };
    run(
        "emulate",
        &model,
        &["--ratio", "0.5", "--calibration-pairs", "6", "--out", &p("emulator")],
    );
    let (emulator, adapter) = (p("emulator"), p("adapter"));
    run(
        "finetune",
        &model,
        &[
            "--emulator",
            &emulator,
            "--out",
            &adapter,
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--rank",
            "2",
        ],
    );
    ok(&correct_args(&model, &emulator, &adapter, &p("corrected"), &[]));
    ok(&["merge", "--model", &model, "--adapter", &p("corrected"), "--out", &p("merged")]);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(dir.path().join("merged").join(file).is_file(), "{file}");
    }
    // No staging directory is left beside the output.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with(".emloc"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The merged HF directory (chat template and all) scores as the GGUF with the adapter served.
    let served: serde_json::Value = serde_json::from_str(&run(
        "eval",
        &model,
        &["--adapter", &p("corrected"), "--max-new-tokens", "3"],
    ))
    .unwrap();
    let merged: serde_json::Value =
        serde_json::from_str(&run("eval", &p("merged"), &["--max-new-tokens", "3"])).unwrap();
    let (a, b) = (served["loss"].as_f64().unwrap(), merged["loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-4 * a.max(1.0), "served {a} vs merged {b}");
    assert_eq!(served["exact_match"], merged["exact_match"]);
    let reply = ok(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "is the cat on the mat?",
        "--chat",
        "--max-new-tokens",
        "4",
    ]);
    assert!(!reply.contains("<|im_start|>"), "{reply}");
}

/// The LLM recipes' options for a run on a tiny model: a few items, steps and tokens.
const TINY_RECIPE_OPTIONS: [&str; 12] = [
    "--validation",
    "2",
    "--train-pairs",
    "4",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--calibration-pairs",
    "4",
    "--max-seq-length",
    "48",
];

/// `emloc run --recipe smollm2-bigbench` on the tiny Llama: every headline row runs and the
/// report scores each of the eight tasks with its own metric; its option errors come first.
#[test]
fn bigbench_recipe_scores_every_task_and_checks_its_options() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny_llama").display().to_string();
    let out = dir.path().join("run").display().to_string();
    let args = [
        &["run", "--recipe", "smollm2-bigbench", "--model", model.as_str()][..],
        &TINY_RECIPE_OPTIONS,
        &["--out", out.as_str()],
    ]
    .concat();
    let table = ok(&[&args[..], &["--rows", "headline"]].concat());
    assert!(table.contains("| MathQA |"), "{table}");
    let report = read_json(dir.path().join("run/report.json"));
    let rows = report["rows"].as_array().unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(rows.len(), 5, "{methods:?}");
    assert!(methods[2].contains("ρ = 0.4 adapter on the emulator itself"), "{methods:?}");
    assert!(methods[3].contains("ρ = 0.4 corrected") && methods[4].contains("uncorrected"));
    for row in rows {
        let tasks = row["scores"]["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 8, "{row}");
        for task in tasks {
            let expected = if task["task"] == "MathQA" { "accuracy" } else { "exact_match" };
            assert_eq!(task["metric"], expected, "{task}");
            assert!(task["loss"].as_f64().unwrap() > 0.0, "{task}");
        }
    }
    // Rows trained on the emulator are trained on fewer parameters.
    let trained_on = |i: usize| rows[i]["trained_model_params"].as_u64().unwrap();
    assert!(trained_on(3) < trained_on(1), "{methods:?}");
    assert!(dir.path().join("run/adapter-emloc-rho0.4-corrected/adapter_config.json").is_file());

    // The paper's baselines and two constructions at the headline emulator's size.
    let out = dir.path().join("baselines").display().to_string();
    let extra = ["--rows", "baselines", "--constructions", "sequential-refit,dense-last-down"];
    ok(&[&args[..args.len() - 1], &[out.as_str()], &extra].concat());
    let report = read_json(dir.path().join("baselines/report.json"));
    let methods: Vec<String> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap().to_string())
        .collect();
    for wanted in [
        "sequential calibration + refit corrected",
        "sequential calibration + refit uncorrected",
        "dense last FFN output corrected",
        "layer drop (Offsite-Tuning), 2 of 2 layers",
        "structured pruning, 8 of 64 MLP neurons per layer",
    ] {
        assert!(methods.iter().any(|m| m.contains(wanted)), "no `{wanted}` row in {methods:?}");
    }
    let emulators = report["emulators"].as_array().unwrap();
    let refitted = emulators.iter().find(|e| e[0].as_str().unwrap().contains("refit")).unwrap();
    assert!(refitted[1]["layers"][0]["refit"]["relative_output_error"].is_number(), "{refitted}");
    for adapter in ["layer-drop", "pruned", "emulator-sequential-refit-corrected"] {
        let config = dir.path().join(format!("baselines/adapter-{adapter}/adapter_config.json"));
        assert!(config.is_file(), "{}", config.display());
    }

    fails_with(&[&args[..], &["--data", "x.jsonl"]].concat(), "--data is for the other recipes");
    fails_with(&[&args[..], &["--ratios", "0.3,0.5"]].concat(), "must be one of --ratios");
    fails_with(&[&args[..], &["--ratios", "0.4,1.5"]].concat(), "keep-ratio 1.5 must be in (0, 1)");
}

/// `emloc run --recipe qwen-coder-scale` with the tiny Llama GGUF as both models of the pair: the
/// small model's LoRA memory sizes the large one's emulator, whose rows stay within the
/// parameters that budget leaves; the QLoRA-style row trains on the GGUF's blocks; missing
/// models and misplaced options are refused first.
#[test]
fn scale_recipe_sizes_the_emulator_to_the_small_models_finetuning_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("gguf/tiny_llama.gguf").display().to_string();
    let out = dir.path().join("scale").display().to_string();
    let args = [
        &["run", "--recipe", "qwen-coder-scale", "--model", &model, "--small-model", &model][..],
        &TINY_RECIPE_OPTIONS,
        &["--out", out.as_str()],
    ]
    .concat();
    ok(&args);
    let report = read_json(dir.path().join("scale/report.json"));
    let rows = report["rows"].as_array().unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(rows.len(), 8, "{methods:?}");
    for (i, wanted) in [
        "zero-shot, small model",
        "LoRA on the small model",
        "zero-shot, large model",
        "LoRA on the large model",
        "QLoRA-style LoRA on the large model",
        "adapter on the emulator itself",
        "corrected, merged into the original",
        "uncorrected, merged into the original",
    ]
    .iter()
    .enumerate()
    {
        assert!(methods[i].contains(wanted), "row {i}: {methods:?}");
    }
    let sizing = &report["sizing"];
    let budget = sizing["budget_bytes"].as_u64().unwrap();
    assert_eq!(Some(budget), rows[1]["finetune_bytes"].as_u64(), "{sizing}");
    let max_params = sizing["max_params"].as_u64().unwrap();
    // The QLoRA-style model holds fewer bytes (its projections in their blocks) and computes
    // the same values: its training starts from the original's loss.
    assert!(rows[4]["finetune_bytes"].as_u64() < rows[3]["finetune_bytes"].as_u64(), "{sizing}");
    let first_loss = |row: &serde_json::Value| row["training_loss"][0].as_f64().unwrap();
    assert!((first_loss(&rows[4]) - first_loss(&rows[3])).abs() < 1e-4, "{methods:?}");
    assert!(dir.path().join("scale/adapter-large-qlora/adapter_config.json").is_file());
    let ratio = rows[5]["ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio <= sizing["ratio_head_dense"].as_f64().unwrap(), "{sizing}");
    for row in &rows[5..] {
        assert!(row["trained_model_params"].as_u64().unwrap() <= max_params, "{row} {sizing}");
    }
    assert!(dir.path().join("scale/adapter-small-lora/adapter_config.json").is_file());
    assert!(dir.path().join(format!("scale/adapter-emloc-rho{ratio}-corrected")).is_dir());

    let missing = dir.path().join("nothing.gguf").display().to_string();
    let mut no_small = args.to_vec();
    no_small[6] = missing.as_str();
    fails_with(&no_small, "fetch_qwen_coder.sh 0.5b");
    fails_with(&[&args[..], &["--data", "x.jsonl"]].concat(), "for the other recipes");
    fails_with(
        &["run", "--recipe", "smollm2-bigbench", "--small-model", model.as_str()],
        "--small-model is for --recipe qwen-coder-scale",
    );
}

#[test]
fn bench_step_on_a_decoder_times_the_bigbench_step_and_names_a_missing_peer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench").display().to_string();
    let model = fixture("tiny_llama").display().to_string();
    let base = [
        "bench-step",
        "--model",
        &model,
        "--max-seq-length",
        "24",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--calibration-pairs",
        "2",
        "--out",
        &out,
    ];
    let table = ok(&[&base[..], &["--no-peer"]].concat());
    assert!(table.contains("| emloc, LoRA on the full model |"), "{table}");
    let report = read_json(dir.path().join("bench/report.json"));
    assert_eq!(report["batch_size"], 2, "{report}");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{report}");
    assert!(rows[2]["method"].as_str().unwrap().ends_with("gradient checkpointing"), "{report}");
    for row in rows {
        assert_eq!(row["step_seconds"].as_array().unwrap().len(), 2, "{row}");
        assert!(row["first_loss"].as_f64().unwrap().is_finite(), "{row}");
    }
    // The emulator's two rows start from the same adapter on the same batch: checkpointing
    // changes no value (no dropout in a Llama).
    let (plain, checkpointed) =
        (rows[1]["first_loss"].as_f64().unwrap(), rows[2]["first_loss"].as_f64().unwrap());
    assert!((plain - checkpointed).abs() < 1e-4 * plain.abs().max(1.0), "{report}");
    fails_with(&[&base[..], &["--python", "/nonexistent/python3"]].concat(), "--no-peer");
}
