//! Shared by the server tests: certificates made at test time, an in-process server on
//! 127.0.0.1:0, and a client that behaves as the kube-apiserver's webhook client does.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use outpost_webhook::{
    server::{self, CertSource, Config, Running, Settings},
    state::Limits,
    tls,
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

/// The name the apiserver dials for a Service webhook: `<service>.<namespace>.svc`.
pub const SERVER_NAME: &str = "outpost-webhook.outpost-webhook.svc";

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("ow-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA and a serving certificate for the Service name and 127.0.0.1.
pub fn certs() -> tls::Generated {
    let mut sans = tls::service_dns_names("outpost-webhook", "outpost-webhook");
    sans.push("127.0.0.1".into());
    tls::generate(&sans, 30).unwrap()
}

/// Writes `tls.crt`/`tls.key` the way the kubelet lays out a Secret volume: the files are
/// links through `..data`, a link to a timestamped directory that is swapped atomically.
pub fn write_secret_volume(dir: &Path, generation: u32, cert: &str, key: &str) {
    let data = dir.join(format!("..2026_11_24_00_00_{generation:02}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("tls.crt"), cert).unwrap();
    std::fs::write(data.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(data.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        if !dir.join(f).exists() {
            std::os::unix::fs::symlink(Path::new("..data").join(f), dir.join(f)).unwrap();
        }
    }
}

pub fn settings() -> Settings {
    Settings {
        addr: "127.0.0.1:0".parse().unwrap(),
        health_addr: "127.0.0.1:0".parse().unwrap(),
        reload_interval: Duration::from_secs(3600),
        drain: Duration::from_millis(300),
        shutdown_grace: Duration::from_secs(5),
        header_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        max_connections: 64,
    }
}

pub fn limits() -> Limits {
    Limits {
        max_body_bytes: 6 * 1024 * 1024,
        default_timeout: Duration::from_secs(10),
    }
}

/// A server on 127.0.0.1:0 with certificates in a Secret-volume layout.
pub struct TestServer {
    pub running: Running,
    pub ca_pem: String,
    pub dir: TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_certs(certs(), adjust).await
    }

    /// A server whose certificate is `g`, in a Secret-volume layout under `self.dir`.
    pub async fn start_with_certs(g: tls::Generated, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = TempDir::new("server");
        write_secret_volume(&dir.0, 1, &g.cert_pem, &g.key_pem);
        let mut config = Config {
            settings: settings(),
            certs: CertSource::Files {
                cert: dir.0.join("tls.crt"),
                key: dir.0.join("tls.key"),
            },
            client_ca: None,
            policy: None,
            limits: limits(),
        };
        adjust(&mut config);
        let (app, tls) = server::prepare(&config).unwrap();
        let running = server::start(config.settings, app, tls).await.unwrap();
        Self {
            running,
            ca_pem: g.ca_pem,
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }
}

/// A TLS client configuration trusting `ca_pem`, offering the given ALPN protocols.
pub fn client_config(
    ca_pem: &str,
    alpn: &[&[u8]],
    identity: Option<(&str, &str)>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Opens a TLS connection, verifying the server as `SERVER_NAME`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(config)
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
}

/// An HTTP/1.1 keep-alive connection, as the apiserver pools towards Service webhooks.
pub struct Http1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Http1 {
    pub async fn connect(addr: SocketAddr, ca_pem: &str) -> Self {
        Self::connect_with(addr, client_config(ca_pem, &[b"http/1.1"], None)).await
    }

    pub async fn connect_with(addr: SocketAddr, config: Arc<ClientConfig>) -> Self {
        let tls = tls_connect(addr, config).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender, task }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        self.sender.ready().await?;
        self.sender.send_request(req).await
    }

    /// `POST /mutate?timeout=10s` with an AdmissionReview, as the apiserver sends it.
    pub async fn review(&mut self, review: &Value) -> (u16, Value) {
        let resp = self.send(review_request(review)).await.unwrap();
        read_json(resp).await
    }
}

pub fn review_request(review: &Value) -> Request<Full<Bytes>> {
    Request::post("/mutate?timeout=10s")
        .header("host", SERVER_NAME)
        .header("content-type", "application/json")
        .header("accept", "application/json, */*")
        .body(Full::new(Bytes::from(serde_json::to_vec(review).unwrap())))
        .unwrap()
}

pub async fn read_json(resp: Response<Incoming>) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// What the apiserver does with an answer: decode the base64 patch and apply it to the object.
pub fn apply_answer(review: &Value, answer: &Value) -> Value {
    let response = &answer["response"];
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    let mut object = review["request"]["object"].clone();
    if let Some(b64) = response.get("patch") {
        assert_eq!(response["patchType"], "JSONPatch");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("patch is a base64 string"))
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
        json_patch::patch(&mut object, &patch).expect("the patch applies");
    }
    object
}

/// Every golden case's review, for driving the server with realistic traffic.
pub fn golden_reviews() -> Vec<(String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("review.json").is_file() && !p.join("policy.yaml").exists())
        .map(|p| {
            let text = std::fs::read_to_string(p.join("review.json")).unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&text).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// One golden case's review, by name.
pub fn golden_review(name: &str) -> Value {
    golden_reviews()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no golden case {name}"))
        .1
}

/// A plain HTTP/1.1 GET on the health port.
pub async fn health_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get(path)
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A request body whose chunks the test sends when it chooses: a slow or paused client.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// The objects of the shared fixtures (`tests/fixtures`, copied from `../shared/fixtures`), by
/// file name; the whole-review fixture contributes its `request.object`.
pub fn fixture_objects() -> Vec<(String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().contains("kubernetes-json-patches"))
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let object = if v["kind"] == "AdmissionReview" {
                v["request"]["object"].clone()
            } else {
                v
            };
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                object,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The review the apiserver sends for `operation` on `object` (with `old` on UPDATE).
pub fn review_for(uid: &str, operation: &str, object: &Value, old: Option<&Value>) -> Value {
    let kind = object["kind"].as_str().unwrap();
    let (group, resource) = if kind == "Deployment" {
        ("apps", "deployments")
    } else {
        ("", "services")
    };
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": resource},
            "requestKind": {"group": group, "version": "v1", "kind": kind},
            "requestResource": {"group": group, "version": "v1", "resource": resource},
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:authentik:authentik"},
            "object": object,
            "oldObject": old,
            "dryRun": false,
        }
    })
}

