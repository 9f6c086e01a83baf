//! Faults while `emloc emulate`, `correct` and `merge` write their output: SIGKILL at several
//! points, a full disk, two runs racing for one `--out`, an `--out` that already holds files, and
//! `merge --out` inside the model directory (with symlinks, a FIFO, `.git`, other weight formats).
//! In every case `--out` is complete or absent, and a failure says why, naming the path.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    command, copy_tiny_bert, correct_args, emloc, fixture, ok, read_json, write_retrieval_data,
};

/// The inputs of the three stages on the tiny BERT fixture: data, an emulator and an adapter
/// trained on it (built once per test, by the stages themselves).
struct Inputs {
    dir: tempfile::TempDir,
}

impl Inputs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let inputs = Self { dir };
        write_retrieval_data(&inputs.path("data.jsonl"));
        ok(&inputs.args("emulate", &inputs.path("emulator")));
        let (model, data, emulator, adapter) = (
            Self::model(),
            inputs.arg("data.jsonl"),
            inputs.arg("emulator"),
            inputs.arg("adapter"),
        );
        ok(&[
            "finetune",
            "--model",
            &model,
            "--data",
            &data,
            "--validation",
            "8",
            "--max-seq-length",
            "12",
            "--emulator",
            &emulator,
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--rank",
            "2",
            "--alpha",
            "4",
            "--lr",
            "0.01",
            "--out",
            &adapter,
        ]);
        inputs
    }

    fn model() -> String {
        fixture("tiny_bert").display().to_string()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// The arguments of `stage` (emulate, correct or merge) writing to `out`.
    fn args(&self, stage: &str, out: &Path) -> Vec<String> {
        let (model, out) = (Self::model(), out.display().to_string());
        let (data, emulator, adapter) =
            (self.arg("data.jsonl"), self.arg("emulator"), self.arg("adapter"));
        let args: Vec<&str> = match stage {
            "emulate" => vec![
                "emulate",
                "--model",
                &model,
                "--data",
                &data,
                "--validation",
                "8",
                "--max-seq-length",
                "12",
                "--ratio",
                "0.5",
                "--calibration-pairs",
                "8",
                "--out",
                &out,
            ],
            "correct" => {
                correct_args(&model, &emulator, &adapter, &out, &["--max-seq-length", "12"])
            }
            "merge" => vec!["merge", "--model", &model, "--adapter", &adapter, "--out", &out],
            _ => unreachable!("{stage}"),
        };
        args.into_iter().map(str::to_string).collect()
    }

    fn spawn(&self, stage: &str, out: &Path) -> Child {
        command(self.args(stage, out)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    }

    fn run(&self, stage: &str, out: &Path) -> Output {
        emloc(&self.args(stage, out))
    }
}

/// A file's content, compared up to what legitimately differs between two runs: JSON files
/// without their `*_seconds` timings (`report.json`: just its stage), safetensors files as their
/// header (whose metadata order varies) and data.
#[derive(Debug, PartialEq)]
struct Content {
    json: Option<serde_json::Value>,
    bytes: Vec<u8>,
}

fn content(name: &str, bytes: Vec<u8>) -> Content {
    fn strip_timings(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                map.retain(|k, _| !k.ends_with("_seconds"));
                map.values_mut().for_each(strip_timings);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip_timings),
            _ => {}
        }
    }
    if name.ends_with("report.json") {
        let report: serde_json::Value = serde_json::from_slice(&bytes).expect("report.json parses");
        return Content { json: Some(report["stage"].clone()), bytes: Vec::new() };
    }
    if name.ends_with(".json") {
        let mut json: serde_json::Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        strip_timings(&mut json);
        return Content { json: Some(json), bytes: Vec::new() };
    }
    if name.ends_with(".safetensors") {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header =
            serde_json::from_slice(&bytes[8..8 + n]).unwrap_or_else(|e| panic!("{name}: {e}"));
        return Content { json: Some(header), bytes: bytes[8 + n..].to_vec() };
    }
    Content { json: None, bytes }
}

