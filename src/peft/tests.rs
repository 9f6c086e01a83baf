use safetensors::tensor::SafeTensors;
use serde_json::Value;

use super::config::*;
use super::targets::*;
use super::weights::*;
use super::*;

fn matrix(rows: usize, cols: usize, seed: u32) -> Matrix {
    // Deterministic values that exercise sign, -0.0 and subnormals for the bit-exact check.
    let data = (0..rows * cols)
        .map(|i| match (i as u32 + seed) % 7 {
            0 => -0.0,
            1 => f32::from_bits(1),
            _ => ((i as f32 + 1.0) * 0.37 + seed as f32).sin() * 1e-2,
        })
        .collect();
    Matrix::new(rows, cols, data)
}

fn layer(r: usize, d_in: usize, d_out: usize, seed: u32) -> PeftLayer {
    PeftLayer::new(matrix(r, d_in, seed), matrix(d_out, r, seed + 1))
}

fn sample_adapter() -> PeftAdapter {
    let mut config = PeftConfig::new(4, 8.0, vec!["query".into(), "value".into()]);
    config.rank_pattern.insert("layers.1.attention.value".into(), 2);
    config.alpha_pattern.insert("value".into(), 3.0);
    config.base_model_name_or_path = Some("tiny-bert".into());
    config.task_type = Some("CAUSAL_LM".into());
    let mut layers = BTreeMap::new();
    layers.insert("layers.0.attention.query".into(), layer(4, 6, 5, 1));
    layers.insert("layers.0.attention.value".into(), layer(4, 6, 5, 3));
    layers.insert("layers.1.attention.value".into(), layer(2, 6, 5, 5));
    PeftAdapter { config, layers }
}

/// One tensor for `write_raw`: key, dtype, shape, little-endian bytes.
type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

fn raw(key: impl Into<String>, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Raw {
    (key.into(), dtype, shape.to_vec(), bytes)
}

/// An F32 tensor of `shape` filled with `value`.
fn filled(key: impl Into<String>, shape: &[usize], value: f32) -> Raw {
    let n = shape.iter().product();
    let bytes = std::iter::repeat_n(value, n).flat_map(f32::to_le_bytes).collect();
    raw(key, Dtype::F32, shape, bytes)
}

/// Writes a raw safetensors weights file, bypassing every check in `save`.
fn write_raw(dir: &Path, tensors: &[Raw]) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, dtype, shape, bytes)| {
            (k.as_str(), TensorView::new(*dtype, shape.clone(), bytes).unwrap())
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    fs::write(dir.join(WEIGHTS_FILE), bytes).unwrap();
}

fn write_config(dir: &Path, config: &PeftConfig) {
    fs::write(dir.join(CONFIG_FILE), serde_json::to_string(config).unwrap()).unwrap();
}

