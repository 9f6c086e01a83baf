//! The command-line pipeline on classification data with the tiny BERT fixture: the task is
//! inferred from `{"input", "label"}` fields, emulate → finetune → correct → merge → eval chain,
//! `eval` prints accuracy, macro-F1 and loss, and the merged model scores as the unmerged one.

mod common;

use std::path::{Path, PathBuf};

use common::{correct_args, fails_with, ok, read_json};

fn fixture() -> PathBuf {
    common::fixture("tiny_bert")
}

/// 48 sentences whose animal decides the label (colours from the fixture's vocabulary).
fn write_data(path: &Path) {
    let mut lines = Vec::new();
    for i in 0..48usize {
        let (animal, label) = [("cat", "red"), ("dog", "blue"), ("bird", "green")][i % 3];
        let place = ["mat", "park", "tree", "house"][(i / 3) % 4];
        let size = ["big", "small"][(i / 12) % 2];
        let choices = ["red", "blue", "green"];
        lines.push(serde_json::json!({"input": format!("the {size} {animal} sat on the {place} ."), "label": label, "choices": choices}).to_string());
    }
    std::fs::write(path, lines.join("\n")).unwrap();
}

#[test]
fn classification_stages_chain_and_eval_prints_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    write_data(&dir.path().join("data.jsonl"));
    let model = fixture().display().to_string();
    let data = p("data.jsonl");
    let common = [
        "--data",
        data.as_str(),
        "--validation",
        "12",
        "--max-seq-length",
        "12",
        "--label-template",
        "{label}",
    ];
    let args = |cmd: &str, model: &str, extra: &[&str]| -> Vec<String> {
        [cmd, "--model", model].iter().chain(&common).chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |v: Vec<String>| ok(&v);

    run(args(
        "emulate",
        &model,
        &["--ratio", "0.5", "--calibration-pairs", "8", "--out", &p("emulator")],
    ));
    // The label descriptions are part of the task: emulator.json (and checkpoints) record them.
    let description = read_json(dir.path().join("emulator/emulator.json"));
    assert_eq!(
        description["provenance"]["selection"]["label_template"], "{label}",
        "{description}"
    );
    let train = [
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--rank",
        "2",
        "--alpha",
        "4",
        "--lr",
        "0.01",
        "--warmup-steps",
        "1",
    ];
    let (emulator, adapter) = (p("emulator"), p("adapter"));
    let mut extra = vec!["--emulator", emulator.as_str(), "--out", adapter.as_str()];
    extra.extend(train);
    run(args("finetune", &model, &extra));
    ok(&correct_args(&model, &emulator, &adapter, &p("corrected"), &["--max-seq-length", "12"]));
    ok(&["merge", "--model", &model, "--adapter", &p("corrected"), "--out", &p("merged")]);

    let eval = |v: Vec<String>| -> serde_json::Value { serde_json::from_str(&run(v)).unwrap() };
    let base = eval(args("eval", &model, &[]));
    let merged = eval(args("eval", &p("merged"), &[]));
    let unmerged = eval(args("eval", &model, &["--adapter", &p("corrected")]));
    for m in [&base, &merged, &unmerged] {
        assert_eq!(m["examples"], 12, "{m}");
        let accuracy = m["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{m}");
        assert!(
            m["macro_f1"].as_f64().unwrap() <= 1.0 && m["loss"].as_f64().unwrap().is_finite(),
            "{m}"
        );
        let support: u64 =
            m["per_class"].as_array().unwrap().iter().map(|c| c["support"].as_u64().unwrap()).sum();
        assert_eq!(support, 12, "{m}");
    }
    let labels: Vec<&str> = base["per_class"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["blue", "green", "red"]);
    let (a, b) = (merged["loss"].as_f64().unwrap(), unmerged["loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "merged {a} vs unmerged {b}");
    assert_eq!(merged["accuracy"], unmerged["accuracy"]);
    assert_ne!(merged["loss"], base["loss"], "the adapter must change the model");

    // --task retrieval overrides the inference, and then the data's fields are wrong for it.
    fails_with(
        &["eval", "--model", &model, "--data", &data, "--task", "retrieval"],
        "missing field `question`",
    );
    // Classification errors name the file and line.
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"input\": \"a cat\", \"label\": \"red\"}\n{\"input\": \"a dog\"}\n",
    )
    .unwrap();
    fails_with(
        &["eval", "--model", &model, "--data", &p("bad.jsonl"), "--validation", "1"],
        "bad.jsonl:2: missing field `label`",
    );
}

#[test]
fn run_prints_the_ten_rows_and_applies_only_the_recipe_defaults_not_given() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    write_data(&dir.path().join("data.jsonl"));
    let model = fixture().display().to_string();
    let args = [
        "run",
        "--model",
        &model,
        "--data",
        &p("data.jsonl"),
        "--validation",
        "12",
        "--max-seq-length",
        "12",
        "--label-template",
        "{label}",
        "--batch-size",
        "8",
        "--rank",
        "2",
        "--alpha",
        "4",
        "--calibration-pairs",
        "8",
        "--ratio",
        "0.5",
    ];
    let out = p("run");
    let table = ok(&[&args[..], &["--out", &out]].concat());
    let rows: Vec<&str> =
        table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| method")).collect();
    assert_eq!(rows.len(), 10, "{table}");
    for (row, name) in rows.iter().zip([
        "zero-shot",
        "LoRA on the full model",
        "EMLoC ρ = 0.5 corrected",
        "EMLoC ρ = 0.5 uncorrected",
        "EMLoC ρ = 0.5 data-weighted corrected,",
        "EMLoC ρ = 0.5 data-weighted corrected, no clamp",
        "plain-SVD",
        "global allocation",
        "layer drop (Offsite-Tuning), layers [0, 1] of 2",
        "structured pruning",
    ]) {
        assert!(row.starts_with(&format!("| {name}")), "{row}");
    }
    let report = read_json(dir.path().join("run/report.json"));
    // Given on the command line: kept. Not given: the recipe's (36 steps, 4 warmup steps).
    assert_eq!(
        (report["data"]["validation"].as_u64(), report["train"]["batch_size"].as_u64()),
        (Some(12), Some(8)),
        "{report}"
    );
    assert_eq!(
        (report["train"]["steps"].as_u64(), report["train"]["warmup_steps"].as_u64()),
        (Some(36), Some(4)),
        "{report}"
    );
    assert_eq!(report["validation_examples"], 12);
    assert_eq!(report["rows"].as_array().unwrap().len(), 10);
    assert!(report["inference_bytes"].as_u64().is_some_and(|b| b > 0), "{report}");
    for (i, row) in report["rows"].as_array().unwrap().iter().enumerate() {
        assert!(
            row["metrics"]["accuracy"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)),
            "{row}"
        );
        // Every trained row says what its fine-tuning needs against inference.
        assert_eq!(row["finetune_vs_inference"].as_f64().is_some_and(|x| x > 0.0), i > 0, "{row}");
        // Emulator rows (and layer drop) record their emulator before training.
        assert_eq!(row["emulator_before_training"].is_object(), i > 1, "{row}");
    }
    for adapter in [
        "adapter-layer-drop",
        "adapter-pruned",
        "adapter-emulator-whitened-weighted",
        "adapter-emulator-whitened-weighted-no-clamp",
    ] {
        assert!(dir.path().join("run").join(adapter).join("adapter_model.safetensors").is_file());
    }
    // Fewer rows, and the constructions at the headline emulator's size.
    let out = p("run-headline");
    let extra = [
        "--out",
        &out,
        "--rows",
        "headline",
        "--constructions",
        "sequential-refit,dense-last-down",
    ];
    let table = ok(&[&args[..], &extra].concat());
    let methods: Vec<&str> =
        table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| method")).collect();
    assert_eq!(methods.len(), 10, "{table}");
    assert!(methods[6].contains("sequential calibration + refit corrected"), "{table}");
    assert!(methods[9].contains("dense last FFN output uncorrected"), "{table}");
    assert!(!table.contains("plain-SVD") && !table.contains("layer drop"), "{table}");
}