/// Every file under `dir`: relative path → content.
fn files(dir: &Path) -> BTreeMap<String, Content> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Content>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
                continue;
            }
            let name = path.strip_prefix(root).unwrap().display().to_string();
            let bytes = std::fs::read(&path).unwrap();
            out.insert(name.clone(), content(&name, bytes));
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Asserts that `dir` holds the same files as `reference`, naming those that differ.
fn assert_same(dir: &Path, reference: &BTreeMap<String, Content>, what: &str) {
    let got = files(dir);
    let names = |m: &BTreeMap<String, Content>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(reference), "{what}: the files of {}", dir.display());
    let differing: Vec<&String> =
        got.iter().filter(|(k, v)| reference[*k] != **v).map(|(k, _)| k).collect();
    assert!(differing.is_empty(), "{what}: {differing:?} differ in {}", dir.display());
}

/// Names in `dir` other than the hidden staging directories a SIGKILL may leave.
fn visible(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".emloc-"))
        .collect();
    names.sort();
    names
}

fn staging_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".emloc-"))
        .collect()
}

/// Polls `ready` every half millisecond for up to 20 s.
fn wait_for(mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    false
}

/// Waits for `child` at most `limit`, killing it (and failing the test) if it runs longer.
fn finish_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "{what} still running after {limit:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn sigkill_leaves_out_absent_or_complete() {
    let inputs = Inputs::new();
    for stage in ["emulate", "correct", "merge"] {
        let reference_dir = inputs.path(&format!("{stage}-reference"));
        assert!(inputs.run(stage, &reference_dir).status.success());
        let reference = files(&reference_dir);
        assert!(reference.contains_key("report.json"), "{stage}: {:?}", reference.keys());
        let again = inputs.path(&format!("{stage}-again"));
        assert!(inputs.run(stage, &again).status.success());
        assert_same(&again, &reference, &format!("{stage}: a second run"));

        // Kill after fixed delays, when the staging directory appears, and when its first file does.
        let mut killed_while_staging = 0;
        for (i, when) in
            ["0", "5", "20", "60", "150", "staging", "staged-file"].into_iter().enumerate()
        {
            let parent = inputs.path(&format!("{stage}-kill-{i}"));
            std::fs::create_dir(&parent).unwrap();
            let out = parent.join("out");
            let mut child = inputs.spawn(stage, &out);
            match when {
                "staging" => {
                    assert!(wait_for(|| !staging_dirs(&parent).is_empty() || out.exists()))
                }
                "staged-file" => assert!(wait_for(|| out.exists()
                    || staging_dirs(&parent)
                        .iter()
                        .any(|s| std::fs::read_dir(s).is_ok_and(|mut d| d.next().is_some())))),
                ms => std::thread::sleep(Duration::from_millis(ms.parse().unwrap())),
            }
            child.kill().unwrap();
            let status = child.wait().unwrap();
            let leftovers = staging_dirs(&parent);
            killed_while_staging += usize::from(!leftovers.is_empty());
            eprintln!(
                "{stage} killed at {when}: {status}, out exists: {}, staging left: {leftovers:?}",
                out.exists()
            );
            assert!(
                visible(&parent).iter().all(|n| n == "out"),
                "{stage} at {when}: {:?}",
                visible(&parent)
            );
            if out.exists() {
                assert_same(&out, &reference, &format!("{stage} killed at {when}"));
            }
            // A rerun after the kill works (the leftover staging directory is in nobody's way).
            if !out.exists() {
                assert!(inputs.run(stage, &out).status.success());
                assert_same(&out, &reference, &format!("{stage} rerun after a kill at {when}"));
            }
        }
        assert!(
            killed_while_staging > 0,
            "{stage}: no kill landed while the output was being written"
        );
    }
}

