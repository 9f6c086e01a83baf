//! The command-line pipeline end to end on the tiny BERT fixture: emulate → finetune (with
//! checkpoints) → correct → merge → eval, and the bad-input paths (typed message, exit code ≠ 0,
//! nothing written).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    command, copy_tiny_bert, correct_args, emloc, fails_with, ok, read_json,
    write_retrieval_data as write_data,
};

fn fixture() -> PathBuf {
    common::fixture("tiny_bert")
}

#[test]
fn pipeline_stages_chain_and_merged_equals_unmerged() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    write_data(&dir.path().join("data.jsonl"));
    let model = fixture().display().to_string();
    let common = [
        "--model",
        &model,
        "--data",
        &p("data.jsonl"),
        "--validation",
        "8",
        "--max-seq-length",
        "12",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        common.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |cmd: &str, extra: &[&str]| {
        let mut args = vec![cmd.to_string()];
        args.extend(with(extra));
        ok(&args)
    };

    run("emulate", &["--ratio", "0.5", "--calibration-pairs", "8", "--out", &p("emulator")]);
    assert!(dir.path().join("emulator/emulator.safetensors").is_file());
    // emulator.json records what built it: the model's files and the data, by content
    // (checked against coreutils' sha256sum), and how calibration samples were drawn.
    let description = read_json(dir.path().join("emulator/emulator.json"));
    let provenance = &description["provenance"];
    let sha256sum = |path: &Path| -> String {
        let out = Command::new("sha256sum").arg(path).output().expect("sha256sum runs");
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
    };
    let files: Vec<(String, String)> = provenance["model"]
        .as_array()
        .unwrap()
        .iter()
        .chain(provenance["data"].as_array().unwrap())
        .map(|f| {
            (f["path"].as_str().unwrap().to_string(), f["sha256"].as_str().unwrap().to_string())
        })
        .collect();
    let names: Vec<&str> = files.iter().map(|(path, _)| path.rsplit('/').next().unwrap()).collect();
    assert_eq!(names, ["config.json", "model.safetensors", "data.jsonl"], "{provenance}");
    for (path, sha) in &files {
        assert_eq!(*sha, sha256sum(Path::new(path)), "{path}");
    }
    assert_eq!(
        provenance["selection"],
        serde_json::json!({"validation": 8, "split_seed": 0, "calibration_pairs": 8})
    );
    // ... so it is refused beside another model (one weight bit flipped), before any work.
    let other = dir.path().join("other-model");
    copy_tiny_bert(&other);
    let mut weights = std::fs::read(fixture().join("model.safetensors")).unwrap();
    *weights.last_mut().unwrap() ^= 1;
    std::fs::write(other.join("model.safetensors"), weights).unwrap();
    let other = other.display().to_string();
    let refused = "the emulator was built from";
    fails_with(
        &[
            "finetune",
            "--model",
            &other,
            "--data",
            &p("data.jsonl"),
            "--validation",
            "8",
            "--max-seq-length",
            "12",
            "--emulator",
            &p("emulator"),
            "--out",
            &p("refused"),
        ],
        refused,
    );
    let train = [
        "--steps",
        "4",
        "--batch-size",
        "4",
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
    let mut extra = vec!["--emulator", &emulator, "--checkpoint-every", "2", "--out", &adapter];
    extra.extend(train);
    run("finetune", &extra);
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint-2/adapter_model.safetensors",
        "checkpoint-4/adapter_config.json",
        "report.json",
    ] {
        assert!(dir.path().join("adapter").join(file).is_file(), "{file}");
    }
    let report = read_json(dir.path().join("adapter/report.json"));
    assert!(report["wall_seconds"].as_f64().unwrap() > 0.0, "{report}");
    // The tiny model's weights alone are ~30 KB; a training run's heap peak must exceed them.
    assert!(report["peak_heap_bytes"].as_u64().unwrap() > 30_000, "{report}");

    let max_seq_length = ["--max-seq-length", "12"];
    fails_with(&correct_args(&other, &emulator, &adapter, &p("refused"), &max_seq_length), refused);
    assert!(!dir.path().join("refused").exists());
    ok(&correct_args(&model, &emulator, &adapter, &p("corrected"), &max_seq_length));
    // PEFT's AutoPeftModelForFeatureExtraction needs the base model and the task type.
    for stage in ["adapter", "corrected"] {
        let config = read_json(dir.path().join(stage).join("adapter_config.json"));
        assert_eq!(config["task_type"], "FEATURE_EXTRACTION", "{stage}: {config}");
        let canonical = std::fs::canonicalize(&model).unwrap().display().to_string();
        assert_eq!(config["base_model_name_or_path"], canonical.as_str(), "{stage}: {config}");
    }
    ok(&["merge", "--model", &model, "--adapter", &p("corrected"), "--out", &p("merged")]);
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(dir.path().join("merged").join(file).is_file(), "{file}");
    }

    let merged_dir = p("merged");
    let metrics = |args: Vec<String>| -> serde_json::Value {
        let mut all = vec!["eval".to_string()];
        all.extend(args);
        serde_json::from_str(&ok(&all)).unwrap()
    };
    let merged = metrics(
        with(&[]).into_iter().map(|s| if s == model { merged_dir.clone() } else { s }).collect(),
    );
    let unmerged = metrics(with(&["--adapter", &p("corrected")]));
    let base = metrics(with(&[]));
    for m in [&merged, &unmerged, &base] {
        assert_eq!(m["queries"], 8);
        assert!(m["loss"].as_f64().unwrap().is_finite());
    }
    let (a, b) = (merged["loss"].as_f64().unwrap(), unmerged["loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "merged {a} vs unmerged {b}");
    assert_eq!(merged["recall_at_1"], unmerged["recall_at_1"]);
    assert_ne!(merged["loss"], base["loss"], "the adapter must change the model");
}

/// `--device wgpu` (Mesa's lavapipe in CI) against the CPU: the same adapter and the same emulator
/// (built on wgpu, so calibration runs emloc's Gram kernel) evaluate to the same metrics within
/// 1e-4. Training is only checked to run there: LoRA's initialisation and the dropout masks come
/// from each backend's own generator, so the two devices train different draws.
/// Skipped, saying so, in a build without `emloc/wgpu`.
#[test]
fn stages_on_wgpu_evaluate_like_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    write_data(&dir.path().join("data.jsonl"));
    let model = fixture().display().to_string();
    let data = p("data.jsonl");
    let run = |cmd: &str, device: &str, extra: &[&str]| -> String {
        let mut args = vec![cmd, "--model", &model, "--data", &data, "--validation", "8"];
        args.extend(["--max-seq-length", "12", "--device", device]);
        args.extend(extra);
        ok(&args)
    };
    let probe = emloc(&[
        "eval",
        "--model",
        &model,
        "--data",
        &data,
        "--validation",
        "8",
        "--device",
        "wgpu",
    ]);
    if String::from_utf8_lossy(&probe.stderr).contains("is not in this build") {
        eprintln!("SKIPPED: this build has no wgpu (test with --features emloc/wgpu)");
        return;
    }
    run("finetune", "cpu", &["--steps", "3", "--out", &p("lora")]);
    run("emulate", "wgpu", &["--ratio", "0.5", "--calibration-pairs", "8", "--out", &p("emu")]);
    run("finetune", "wgpu", &["--emulator", &p("emu"), "--steps", "2", "--out", &p("lora-emu")]);
    let metrics = |text: String| -> serde_json::Value { serde_json::from_str(&text).unwrap() };
    for extra in [vec!["--adapter", &p("lora")], vec!["--emulator", &p("emu")]] {
        let (cpu, wgpu) =
            (metrics(run("eval", "cpu", &extra)), metrics(run("eval", "wgpu", &extra)));
        for key in ["recall_at_1", "recall_at_5", "mrr", "loss"] {
            let (a, b) = (cpu[key].as_f64().unwrap(), wgpu[key].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4, "{extra:?} {key}: cpu {a} vs wgpu {b}");
        }
    }
}

