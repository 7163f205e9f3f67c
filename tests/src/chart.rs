//! The Helm chart as the tests see it: `tests/packaging/verify.py` (in the
//! venv the test command makes) renders it with the Helm SDK, offline or as
//! `helm install --dry-run=server` does against a cluster (the emulator),
//! rendering the operator's objects with the binary under test.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// `tests/packaging/verify.py ARGS`.
pub fn verify_py(args: &[&std::ffi::OsStr]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/packaging/verify.py"))
        .args(args)
        .env("OPERATOR_BIN", crate::operator_bin())
        .output()
        .expect("the venv's python (the test command installs it)")
}

fn objects(output: Output) -> Vec<Value> {
    assert!(
        output.status.success(),
        "render: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("objects")
}

/// The chart rendered offline for `values` (`verify.py --render`): no
/// `.Capabilities` beyond the built-in APIs.
pub fn chart_objects(values: &Value) -> Vec<Value> {
    let values = values.to_string();
    objects(verify_py(&["--render".as_ref(), values.as_ref()]))
}

/// The chart rendered for `values` as `helm install --dry-run=server`
/// renders it against the cluster of `kubeconfig` (`verify.py
/// --render-on`): the monitors appear where that cluster serves their API.
pub fn chart_objects_on(kubeconfig: &Path, values: &Value) -> Vec<Value> {
    let values = values.to_string();
    objects(verify_py(&[
        "--render-on".as_ref(),
        kubeconfig.as_os_str(),
        values.as_ref(),
    ]))
}