fn dir_listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn conv_factors_round_trip_as_4d_kernels_and_bad_shapes_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let config = PeftConfig::new(2, 4.0, vec!["conv".into()]);
    // A [2, 3·2·2] flattened kernel: PEFT's [2, 3, 2, 2].
    let layer = PeftLayer::conv2d(matrix(2, 12, 1), matrix(5, 2, 2), [2, 2]);
    assert_eq!((layer.lora_a_shape(), layer.lora_b_shape()), (vec![2, 3, 2, 2], vec![5, 2, 1, 1]));
    let adapter = PeftAdapter {
        config: config.clone(),
        layers: BTreeMap::from([("conv".to_string(), layer)]),
    };
    adapter.save(tmp.path()).unwrap();
    assert_eq!(PeftAdapter::load(tmp.path()).unwrap(), adapter);

    // A flattened kernel that is not C_in·kh·kw.
    let mut bad = adapter.clone();
    bad.layers.get_mut("conv").unwrap().kernel_size = Some([5, 1]);
    assert!(
        matches!(bad.validate(), Err(EmlocError::InvalidConfig(m)) if m.contains("kernel 5×1"))
    );

    write_config(tmp.path(), &config);
    let (a, b) = (lora_a_key("conv"), lora_b_key("conv"));
    // lora_B must be a 1×1 kernel.
    write_raw(tmp.path(), &[filled(&a, &[2, 3, 2, 2], 0.5), filled(&b, &[5, 2, 3, 1], 0.5)]);
    assert!(matches!(
        PeftAdapter::load(tmp.path()),
        Err(EmlocError::ShapeMismatch { name, expected, found })
            if name == b && expected == [5, 2, 1, 1] && found == [5, 2, 3, 1]
    ));
    // A 4-D lora_A with a 2-D lora_B (and the reverse) is one mis-shaped key.
    for (a_shape, b_shape) in [(&[2, 3, 2, 2][..], &[5, 2][..]), (&[2, 12][..], &[5, 2, 1, 1][..])]
    {
        write_raw(tmp.path(), &[filled(&a, a_shape, 0.5), filled(&b, b_shape, 0.5)]);
        match PeftAdapter::load(tmp.path()) {
            Err(EmlocError::AdapterKeys { misshaped, .. }) => {
                assert_eq!(misshaped.len(), 1, "{misshaped:?}");
                assert!(misshaped[0].starts_with(&b), "{misshaped:?}");
            }
            other => panic!("{a_shape:?}, {b_shape:?}: {other:?}"),
        }
    }
    // A conv adapter fits only a convolution of that kernel.
    let conv = |kernel| LayerShape { path: "conv".into(), d_in: 12, d_out: 5, kernel_size: kernel };
    adapter.check_fits(&[conv(Some([2, 2]))]).unwrap();
    for other in [None, Some([1, 1]), Some([4, 1])] {
        assert!(
            matches!(adapter.check_fits(&[conv(other)]), Err(EmlocError::AdapterKeys { .. })),
            "{other:?}"
        );
    }
}

#[test]
fn round_trip_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested").join("adapter");
    let adapter = sample_adapter();
    adapter.save(&dir).unwrap();
    assert_eq!(dir_listing(&dir), [CONFIG_FILE, WEIGHTS_FILE]);

    let loaded = PeftAdapter::load(&dir).unwrap();
    assert_eq!(loaded.config, adapter.config);
    assert_eq!(loaded.layers.keys().collect::<Vec<_>>(), adapter.layers.keys().collect::<Vec<_>>());
    for (path, original) in &adapter.layers {
        let got = &loaded.layers[path];
        for (x, y) in [(&got.lora_a, &original.lora_a), (&got.lora_b, &original.lora_b)] {
            assert_eq!(x.shape(), y.shape(), "{path}");
            let bits = |m: &Matrix| m.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(x), bits(y), "{path}");
        }
    }

    let bytes = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = metadata.metadata().as_ref().unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let a = st.tensor(&lora_a_key("layers.1.attention.value")).unwrap();
    assert_eq!((a.dtype(), a.shape()), (Dtype::F32, &[2usize, 6][..]));

    let json = fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    assert!(json.contains("\n  \"peft_type\": \"LORA\""), "{json}");
}