// ---- The binary, as a pod runs it ----

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
        .arg(&dir.0)
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
}

impl Served {
    /// Answers a review as the apiserver expects and is ready; returns the client and review
    /// for more.
    pub async fn assert_serves(&self, ca: &str) -> (Http1, Value) {
        let mut client = Http1::connect(self.addr, ca).await;
        let review = golden_review("embedded-service-create");
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

    /// The next log line, within `limit`.
    pub fn next_line(&mut self, limit: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(limit).ok()?;
        self.log.push(line.clone());
        Some(line)
    }
}

pub fn serve(dir: &TempDir, extra: &[&str]) -> Served {
    serve_with(Command::new(BIN), dir, extra)
}

/// As [`serve`], from a prepared command (a wrapper such as `unshare`, or environment).
pub fn serve_with(mut command: Command, dir: &TempDir, extra: &[&str]) -> Served {
    let mut child = command
        .args(SERVE_ON_LOOPBACK)
        .args(["--log-format", "json", "--drain-seconds", "1"])
        .arg("--tls-cert")
        .arg(dir.0.join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.0.join("tls.key"))
        .args(extra)
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
    let mut served = Served {
        child,
        lines,
        log: Vec::new(),
        addr: "0.0.0.0:0".parse().unwrap(),
        health: "0.0.0.0:0".parse().unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Some(line) = served.next_line(Duration::from_secs(10)) else {
            break;
        };
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        if v["message"] == "Serving admission on TLS and health on HTTP" {
            served.addr = v["addr"].as_str().unwrap().parse().unwrap();
            served.health = v["health_addr"].as_str().unwrap().parse().unwrap();
            return served;
        }
    }
    let _ = served.child.kill();
    panic!("the server did not start:\n{}", served.log.join("\n"));
}

// ---- Load: clients that behave as the apiserver, counting every failure ----

/// One request sent under load: when it was sent, and what went wrong, if anything.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Instant,
    pub failure: Option<String>,
}

/// Clients posting a review over keep-alive connections until stopped, reconnecting every
/// `reconnect_every` requests so new connections see what the server serves now. A client that
/// retries nothing, like the apiserver: every error is recorded.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sent>>>,
}

impl Load {
    pub fn start(addr: SocketAddr, ca_pem: &str, clients: usize, reconnect_every: usize) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let review = golden_reviews()
            .into_iter()
            .find(|(n, _)| n == "embedded-deployment-create")
            .unwrap()
            .1;
        let tasks = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let config = client_config(ca_pem, &[b"http/1.1"], None);
                let review = review.clone();
                tokio::spawn(async move {
                    let mut sent = Vec::new();
                    // Bounded in count as well as by the stop flag.
                    'connections: while sent.len() < 200_000
                        && !stop.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        let at = Instant::now();
                        let tls = match tls_connect(addr, Arc::clone(&config)).await {
                            Ok(tls) => tls,
                            Err(e) => {
                                sent.push(Sent {
                                    at,
                                    failure: Some(format!("connect: {e}")),
                                });
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                continue;
                            }
                        };
                        let Ok((mut sender, conn)) =
                            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await
                        else {
                            sent.push(Sent {
                                at,
                                failure: Some("http handshake".into()),
                            });
                            continue;
                        };
                        tokio::spawn(conn);
                        for _ in 0..reconnect_every {
                            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                                break 'connections;
                            }
                            let at = Instant::now();
                            let failure = match sender.send_request(review_request(&review)).await {
                                Ok(resp) => {
                                    let (status, answer) = read_json(resp).await;
                                    if status == 200 && answer["response"]["patch"].is_string() {
                                        None
                                    } else {
                                        Some(format!("status {status}: {answer}"))
                                    }
                                }
                                Err(e) => Some(format!("request: {e}")),
                            };
                            let broken = failure.is_some();
                            sent.push(Sent { at, failure });
                            if broken {
                                continue 'connections;
                            }
                        }
                    }
                    sent
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the clients and returns everything they sent.
    pub async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(
                tokio::time::timeout(Duration::from_secs(20), t)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        all
    }
}

/// Asserts that nothing failed, and that there was load to speak of.
pub fn assert_no_failures(sent: &[Sent], at_least: usize) {
    let failures: Vec<&String> = sent.iter().filter_map(|s| s.failure.as_ref()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failures.len(),
        sent.len(),
        failures.first()
    );
    assert!(
        sent.len() >= at_least,
        "only {} requests were sent",
        sent.len()
    );
}