/// A tmpfs mount, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(path).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_clearly_and_leaves_nothing() {
    let inputs = Inputs::new();
    let mount = inputs.path("small-disk");
    // 8 KiB: room for the staging directory and small JSON files, not for the weights.
    let disk = match Tmpfs::mount(&mount, "8k") {
        Ok(disk) => disk,
        Err(e) => {
            eprintln!(
                "skipped: cannot mount a tmpfs to fill ({e}); run as root to test a full disk"
            );
            return;
        }
    };
    for stage in ["emulate", "correct", "merge"] {
        let fits = inputs.path(&format!("{stage}-fits"));
        assert!(inputs.run(stage, &fits).status.success());
        let size: u64 =
            std::fs::read_dir(&fits).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        let out = disk.0.join(stage);
        let output = inputs.run(stage, &out);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            panic!(
                "{stage} ({size} bytes of output) fit in 8 KiB; make the fixture output larger or the disk smaller"
            );
        }
        assert_eq!(output.status.code(), Some(1), "{stage}: a typed error, not a panic: {stderr}");
        assert!(stderr.contains("No space left on device"), "{stage}: {stderr}");
        assert!(
            stderr.contains(&format!("{}", disk.0.display())),
            "{stage}: the path is named: {stderr}"
        );
        assert!(!out.exists(), "{stage}: a partial --out on a full disk");
        assert!(
            staging_dirs(&disk.0).is_empty(),
            "{stage}: staging left: {:?}",
            staging_dirs(&disk.0)
        );
    }
    drop(disk);
}

#[test]
fn two_runs_on_one_out_one_wins_and_its_output_is_intact() {
    let inputs = Inputs::new();
    for stage in ["emulate", "merge"] {
        let reference = inputs.path(&format!("{stage}-reference"));
        assert!(inputs.run(stage, &reference).status.success());
        let parent = inputs.path(&format!("{stage}-race"));
        std::fs::create_dir(&parent).unwrap();
        let out = parent.join("out");
        let children = [inputs.spawn(stage, &out), inputs.spawn(stage, &out)];
        let outputs: Vec<Output> = children
            .into_iter()
            .map(|c| finish_within(c, Duration::from_secs(120), stage))
            .collect();
        let winners = outputs.iter().filter(|o| o.status.success()).count();
        assert_eq!(winners, 1, "{stage}: exactly one run succeeds");
        let loser = outputs.iter().find(|o| !o.status.success()).unwrap();
        let stderr = String::from_utf8_lossy(&loser.stderr);
        eprintln!("{stage} race, the loser said: {stderr}");
        assert!(
            stderr.contains("written by another process")
                || stderr.contains("already exists and is not empty"),
            "{stage}: {stderr}"
        );
        assert!(
            stderr.contains(&out.display().to_string()),
            "{stage}: the path is named: {stderr}"
        );
        assert_same(&out, &files(&reference), &format!("{stage}: the winner's output"));
        assert_eq!(visible(&parent), ["out"]);
        assert!(
            staging_dirs(&parent).is_empty(),
            "{stage}: the loser's staging directory is removed"
        );

        // The rename collision itself, made certain: `out` appears while the run is staging.
        let mut collided = false;
        for attempt in 0..5 {
            let out = parent.join(format!("taken-{attempt}"));
            let child = inputs.spawn(stage, &out);
            assert!(wait_for(|| !staging_dirs(&parent).is_empty() || out.exists()));
            if std::fs::create_dir(&out).is_err() {
                finish_within(child, Duration::from_secs(120), stage);
                continue; // the run finished first; try again
            }
            std::fs::write(out.join("theirs"), b"another run's file").unwrap();
            let output = finish_within(child, Duration::from_secs(120), stage);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{stage}: renamed onto a non-empty directory");
            assert!(
                stderr.contains("written by another process")
                    && stderr.contains(&out.display().to_string()),
                "{stderr}"
            );
            assert_eq!(visible(&out), ["theirs"], "{stage}: the other run's output is untouched");
            assert_eq!(std::fs::read(out.join("theirs")).unwrap(), b"another run's file");
            assert!(
                staging_dirs(&parent).is_empty(),
                "{stage}: staging removed after the failed rename"
            );
            collided = true;
            break;
        }
        assert!(collided, "{stage}: every run finished before `out` could be created");
    }
}