#[test]
fn minimal_peft_config_loads_with_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(
        tmp.path().join(CONFIG_FILE),
        r#"{
            "peft_type": "LORA",
            "r": 2,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "revision": null,
            "layers_to_transform": null,
            "megatron_config": null,
            "modules_to_save": null,
            "auto_mapping": {"base_model_class": "LlamaForCausalLM"}
        }"#,
    )
    .unwrap();
    write_raw(
        tmp.path(),
        &[
            filled(lora_a_key("model.layers.0.self_attn.q_proj"), &[2, 3], 0.5),
            filled(lora_b_key("model.layers.0.self_attn.q_proj"), &[4, 2], -1.0),
        ],
    );
    let adapter = PeftAdapter::load(tmp.path()).unwrap();
    let c = &adapter.config;
    assert_eq!((c.r, c.lora_alpha), (2, 16.0));
    assert_eq!(c.target_modules, TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
    assert_eq!((c.lora_dropout, c.use_rslora, c.bias.as_str()), (0.0, false, "none"));
    assert!(!c.fan_in_fan_out && c.rank_pattern.is_empty() && c.alpha_pattern.is_empty());
    assert_eq!((c.base_model_name_or_path.as_deref(), c.task_type.as_deref()), (None, None));
    let l = &adapter.layers["model.layers.0.self_attn.q_proj"];
    assert_eq!(l.lora_a, Matrix::new(2, 3, vec![0.5; 6]));
    assert_eq!(l.lora_b, Matrix::new(4, 2, vec![-1.0; 8]));
}

#[test]
fn malformed_adapter_lists_every_key_problem() {
    let tmp = tempfile::tempdir().unwrap();
    write_config(tmp.path(), &PeftConfig::new(4, 8.0, vec!["q".into(), "k".into(), "v".into()]));
    write_raw(
        tmp.path(),
        &[
            filled(lora_a_key("l0.q"), &[4, 3], 1.0),
            filled(lora_b_key("l0.q"), &[5, 4], 1.0),
            // A without its B.
            filled(lora_a_key("l0.k"), &[4, 3], 1.0),
            // B's rank disagrees with A and with r.
            filled(lora_a_key("l0.v"), &[4, 3], 1.0),
            filled(lora_b_key("l0.v"), &[5, 3], 1.0),
            filled("base_model.model.lm_head.weight", &[2, 2], 1.0),
        ],
    );
    match PeftAdapter::load(tmp.path()) {
        Err(EmlocError::AdapterKeys { missing, unexpected, misshaped }) => {
            assert_eq!(missing, [lora_b_key("l0.k")]);
            assert_eq!(unexpected, ["base_model.model.lm_head.weight"]);
            assert_eq!(
                misshaped,
                [format!("{}: expected [5, 4], found [5, 3]", lora_b_key("l0.v"))]
            );
        }
        other => panic!("expected AdapterKeys, got {other:?}"),
    }
}

#[test]
fn rank_disagreeing_with_config_is_misshaped() {
    let tmp = tempfile::tempdir().unwrap();
    write_config(tmp.path(), &PeftConfig::new(4, 8.0, vec!["q".into()]));
    write_raw(
        tmp.path(),
        &[filled(lora_a_key("q"), &[2, 3], 1.0), filled(lora_b_key("q"), &[5, 2], 1.0)],
    );
    match PeftAdapter::load(tmp.path()) {
        Err(EmlocError::AdapterKeys { missing, unexpected, misshaped }) => {
            assert!(missing.is_empty() && unexpected.is_empty());
            assert_eq!(
                misshaped,
                [
                    format!("{}: expected [4, 3], found [2, 3]", lora_a_key("q")),
                    format!("{}: expected [5, 4], found [5, 2]", lora_b_key("q")),
                ]
            );
        }
        other => panic!("expected AdapterKeys, got {other:?}"),
    }
}

#[test]
fn untargeted_layer_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    write_config(tmp.path(), &PeftConfig::new(2, 8.0, vec!["query".into()]));
    write_raw(
        tmp.path(),
        &[filled(lora_a_key("l0.key"), &[2, 3], 1.0), filled(lora_b_key("l0.key"), &[5, 2], 1.0)],
    );
    match PeftAdapter::load(tmp.path()) {
        Err(EmlocError::AdapterConfig { path, message }) => {
            assert_eq!(path, tmp.path().join(CONFIG_FILE));
            assert!(message.contains("l0.key"), "{message}");
        }
        other => panic!("expected AdapterConfig, got {other:?}"),
    }
}

