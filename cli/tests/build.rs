//! The binary the README builds (`cargo run -p emloc-cli`, `cargo install --path cli`) gets the
//! same threaded, vectorised CPU backend as the test build. Cargo resolves a package's features
//! without its dev-dependencies when it builds only that package, so a feature that reaches Flex
//! through a dev-dependency alone (as Burn's `train` once did) is in every test and missing from
//! every figure a user measures; this test asks Cargo for the binary's own resolution.

use std::process::Command;

/// The features Cargo enables on `package` when building `emloc-cli` alone, normal edges only.
fn features_in_cli_build(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let output = Command::new(cargo)
        .current_dir(workspace)
        .args(["tree", "--locked", "-p", "emloc-cli", "-e", "normal", "--prefix", "none"])
        .args(["-f", "{p}|{f}"])
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "cargo tree failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(package))
        .unwrap_or_else(|| panic!("{package} is not in emloc-cli's dependency tree:\n{stdout}"));
    let (_, features) = line.split_once('|').expect("the format's separator");
    features.split(',').map(|f| f.trim().to_string()).collect()
}

#[test]
fn the_readme_binary_has_a_threaded_simd_flex_and_a_threaded_faer() {
    let flex = features_in_cli_build("burn-flex");
    for wanted in ["rayon", "simd"] {
        assert!(flex.iter().any(|f| f == wanted), "burn-flex lacks `{wanted}`: {flex:?}");
    }
    let faer = features_in_cli_build("faer");
    assert!(faer.iter().any(|f| f == "rayon"), "faer lacks `rayon`: {faer:?}");
}