#[test]
fn bad_inputs_fail_with_a_message_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let model = fixture().display().to_string();
    write_data(&dir.path().join("data.jsonl"));
    let mut text = std::fs::read_to_string(dir.path().join("data.jsonl")).unwrap();
    text.push_str("\n{\"question\": \"q\"}\n");
    std::fs::write(dir.path().join("bad.jsonl"), text).unwrap();

    let base = ["--model", &model, "--validation", "8", "--max-seq-length", "12"];
    let args = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let call = |cmd: &str, extra: &[&str], needle: &str| {
        let mut all = vec![cmd.to_string()];
        all.extend(args(extra));
        fails_with(&all, needle);
    };
    call(
        "emulate",
        &["--data", &p("bad.jsonl"), "--out", &p("e1")],
        "bad.jsonl:41: missing field `answer`",
    );
    call(
        "emulate",
        &["--data", &p("data.jsonl"), "--ratio", "1.5", "--out", &p("e2")],
        "keep-ratio 1.5",
    );
    call(
        "emulate",
        &["--data", &p("data.jsonl"), "--calibration-pairs", "0", "--out", &p("e3")],
        "--calibration-pairs 0",
    );
    call(
        "finetune",
        &["--data", &p("data.jsonl"), "--emulator", &p("nowhere"), "--out", &p("f1")],
        "emulator.json",
    );
    call(
        "finetune",
        &["--data", &p("data.jsonl"), "--batch-size", "1", "--out", &p("f2")],
        "batch_size must be at least 2",
    );
    fails_with(
        &["merge", "--model", &model, "--adapter", &p("nowhere"), "--out", &p("m1")],
        "adapter_config.json",
    );
    fails_with(&["eval", "--model", &p("nowhere")], "no config.json");
    for out in ["e1", "e2", "e3", "f1", "f2", "m1"] {
        assert!(!dir.path().join(out).exists(), "{out} must not be created by a failing command");
    }
}