#[test]
fn check_fits_reports_missing_unexpected_and_misshaped() {
    let adapter = sample_adapter();
    adapter
        .check_fits(&[
            shape("layers.0.attention.query", 6, 5),
            shape("layers.0.attention.value", 6, 5),
            shape("layers.1.attention.value", 6, 5),
            shape("layers.0.attention.key", 6, 5),
        ])
        .unwrap();

    let model = [
        shape("layers.0.attention.query", 6, 5),
        // d_out differs from the adapter's B.
        shape("layers.0.attention.value", 6, 7),
        // Targeted but absent from the adapter.
        shape("layers.2.attention.query", 6, 5),
        // Not targeted: must not be reported.
        shape("layers.2.attention.key", 6, 5),
    ];
    match adapter.check_fits(&model) {
        Err(EmlocError::AdapterKeys { missing, unexpected, misshaped }) => {
            assert_eq!(
                missing,
                [lora_a_key("layers.2.attention.query"), lora_b_key("layers.2.attention.query")]
            );
            assert_eq!(
                unexpected,
                [lora_a_key("layers.1.attention.value"), lora_b_key("layers.1.attention.value")]
            );
            assert_eq!(
                misshaped,
                [format!(
                    "{}: expected [7, 4], found [5, 4]",
                    lora_b_key("layers.0.attention.value")
                )]
            );
        }
        other => panic!("expected AdapterKeys, got {other:?}"),
    }
}

fn shape(path: &str, d_in: usize, d_out: usize) -> LayerShape {
    LayerShape { path: path.into(), d_in, d_out, kernel_size: None }
}

fn assert_safetensors_error(result: Result<PeftAdapter>, what: &str) {
    match result {
        Err(EmlocError::Safetensors { .. }) => {}
        other => panic!("{what}: expected Safetensors error, got {other:?}"),
    }
}

#[test]
fn corrupt_weights_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = sample_adapter();
    adapter.save(tmp.path()).unwrap();
    let weights = tmp.path().join(WEIGHTS_FILE);
    let good = fs::read(&weights).unwrap();

    fs::write(&weights, &good[..good.len() / 2]).unwrap();
    assert_safetensors_error(PeftAdapter::load(tmp.path()), "cut in half");

    let mut past_eof = (good.len() as u64 * 4).to_le_bytes().to_vec();
    past_eof.extend_from_slice(b"{}");
    fs::write(&weights, &past_eof).unwrap();
    assert_safetensors_error(PeftAdapter::load(tmp.path()), "header length past EOF");

    let header = b"{\"x\": [1, 2,";
    let mut garbage = (header.len() as u64).to_le_bytes().to_vec();
    garbage.extend_from_slice(header);
    fs::write(&weights, &garbage).unwrap();
    assert_safetensors_error(PeftAdapter::load(tmp.path()), "garbage JSON header");

    fs::write(&weights, b"").unwrap();
    assert_safetensors_error(PeftAdapter::load(tmp.path()), "empty file");

    // Every prefix fails cleanly, and no single-byte corruption panics.
    let config = adapter.config.clone();
    for len in 0..good.len() {
        assert!(matches!(
            parse_weights(&good[..len], &weights, &config),
            Err(EmlocError::Safetensors { .. })
        ));
    }
    for i in 0..good.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bytes = good.clone();
            bytes[i] ^= flip;
            let _ = parse_weights(&bytes, &weights, &config);
        }
    }
}

