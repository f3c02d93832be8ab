//! Where the tests find the Go-built tools: `helm` and `promtool`. An environment variable
//! (`HELM`, `PROMTOOL`) names the binary; otherwise the directory the ensure script builds into,
//! under `target/tools/`, at the version the script pins. A missing tool fails the test with the
//! command that builds it: a skipped chart test would pass in CI while checking nothing.

use std::path::{Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The value of `name=` in one of the ensure scripts, so the tests and the script agree on it.
pub fn pinned(script: &str, name: &str) -> String {
    let text = std::fs::read_to_string(repo().join("scripts").join(script)).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("scripts/{script} pins no {name}="))
        .trim()
        .to_owned()
}

fn locate(env: &str, script: &str, dir_prefix: &str, binary: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env}={} is not a file; unset it or point it at {binary}",
            path.display()
        );
        return path;
    }
    let version = pinned(script, "version");
    let path = repo()
        .join("target/tools")
        .join(format!("{dir_prefix}-{version}"))
        .join(binary);
    assert!(
        path.is_file(),
        "{binary} {version} is not built: run `scripts/{script}` (it prints the directory), or set {env} to a {binary} binary"
    );
    path
}

/// `helm`, from `HELM` or `scripts/ensure-helm.sh`'s directory.
pub fn helm() -> PathBuf {
    locate("HELM", "ensure-helm.sh", "helm", "helm")
}

/// `promtool`, from `PROMTOOL` or `scripts/ensure-promtool.sh`'s directory.
pub fn promtool() -> PathBuf {
    locate("PROMTOOL", "ensure-promtool.sh", "promtool", "promtool")
}
