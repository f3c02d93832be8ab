//! The binary, as a pod runs it: `serve` on loopback ports with its JSON log lines read back.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use tempfile::TempDir;

use super::{
    client::{Http1, apply_answer, health_get},
    fixtures::golden_review,
};

/// `serve` on ephemeral loopback ports.
pub const SERVE_ON_LOOPBACK: [&str; 5] = [
    "serve",
    "--addr",
    "127.0.0.1:0",
    "--health-addr",
    "127.0.0.1:0",
];

pub const BIN: &str = env!("CARGO_BIN_EXE_outpost-webhook");

pub fn certs_into(dir: &TempDir) {
    let out = Command::new(BIN)
        .args([
            "certs",
            "--service",
            "outpost-webhook",
            "--namespace",
            "outpost-webhook",
        ])
        .args(["--san", "127.0.0.1", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Served {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
    pub addr: std::net::SocketAddr,
    pub health: std::net::SocketAddr,
    /// Who this is, in the log a failing test prints.
    pub label: String,
}

impl Served {
    /// Answers a review as the apiserver expects and is ready; returns the client and review
    /// for more.
    pub async fn assert_serves(&self, ca: &str) -> (Http1, Value) {
        let mut client = Http1::connect(self.addr, ca).await;
        let review = golden_review("embedded-deployment-create");
        let (status, answer) = client.review(&review).await;
        assert_eq!(status, 200);
        apply_answer(&review, &answer);
        assert_eq!(health_get(self.health, "/readyz").await.0, 200);
        (client, review)
    }

    /// Sends SIGTERM, as the kubelet does.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every log line so far, without waiting.
    pub fn lines_so_far(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        &self.log
    }

    /// The next log line, within `limit`.
    pub fn next_line(&mut self, limit: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(limit).ok()?;
        self.log.push(line.clone());
        Some(line)
    }
}

/// A test that fails before it stops its server must not leave the process running.
impl Drop for Served {
    fn drop(&mut self) {
        // A failing test shows what the process logged.
        if std::thread::panicking() {
            let log = self.lines_so_far().join("\n");
            eprintln!("--- {} logged:\n{log}", self.label);
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn serve(dir: &TempDir, extra: &[&str]) -> Served {
    serve_with(Command::new(BIN), dir, extra)
}

/// As [`serve`], from a prepared command (a wrapper such as `unshare`, or environment).
pub fn serve_with(mut command: Command, dir: &TempDir, extra: &[&str]) -> Served {
    command
        .args(SERVE_ON_LOOPBACK)
        .args(["--log-format", "json", "--drain-seconds", "1"])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .args(extra);
    spawn_served(command)
}

/// Starts a prepared `serve` command (JSON logs) and waits for the line saying where it serves.
pub fn spawn_served(command: Command) -> Served {
    let mut served = start_served(command);
    served.wait_serving();
    served
}

/// Starts a prepared `serve` command (JSON logs) without waiting: several can start together.
pub fn start_served(mut command: Command) -> Served {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Served {
        child,
        lines,
        log: Vec::new(),
        addr: "0.0.0.0:0".parse().unwrap(),
        health: "0.0.0.0:0".parse().unwrap(),
        label: "serve".into(),
    }
}

impl Served {
    /// Waits (at most 10 s) for the line saying where the process serves, and notes both
    /// addresses.
    pub fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let Some(line) = self.next_line(Duration::from_secs(10)) else {
                break;
            };
            let v: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
            if v["message"] == "Serving admission on TLS and health on HTTP" {
                self.addr = v["addr"].as_str().unwrap().parse().unwrap();
                self.health = v["health_addr"].as_str().unwrap().parse().unwrap();
                return;
            }
        }
        let _ = self.child.kill();
        panic!("the server did not start:\n{}", self.log.join("\n"));
    }
}