#[test]
fn unsupported_dtype_and_rank_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    write_config(tmp.path(), &PeftConfig::new(2, 8.0, vec!["q".into()]));
    write_raw(
        tmp.path(),
        &[
            raw(lora_a_key("q"), Dtype::I32, &[2, 3], vec![0; 24]),
            filled(lora_b_key("q"), &[5, 2], 1.0),
        ],
    );
    match PeftAdapter::load(tmp.path()) {
        Err(EmlocError::Safetensors { message, .. }) => {
            assert!(message.contains(&lora_a_key("q")) && message.contains("I32"), "{message}");
        }
        other => panic!("expected Safetensors error, got {other:?}"),
    }

    write_raw(
        tmp.path(),
        &[filled(lora_a_key("q"), &[2, 3, 1], 1.0), filled(lora_b_key("q"), &[5, 2], 1.0)],
    );
    match PeftAdapter::load(tmp.path()) {
        Err(EmlocError::ShapeMismatch { name, found, .. }) => {
            assert_eq!((name, found), (lora_a_key("q"), vec![2, 3, 1]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn config_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = tmp.path().join(CONFIG_FILE);
    match PeftAdapter::load(tmp.path()) {
        Err(EmlocError::Io { path, .. }) => assert_eq!(path, config_path),
        other => panic!("expected Io error, got {other:?}"),
    }

    fs::write(&config_path, "{\n  \"peft_type\": \"LORA\",\n  \"r\": }").unwrap();
    match PeftAdapter::load(tmp.path()) {
        Err(EmlocError::AdapterConfig { path, message }) => {
            assert_eq!(path, config_path);
            assert!(message.contains("line 3"), "{message}");
        }
        other => panic!("expected AdapterConfig, got {other:?}"),
    }

    let base = PeftConfig::new(2, 8.0, vec!["q".into()]);
    let mut prefix = base.clone();
    prefix.peft_type = "PREFIX_TUNING".into();
    let mut fan = base.clone();
    fan.fan_in_fan_out = true;
    let mut bad_regex = base.clone();
    bad_regex.target_modules = TargetModules::Regex("(unclosed".into());
    for (config, needle) in
        [(prefix, "PREFIX_TUNING"), (fan, "fan_in_fan_out"), (bad_regex, "(unclosed")]
    {
        write_config(tmp.path(), &config);
        match PeftAdapter::load(tmp.path()) {
            Err(EmlocError::AdapterConfig { message, .. }) => {
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("expected AdapterConfig for {needle}, got {other:?}"),
        }
    }

    // A valid config without weights names the weights file.
    write_config(tmp.path(), &base);
    match PeftAdapter::load(tmp.path()) {
        Err(EmlocError::Io { path, .. }) => assert_eq!(path, tmp.path().join(WEIGHTS_FILE)),
        other => panic!("expected Io error, got {other:?}"),
    }
}

#[test]
fn invalid_save_leaves_previous_adapter_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let good = sample_adapter();
    good.save(tmp.path()).unwrap();
    let snapshot = |dir: &Path| {
        (
            dir_listing(dir),
            fs::read(dir.join(CONFIG_FILE)).unwrap(),
            fs::read(dir.join(WEIGHTS_FILE)).unwrap(),
        )
    };
    let before = snapshot(tmp.path());

    let mut rank_mismatch = good.clone();
    let l = rank_mismatch.layers.get_mut("layers.0.attention.query").unwrap();
    l.lora_b = matrix(5, 3, 9);
    assert!(matches!(
        rank_mismatch.save(tmp.path()),
        Err(EmlocError::ShapeMismatch { name, .. }) if name == lora_b_key("layers.0.attention.query")
    ));

    let mut pattern_mismatch = good.clone();
    // layers.1.attention.value must have rank 2 by rank_pattern.
    pattern_mismatch.layers.insert("layers.1.attention.value".into(), layer(4, 6, 5, 7));
    assert!(matches!(
        pattern_mismatch.save(tmp.path()),
        Err(EmlocError::ShapeMismatch { name, .. }) if name == lora_a_key("layers.1.attention.value")
    ));

    let mut nan = good.clone();
    nan.layers.get_mut("layers.0.attention.value").unwrap().lora_a.data[3] = f32::NAN;
    assert!(matches!(
        nan.save(tmp.path()),
        Err(EmlocError::NonFinite { layer, what })
            if layer == "layers.0.attention.value" && what == "lora_A"
    ));

    let mut untargeted = good.clone();
    untargeted.layers.insert("layers.0.attention.key".into(), layer(4, 6, 5, 11));
    assert!(matches!(
        untargeted.save(tmp.path()),
        Err(EmlocError::AdapterConfig { message, .. }) if message.contains("layers.0.attention.key")
    ));

    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn failed_write_removes_its_temp_file() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory where the weights file should go makes the final rename fail.
    fs::create_dir(tmp.path().join(WEIGHTS_FILE)).unwrap();
    fs::write(tmp.path().join(WEIGHTS_FILE).join("keep"), b"x").unwrap();
    match sample_adapter().save(tmp.path()) {
        Err(EmlocError::Io { path, .. }) => assert_eq!(path, tmp.path().join(WEIGHTS_FILE)),
        other => panic!("expected Io error, got {other:?}"),
    }
    assert_eq!(dir_listing(tmp.path()), [WEIGHTS_FILE]);
}

#[test]
fn patterns_and_scales() {
    let mut c = PeftConfig::new(8, 16.0, vec!["q".into()]);
    c.rank_pattern.insert("attn.v".into(), 4);
    c.rank_pattern.insert("layers.3.attn.q".into(), 2);
    c.alpha_pattern.insert("v".into(), 32.0);

    assert_eq!(c.rank_for("layers.0.attn.q"), 8);
    assert_eq!(c.rank_for("layers.3.attn.q"), 2);
    assert_eq!(c.rank_for("layers.13.attn.q"), 8, "suffix must start at a component");
    assert_eq!(c.rank_for("layers.0.attn.v"), 4);
    assert_eq!(c.rank_for("attn.v"), 4);
    assert_eq!(c.rank_for("layers.0.xattn.v"), 8);
    assert_eq!(c.alpha_for("layers.0.attn.v"), 32.0);
    assert_eq!(c.alpha_for("layers.0.attn.q"), 16.0);

    assert_eq!(c.scale_for("layers.0.attn.q"), 2.0);
    assert_eq!(c.scale_for("layers.0.attn.v"), 8.0);
    c.use_rslora = true;
    assert_eq!(c.scale_for("layers.0.attn.q"), 16.0 / 8f64.sqrt());
    assert_eq!(c.scale_for("layers.0.attn.v"), 16.0);

    // First match in map order wins.
    c.rank_pattern.insert("q".into(), 6);
    assert_eq!(c.rank_for("layers.3.attn.q"), 2);
    assert_eq!(c.rank_for("layers.0.attn.q"), 6);
}

#[test]
fn pattern_keys_resolve_as_in_peft() {
    let mut c = PeftConfig::new(8, 16.0, vec!["q".into()]);
    for (key, r) in [
        ("attn.q", 2),
        ("cross.attn.q", 6),
        (r"layers\.[01]\.mlp\.(up|down)", 3),
        ("mlp.gate", 5),
        ("v|k", 7),
    ] {
        c.rank_pattern.insert(key.into(), r);
    }
    c.alpha_pattern.insert("q".into(), 32.0);
    c.alpha_pattern.insert(r"layers\.1\..*".into(), 4.0);
    // Expected values printed by PEFT 0.21.2: for each path,
    // `pattern.get(peft.utils.other.get_pattern_key(sorted keys, path), default)`.
    let peft = [
        ("attn.q", 2, 32.0),
        // `attn.q` sorts first and matches the tail of `cross.attn.q`.
        ("cross.attn.q", 2, 32.0),
        ("layers.0.attn.q", 2, 32.0),
        ("layers.0.mlp.up", 3, 16.0),
        ("layers.2.mlp.up", 8, 16.0),
        ("layers.1.mlp.down", 3, 4.0),
        ("layers.1.mlp.gate", 5, 4.0),
        // The alternation stays inside PEFT's group: `v` is a whole last component.
        ("layers.0.attn.v", 7, 16.0),
        ("layers.0.attn.kv", 8, 16.0),
        ("layers.0.xq", 8, 16.0),
        ("k", 7, 16.0),
    ];
    let patterns = c.patterns().unwrap();
    for (path, r, alpha) in peft {
        assert_eq!((c.rank_for(path), c.alpha_for(path)), (r, alpha), "{path}");
        assert_eq!((patterns.rank_for(path), patterns.alpha_for(path)), (r, alpha), "{path}");
    }
    assert_eq!(patterns.scale_for("layers.1.mlp.down"), 4.0 / 3.0);

    c.alpha_pattern.insert("(unclosed".into(), 1.0);
    match c.validate() {
        Err(EmlocError::InvalidConfig(message)) => {
            assert!(message.contains("alpha_pattern key `(unclosed`"), "{message}")
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn unsupported_peft_features_are_rejected_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = sample_adapter();
    adapter.save(tmp.path()).unwrap();
    let config_path = tmp.path().join(CONFIG_FILE);
    let saved: Value = serde_json::from_str(&fs::read_to_string(&config_path).unwrap()).unwrap();
    let with = |field: &str, value: Value| {
        let mut config = saved.clone();
        config[field] = value;
        fs::write(&config_path, config.to_string()).unwrap();
        PeftAdapter::load(tmp.path())
    };
    // PEFT's defaults and inert values load.
    for (field, value) in [
        ("modules_to_save", Value::Null),
        ("modules_to_save", serde_json::json!([])),
        ("use_dora", Value::Bool(false)),
        ("lora_bias", Value::Bool(false)),
        ("layers_to_transform", Value::Null),
        ("init_lora_weights", Value::Bool(false)),
        ("init_lora_weights", serde_json::json!("gaussian")),
        ("megatron_core", serde_json::json!("megatron.core")),
    ] {
        assert_eq!(with(field, value.clone()).unwrap(), adapter, "{field} = {value}");
    }
    for (field, value) in [
        ("modules_to_save", serde_json::json!(["classifier"])),
        ("use_dora", Value::Bool(true)),
        ("lora_bias", Value::Bool(true)),
        ("layers_to_transform", serde_json::json!([0])),
        ("exclude_modules", serde_json::json!(["key"])),
        ("trainable_token_indices", serde_json::json!([3])),
        ("init_lora_weights", serde_json::json!("pissa_niter_4")),
        ("alora_invocation_tokens", serde_json::json!([1, 2])),
    ] {
        match with(field, value.clone()) {
            Err(e @ EmlocError::UnsupportedPeftFeature { .. }) => {
                let EmlocError::UnsupportedPeftFeature { path, feature, value: found } = &e else {
                    unreachable!()
                };
                assert_eq!(
                    (path, feature.as_str(), found),
                    (&config_path, field, &value.to_string())
                );
                assert!(e.to_string().contains(field), "{e}");
            }
            other => {
                panic!("{field} = {value}: expected UnsupportedPeftFeature, got {other:?}")
            }
        }
    }

    // A modules_to_save copy in the weights is named too.
    fs::write(&config_path, saved.to_string()).unwrap();
    write_raw(
        tmp.path(),
        &[
            filled(lora_a_key("q"), &[4, 3], 1.0),
            filled(lora_b_key("q"), &[5, 4], 1.0),
            filled("base_model.model.classifier.modules_to_save.default.weight", &[2, 5], 1.0),
        ],
    );
    assert!(matches!(
        PeftAdapter::load(tmp.path()),
        Err(EmlocError::UnsupportedPeftFeature { feature, value, .. })
            if feature == "modules_to_save" && value.contains("classifier")
    ));
}

#[test]
fn target_module_matching() {
    let list = TargetModules::List(vec!["query".into(), "attention.value".into()]);
    assert!(list.matches("query").unwrap());
    assert!(list.matches("layers.0.attention.query").unwrap());
    assert!(list.matches("layers.0.attention.value").unwrap());
    assert!(!list.matches("layers.0.attention.query_proj").unwrap());
    assert!(!list.matches("layers.0.attention.subquery").unwrap());
    assert!(!list.matches("layers.0.cross_attention.value").unwrap());

    let re = TargetModules::Regex(r"layers\.[01]\.attention\.(query|value)".into());
    assert!(re.matches("layers.1.attention.value").unwrap());
    assert!(!re.matches("layers.2.attention.value").unwrap());
    assert!(!re.matches("model.layers.1.attention.value").unwrap(), "anchored at start");
    assert!(!re.matches("layers.1.attention.value.x").unwrap(), "anchored at end");
    let alt = TargetModules::Regex("a|b".into());
    assert!(!alt.matches("ab").unwrap(), "alternation must stay inside the anchors");

    assert!(matches!(
        TargetModules::Regex("(".into()).matches("x"),
        Err(EmlocError::InvalidConfig(_))
    ));
    let json: TargetModules = serde_json::from_str(r#""q|v""#).unwrap();
    assert_eq!(json, TargetModules::Regex("q|v".into()));
}

#[test]
fn half_precision_tensors_load_as_f32() {
    let tmp = tempfile::tempdir().unwrap();
    write_config(tmp.path(), &PeftConfig::new(2, 8.0, vec!["q".into()]));
    let f16_bits: [u16; 6] = [0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x8000];
    let f16_want = [1.0, -2.0, 0.5, 65504.0, 5.960_464_5e-8, -0.0];
    let bf16_bits: [u16; 6] = [0x3f80, 0xc060, 0x3e20, 0x0000, 0x4780, 0x0001];
    let bf16_want = [1.0, -3.5, 0.156_25, 0.0, 65536.0, f32::from_bits(0x0001_0000)];
    let le = |bits: &[u16]| bits.iter().flat_map(|b| b.to_le_bytes()).collect::<Vec<_>>();
    write_raw(
        tmp.path(),
        &[
            raw(lora_a_key("q"), Dtype::F16, &[2, 3], le(&f16_bits)),
            raw(lora_b_key("q"), Dtype::BF16, &[3, 2], le(&bf16_bits)),
        ],
    );
    let adapter = PeftAdapter::load(tmp.path()).unwrap();
    let l = &adapter.layers["q"];
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&l.lora_a.data), bits(&f16_want));
    assert_eq!(bits(&l.lora_b.data), bits(&bf16_want));

    assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
    assert!(f16_to_f32(0x7e00).is_nan());
    assert_eq!(f16_to_f32(0x03ff), 1023.0 / 16_777_216.0);
    assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));

    // Every finite f16 against the textbook formula, evaluated in f64.
    for h in 0..=u16::MAX {
        let (e, m) = (i32::from((h >> 10) & 0x1f), f64::from(h & 0x3ff));
        if e == 0x1f {
            continue;
        }
        let magnitude =
            if e == 0 { m * 2f64.powi(-24) } else { (1.0 + m / 1024.0) * 2f64.powi(e - 15) };
        let want = if h & 0x8000 == 0 { magnitude } else { -magnitude };
        assert_eq!(f16_to_f32(h).to_bits(), (want as f32).to_bits(), "{h:#06x}");
    }
}

#[test]
fn non_finite_loaded_values_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    write_config(tmp.path(), &PeftConfig::new(2, 8.0, vec!["q".into()]));
    write_raw(
        tmp.path(),
        &[filled(lora_a_key("q"), &[2, 3], 1.0), filled(lora_b_key("q"), &[5, 2], f32::INFINITY)],
    );
    assert!(matches!(
        PeftAdapter::load(tmp.path()),
        Err(EmlocError::NonFinite { layer, what }) if layer == "q" && what == "lora_B"
    ));
}