#[test]
fn resumed_training_equals_an_uninterrupted_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    write_data(&dir.path().join("data.jsonl"));
    let model = fixture().display().to_string();
    let data = p("data.jsonl");
    // `extra` options replace the defaults of the same name (clap refuses repeated options).
    let finetune = |out: &str, extra: &[&str]| -> Output {
        let defaults = [
            ("--model", model.as_str()),
            ("--data", &data),
            ("--validation", "8"),
            ("--max-seq-length", "12"),
            ("--steps", "5"),
            ("--batch-size", "4"),
            ("--rank", "2"),
            ("--alpha", "4"),
            ("--warmup-steps", "1"),
            ("--seed", "3"),
            ("--checkpoint-every", "2"),
            ("--lr", "0.01"),
            ("--out", out),
        ];
        let mut args = vec!["finetune"];
        for (flag, value) in defaults.iter().filter(|(flag, _)| !extra.contains(flag)) {
            args.extend([*flag, *value]);
        }
        args.extend_from_slice(extra);
        emloc(&args)
    };
    let weights =
        |out: &str| std::fs::read(Path::new(out).join("adapter_model.safetensors")).unwrap();
    let (first, second) = (p("first"), p("second"));
    assert!(finetune(&first, &[]).status.success());
    assert!(finetune(&second, &[]).status.success());
    assert!(weights(&first) == weights(&second), "the same seed twice must give the same adapter");

    // Interrupt `second` after step 2: only checkpoint-2 survives.
    for name in ["checkpoint-4", "adapter_model.safetensors", "adapter_config.json", "report.json"]
    {
        let path = dir.path().join("second").join(name);
        if path.is_dir() {
            std::fs::remove_dir_all(path).unwrap()
        } else {
            std::fs::remove_file(path).unwrap()
        }
    }
    let changed = finetune(&second, &["--resume", "--lr", "0.02"]);
    assert!(
        !changed.status.success()
            && String::from_utf8_lossy(&changed.stderr).contains("other training options")
    );
    // Other inputs than the checkpoint's (by content) are refused, naming which; so is a fresh
    // run that would overwrite the checkpoints.
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(p("other.jsonl"), format!("{text}\n{}\n", text.lines().next().unwrap()))
        .unwrap();
    let refused = |extra: &[&str], needle: &str| {
        let out = finetune(&second, extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle),
            "expected `{needle}` in: {stderr}"
        );
    };
    refused(
        &["--resume", "--data", &p("other.jsonl")],
        "resuming on other inputs than the checkpoint's: --data",
    );
    refused(&["--resume", "--split-seed", "1"], "the data split");
    refused(&[], "pass --resume to continue it");
    let resumed = finetune(&second, &["--resume"]);
    assert!(resumed.status.success());
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("(step 2)"));
    assert!(
        weights(&first) == weights(&second),
        "a resumed run must end where an uninterrupted one does"
    );
    assert!(
        !finetune(&p("empty"), &["--resume"]).status.success(),
        "--resume without a checkpoint fails"
    );

    // A longer --steps extends the run from its latest checkpoint; a shorter one than that
    // checkpoint is refused.
    let extended = finetune(&second, &["--resume", "--steps", "7"]);
    assert!(
        extended.status.success() && String::from_utf8_lossy(&extended.stderr).contains("(step 4)")
    );
    assert!(Path::new(&second).join("checkpoint-6/trainer_state.json").is_file());
    refused(&["--resume", "--steps", "3"], "past --steps 3");
}