#[test]
fn an_existing_out_with_files_is_refused_and_an_empty_one_replaced() {
    let inputs = Inputs::new();
    let llama = fixture("tiny_llama").display().to_string();
    for stage in ["emulate", "correct", "merge"] {
        let out = inputs.path(&format!("{stage}-existing"));
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("mine.txt"), b"keep me").unwrap();
        let output = inputs.run(stage, &out);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stage} wrote into a non-empty --out");
        assert!(
            stderr.contains("already exists and is not empty")
                && stderr.contains(&out.display().to_string()),
            "{stderr}"
        );
        assert_eq!(visible(&out), ["mine.txt"]);
        assert_eq!(std::fs::read(out.join("mine.txt")).unwrap(), b"keep me");

        let file = inputs.path(&format!("{stage}-file"));
        std::fs::write(&file, b"a file").unwrap();
        let output = inputs.run(stage, &file);
        assert!(
            !output.status.success()
                && String::from_utf8_lossy(&output.stderr).contains("is not a directory")
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"a file");

        let empty = inputs.path(&format!("{stage}-empty"));
        std::fs::create_dir(&empty).unwrap();
        assert!(inputs.run(stage, &empty).status.success(), "{stage}: an empty --out is filled");
        assert!(empty.join("report.json").is_file());
    }
    assert!(staging_dirs(inputs.dir.path()).is_empty());

    // The decoder path stages too.
    let data = inputs.path("llama.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|i| serde_json::json!({"input": format!("the {} in the park", ["cat", "dog"][i % 2]), "target": "cat runs fast"}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = inputs.path("llama-existing");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), b"keep me").unwrap();
    let args = |out: &Path| {
        let (data, out) = (data.display().to_string(), out.display().to_string());
        emloc(&[
            "emulate",
            "--model",
            &llama,
            "--data",
            &data,
            "--validation",
            "4",
            "--ratio",
            "0.5",
            "--calibration-pairs",
            "4",
            "--out",
            &out,
        ])
    };
    let output = args(&out);
    assert!(
        !output.status.success()
            && String::from_utf8_lossy(&output.stderr).contains("already exists and is not empty")
    );
    assert_eq!(visible(&out), ["mine.txt"]);
    let fresh = inputs.path("llama-emulator");
    assert!(args(&fresh).status.success());
    assert!(fresh.join("emulator.safetensors").is_file() && fresh.join("report.json").is_file());
    assert!(staging_dirs(inputs.dir.path()).is_empty());
}

/// A copy of the tiny BERT fixture in `root/model`.
fn model_copy(root: &Path) -> PathBuf {
    let model = root.join("model");
    copy_tiny_bert(&model);
    model
}

/// `emloc merge` of the tiny adapter into `model`, killed (failing the test) after 30 s; returns
/// the written file names and the report.
fn merge_into(inputs: &Inputs, model: &Path, out: &Path) -> (Vec<String>, serde_json::Value) {
    let model = model.display().to_string();
    let child = command(["merge", "--model", &model, "--adapter", &inputs.arg("adapter")])
        .arg("--out")
        .arg(out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = finish_within(child, Duration::from_secs(30), "merge");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "merge failed: {stderr}");
    (files(out).into_keys().collect(), read_json(out.join("report.json")))
}

/// The names a merge report lists as skipped.
fn skipped(report: &serde_json::Value) -> Vec<&str> {
    let list = report["details"]["skipped"]
        .as_array()
        .unwrap_or_else(|| panic!("no skipped list: {report}"));
    list.iter().map(|s| s["name"].as_str().unwrap()).collect()
}

