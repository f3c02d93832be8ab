//! Puts the git commit into `--version` as `OUTPOST_WEBHOOK_COMMIT`: 12 hex digits, `-dirty`
//! when the work tree has changes, or `unknown` where git or `.git` is absent (container builds
//! copy the sources without `.git`).
//!
//! Runs git; writes nothing but cargo's instructions.

use std::{path::Path, process::Command};

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    out.status.success().then(|| text.trim().to_owned())
}

fn main() {
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) if !hash.is_empty() => {
            let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
            if dirty { format!("{hash}-dirty") } else { hash }
        }
        _ => "unknown".to_owned(),
    };
    println!("cargo:rustc-env=OUTPOST_WEBHOOK_COMMIT={commit}");
    println!("cargo:rerun-if-changed=build.rs");
    // A worktree's .git is a file, so ask git where HEAD, the branch's ref and the index are.
    // A path that does not exist would make cargo rerun this script on every build.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let watched = [
        Some(".git/HEAD"),
        Some("HEAD"),
        branch.as_deref(),
        Some("index"),
    ];
    for name in watched.into_iter().flatten() {
        let path = if name.starts_with(".git") {
            Some(name.to_owned())
        } else {
            git(&["rev-parse", "--git-path", name])
        };
        if let Some(path) = path.filter(|p| Path::new(p).is_file()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