#[test]
fn killing_a_run_midway_loses_nothing_and_resume_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    write_data(&dir.path().join("data.jsonl"));
    let (model, data) = (fixture().display().to_string(), p("data.jsonl"));
    let args = |out: &str| -> Vec<String> {
        [
            "finetune",
            "--model",
            &model,
            "--data",
            &data,
            "--validation",
            "8",
            "--max-seq-length",
            "12",
            "--steps",
            "40",
            "--batch-size",
            "4",
            "--rank",
            "2",
            "--alpha",
            "4",
            "--lr",
            "0.01",
            "--warmup-steps",
            "2",
            "--seed",
            "5",
            "--checkpoint-every",
            "1",
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let weights =
        |out: &str| std::fs::read(Path::new(out).join("adapter_model.safetensors")).unwrap();
    let reference = p("reference");
    assert!(emloc(&args(&reference)).status.success());

    // SIGKILL the same run part-way through; no cleanup code of ours runs.
    let killed = p("killed");
    let mut child = command(args(&killed)).stderr(std::process::Stdio::null()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let _ = child.kill();
    child.wait().unwrap();

    // Every checkpoint that exists is complete; only temporary names may be partial.
    let mut checkpoints = 0;
    for entry in std::fs::read_dir(&killed).into_iter().flatten() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") {
            checkpoints += 1;
            for file in [
                "adapter_config.json",
                "adapter_model.safetensors",
                "optimizer.bpk",
                "trainer_state.json",
            ] {
                assert!(
                    entry.path().join(file).is_file(),
                    "{name}/{file} missing: a checkpoint was half written"
                );
            }
        }
    }
    eprintln!("killed after {checkpoints} checkpoints");
    let finished = Path::new(&killed).join("report.json").is_file();
    if !finished {
        let mut again = args(&killed);
        if checkpoints > 0 {
            again.push("--resume".into());
        }
        assert!(emloc(&again).status.success());
    }
    assert!(
        weights(&killed) == weights(&reference),
        "the finished run must equal the uninterrupted one"
    );
}