#[test]
fn merge_out_inside_the_model_directory_does_not_recurse() {
    let inputs = Inputs::new();
    let root = tempfile::tempdir().unwrap();
    let model = model_copy(root.path());
    let (written, report) = merge_into(&inputs, &model, &model.join("merged"));
    assert_eq!(written, ["config.json", "model.safetensors", "report.json", "tokenizer.json"]);
    assert!(skipped(&report).is_empty(), "{report}");
    // A second merge beside the first skips it.
    let (written, report) = merge_into(&inputs, &model, &model.join("merged-again"));
    assert_eq!(written, ["config.json", "model.safetensors", "report.json", "tokenizer.json"]);
    assert_eq!(skipped(&report), ["merged"]);
    assert!(staging_dirs(&model).is_empty());
    ok(&["embed", "--model", &model.join("merged").display().to_string(), "hello"]);
}

#[test]
fn merge_copies_model_files_not_other_weights_or_git() {
    let inputs = Inputs::new();
    let root = tempfile::tempdir().unwrap();
    let model = model_copy(root.path());
    for (rel, bytes) in [
        ("README.md", &b"# tiny"[..]),
        ("LICENSE.txt", b"MIT"),
        ("modules.json", b"[]"),
        ("1_Pooling/config.json", b"{\"pooling_mode_mean_tokens\": true}"),
        (".git/objects/ab/cdef", b"git object"),
        ("pytorch_model.bin", b"stale unmerged weights"),
        ("onnx/model.onnx", b"stale unmerged weights"),
        ("original/consolidated.00.pth", b"stale unmerged weights"),
    ] {
        let path = model.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let out = root.path().join("merged");
    let (written, report) = merge_into(&inputs, &model, &out);
    assert_eq!(
        written,
        [
            "1_Pooling/config.json",
            "LICENSE.txt",
            "README.md",
            "config.json",
            "model.safetensors",
            "modules.json",
            "report.json",
            "tokenizer.json"
        ]
    );
    assert_eq!(skipped(&report), [".git", "onnx", "original", "pytorch_model.bin"]);
    assert_ne!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(model.join("model.safetensors")).unwrap()
    );
}

#[test]
fn merge_never_follows_symlinked_directories_or_opens_special_files() {
    let inputs = Inputs::new();
    let root = tempfile::tempdir().unwrap();
    let model = model_copy(root.path());
    // A symlinked config file from elsewhere (the Hugging Face cache's layout) is copied as a file.
    let blobs = root.path().join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    std::fs::write(blobs.join("abc123"), b"{\"model_max_length\": 12}").unwrap();
    std::os::unix::fs::symlink(blobs.join("abc123"), model.join("tokenizer_config.json")).unwrap();
    // Symlinked directories: one loops, one leads out of the model.
    std::os::unix::fs::symlink(".", model.join("loop")).unwrap();
    std::os::unix::fs::symlink(&blobs, model.join("2_Dense")).unwrap();
    std::os::unix::fs::symlink(&blobs, model.join("special_tokens_map.json")).unwrap();
    // A FIFO with an allowed name would block a reader forever.
    assert!(Command::new("mkfifo").arg(model.join("vocab.txt")).status().unwrap().success());

    let out = root.path().join("merged");
    let (written, report) = merge_into(&inputs, &model, &out);
    assert_eq!(
        written,
        [
            "config.json",
            "model.safetensors",
            "report.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(skipped(&report), ["2_Dense", "loop", "special_tokens_map.json", "vocab.txt"]);
    let config = out.join("tokenizer_config.json");
    assert!(!config.is_symlink(), "a symlink is copied as its content");
    assert_eq!(std::fs::read(config).unwrap(), b"{\"model_max_length\": 12}");
}