#[test]
fn bench_memory_measures_every_phase_in_its_own_process() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("llama");
    let tiny_llama = [
        "--llama-layers",
        "2",
        "--llama-hidden",
        "64",
        "--llama-intermediate",
        "160",
        "--llama-heads",
        "4",
        "--llama-kv-heads",
        "2",
        "--llama-vocab",
        "97",
        "--seq-len",
        "12",
        "--calibration-sequences",
        "3",
    ];
    let mut args =
        vec!["bench-memory", "--model-kind", "llama", "--batch-size", "2", "--steps", "4", "--out"];
    let out_arg = out.display().to_string();
    args.push(&out_arg);
    args.extend(tiny_llama);
    let table = ok(&args);
    assert!(table.contains("| LoRA fine-tuning on the emulator |"), "{table}");
    let report = read_json(out.join("report.json"));
    let phases = report["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 4);
    for phase in phases {
        assert!(phase["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{phase}");
        assert!(phase["peak_heap_bytes"].as_u64().unwrap() > 0, "{phase}");
    }
    // Both fine-tuning phases really train (one fixed batch: the loss must fall).
    for phase in &phases[2..] {
        let losses = phase["losses"].as_array().unwrap();
        let (first, last) = (losses[0].as_f64().unwrap(), losses[1].as_f64().unwrap());
        assert!(last.is_finite() && last < first, "{phase}");
    }
    let emulator = read_json(out.join("emulator/emulator.json"));
    assert_eq!(emulator["report"]["layers"].as_array().unwrap().len(), 2 * 7);

    // A Llama read from a checkpoint: every phase, streaming construction included, which
    // builds the same emulator as the in-memory phase, bit for bit.
    let from_file = dir.path().join("llama-file");
    let (model, file_out) =
        (common::fixture("tiny_llama").display().to_string(), from_file.display().to_string());
    let table = ok(&[
        "bench-memory",
        "--model-kind",
        "llama",
        "--model",
        &model,
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--seq-len",
        "12",
        "--calibration-sequences",
        "3",
        "--out",
        &file_out,
    ]);
    assert!(table.contains("| emulator construction, streaming |"), "{table}");
    assert_eq!(read_json(from_file.join("report.json"))["phases"].as_array().unwrap().len(), 5);
    // The tensors, not the bytes: the safetensors header's metadata order varies by process.
    let factors = |name: &str| emloc::emulator::read_emulator(&from_file.join(name)).unwrap().1;
    assert!(factors("emulator") == factors("emulator-streaming"));
    fails_with(
        &[
            "bench-memory",
            "--model-kind",
            "llama",
            "--phases",
            "emulate-streaming",
            "--out",
            &file_out,
        ],
        "needs --model-kind llama and --model",
    );

    // MiniLM's path on the tiny BERT fixture, and bad input before any work.
    write_data(&dir.path().join("data.jsonl"));
    let (model, data, bert_out) = (
        fixture().display().to_string(),
        dir.path().join("data.jsonl").display().to_string(),
        dir.path().join("bert").display().to_string(),
    );
    let common = [
        "--model",
        &model,
        "--data",
        &data,
        "--validation",
        "8",
        "--max-seq-length",
        "12",
        "--calibration-pairs",
        "8",
    ];
    let mut args = vec!["bench-memory", "--batch-size", "4", "--steps", "2", "--out", &bert_out];
    args.extend(common);
    ok(&args);
    assert!(Path::new(&bert_out).join("report.json").is_file());
    fails_with(&["bench-memory", "--ratio", "1.5", "--out", &bert_out], "--ratio 1.5");
}

#[test]
fn plan_measure_builds_and_fine_tunes_the_plan_in_child_processes() {
    let dir = tempfile::tempdir().unwrap();
    write_data(&dir.path().join("data.jsonl"));
    let (model, data, rules) = (
        fixture().display().to_string(),
        dir.path().join("data.jsonl").display().to_string(),
        dir.path().join("rules.json").display().to_string(),
    );
    let table = ok(&[
        "plan",
        "--model",
        &model,
        "--data",
        &data,
        "--validation",
        "8",
        "--calibration-pairs",
        "8",
        "--seq-len",
        "12",
        "--max-seq-length",
        "12",
        "--batch",
        "4",
        "--out",
        &rules,
        "--measure",
    ]);
    assert!(table.contains("| fine-tuning the global plan |"), "{table}");
    // The measured emulator is the plan's: its layers have the ranks the rules file gives.
    let emulator = read_json(dir.path().join("rules.measured/emulator/emulator.json"));
    let rules = read_json(&rules);
    assert_eq!(emulator["config"]["rules"], rules["rules"]);
}

#[test]
fn bench_layer_times_both_variants() {
    let table =
        ok(&["bench-layer", "--d-in", "48", "--d-out", "40", "--tokens", "30", "--repeats", "3"]);
    assert!(
        table.contains("| dense frozen layer + LoRA |")
            && table.contains("| emulator layer (ρ 0.4, rank 8) + LoRA |"),
        "{table}"
    );
    // Burn's default device: wgpu in the test build, so the emulator layer runs the fused kernel.
    let output = command([
        "bench-layer",
        "--device",
        "auto",
        "--d-in",
        "48",
        "--d-out",
        "40",
        "--tokens",
        "30",
        "--repeats",
        "1",
    ])
    .env("BURN_DEVICE", "wgpu")
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stderr.contains("Wgpu"), "{stderr}");
}

#[test]
fn bench_step_times_every_row_and_names_a_missing_peer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench").display().to_string();
    let model = fixture().display().to_string();
    let base = [
        "bench-step",
        "--model",
        &model,
        "--max-seq-length",
        "12",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--calibration-pairs",
        "4",
        "--out",
        &out,
    ];
    let table = ok(&[&base[..], &["--no-peer"]].concat());
    assert!(table.contains("| emloc, LoRA on the full model |"), "{table}");
    let report = read_json(dir.path().join("bench/report.json"));
    let rows = report["rows"].as_array().unwrap();
    // Full model, emulator, and the emulator checkpointed as `finetune` runs it by default.
    assert_eq!(rows.len(), 3, "{report}");
    assert!(rows[2]["method"].as_str().unwrap().ends_with("gradient checkpointing"), "{report}");
    for row in rows {
        assert_eq!(row["step_seconds"].as_array().unwrap().len(), 3, "{row}");
        assert!(row["median_step_seconds"].as_f64().unwrap() > 0.0);
    }
    // A peer that cannot run is an error that says how to skip it, after emloc's rows.
    fails_with(&[&base[..], &["--python", "/nonexistent/python3"]].concat(), "--no-peer");
}
