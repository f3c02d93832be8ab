//! How much memory `outpost-webhook serve --cluster on` holds with 1,000 outposts in its watch
//! cache (issue 13 asks for 32 MiB or less).
//!
//! `cargo run --release --example cluster_rss -- [OUTPOSTS]` (default 1000; 0 for an empty
//! cluster, the baseline).
//!
//! Three processes, all on loopback. This one drives. A child plays the kube-apiserver: it
//! serves OUTPOSTS outpost Deployments and Services (built by `fleet`) and Secret `goauthentik`
//! in list pages, then watches that never end, and a Lease. Another child runs the webhook's
//! own `serve` subcommand (`cmd::run`, what the binary runs) with `--cluster on`, pointed at the
//! first by KUBECONFIG. Once its `/readyz` is true and it holds the Lease (so the reconciler has
//! planned over the whole cache), the driver sends two admission reviews per outpost over TLS,
//! then asks the server, by a line on its stdin, to copy its `/proc/self/status`. It prints
//! `VmHWM` (the peak) and `VmRSS` (now).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod fleet;

use std::{
    error::Error,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{Method, StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use outpost_webhook::{
    cmd::{self, Cli},
    serve::tls,
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use serde_json::{Value, json};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--apiserver") => apiserver(args[1].parse()?),
        Some("--serve") => serve(&args[1..]),
        n => drive(n.map_or(Ok(1000), str::parse)?),
    }
}

/// The driver: starts both children, waits for the server, sends reviews, reads the figures.
fn drive(outposts: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut api = Child(
        Command::new(&exe)
            .args(["--apiserver", &outposts.to_string()])
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut line = String::new();
    BufReader::new(api.0.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let api_addr = line.trim().to_owned();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: 'http://{api_addr}'}}}}]\n\
             users: [{{name: fake, user: {{token: fake}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
        ),
    )?;
    let (addr, health) = (free_addr()?, free_addr()?);
    let ca = dir.path().join("ca").join("ca.crt");
    let status = dir.path().join("status");
    let log = std::fs::File::create(dir.path().join("serve.log"))?;
    let mut server = Child(
        Command::new(&exe)
            .arg("--serve")
            .arg(&status)
            .args([addr.to_string(), health.to_string()])
            .arg(&ca)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", "cluster-rss")
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );

    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    loop {
        let ready = get(health, "/readyz").is_ok_and(|(code, _)| code == 200);
        let leading = get(health, "/metrics")
            .is_ok_and(|(_, m)| metric(&m, "outpost_webhook_cluster_leader") == Some(1.0));
        if ready && leading {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("serve.log"))?;
            return Err(format!("the server was not ready and leading in 120 s:\n{log}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready_after = started.elapsed();

    let ca_pem = std::fs::read_to_string(&ca)?;
    let reviews = 2 * outposts.max(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(send_reviews(addr, &ca_pem, reviews))?;
    // The reconciler runs a pass on each cache change and Lease change; give the last one time
    // to finish before reading the peak.
    std::thread::sleep(Duration::from_secs(2));
    let (_, metrics) = get(health, "/metrics")?;

    server
        .0
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(b"measure\n")?;
    let exit_by = Instant::now() + Duration::from_secs(30);
    while server.0.try_wait()?.is_none() {
        if Instant::now() > exit_by {
            return Err("the server did not report".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(api);

    let status = std::fs::read_to_string(&status)?;
    report(outposts, ready_after, reviews, &metrics, &status);
    Ok(())
}

/// Prints what was measured.
fn report(outposts: usize, ready_after: Duration, reviews: usize, metrics: &str, status: &str) {
    println!("outposts in the fake apiserver: {outposts}");
    println!("ready and leading after: {ready_after:.1?}");
    println!("admission reviews answered: {reviews}");
    for name in [
        "cluster_cache_synced",
        "cluster_cache_deployments",
        "cluster_cache_services",
        "cluster_cache_secrets",
        "cluster_leader",
    ] {
        let value = metric(metrics, &format!("outpost_webhook_{name}"));
        println!("{name}: {}", value.unwrap_or(f64::NAN));
    }
    println!(
        "reconcile writes: {}",
        counter_sum(metrics, "outpost_webhook_reconcile_writes_total")
    );
    for field in ["VmHWM", "VmRSS", "Threads"] {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map_or("?", str::trim);
        println!("{field}: {value}");
    }
}

/// A child process, ended (by its own handle) when the driver is done with it or fails.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server child: `serve --cluster on`, plus a thread that copies `/proc/self/status` to a
/// file and exits when a line arrives on stdin.
fn serve(args: &[String]) -> Result<()> {
    let status = args[0].clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let proc = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        std::fs::write(&status, proc).unwrap();
        std::process::exit(0);
    });
    let cli = <Cli as clap::Parser>::try_parse_from([
        "outpost-webhook",
        "serve",
        "--cluster",
        "on",
        "--addr",
        &args[1],
        "--health-addr",
        &args[2],
        "--dev-ca-out",
        &args[3],
    ])?;
    cmd::run(cli)?;
    Ok(())
}

/// The fake apiserver's state: the fleet, and the Lease as written.
struct Fake {
    fleet: fleet::Fleet,
    lease: Mutex<Option<Value>>,
}

/// The apiserver child: prints its address, then serves until killed.
fn apiserver(outposts: usize) -> Result<()> {
    let fake = Arc::new(Fake {
        fleet: fleet::fleet(outposts),
        lease: Mutex::new(None),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?);
        std::io::stdout().flush()?;
        let app = Router::new().fallback(api).with_state(fake);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

async fn api(State(fake): State<Arc<Fake>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let query = parts.uri.query().unwrap_or_default();
    let param = |key: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    };
    if param("watch") == Some("true") {
        // Nothing changes: the watch stays open, as an idle apiserver's does.
        let pending = futures::stream::pending::<std::result::Result<Bytes, std::io::Error>>();
        return respond(StatusCode::OK, Body::from_stream(pending));
    }
    let path = parts.uri.path();
    let ns = "/namespaces/authentik/";
    let page = |kind: &str, api_version: &str, items: &[Value]| {
        let start: usize = param("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
        let limit: usize = param("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let end = start.saturating_add(limit).min(items.len());
        let mut metadata = json!({"resourceVersion": "200000"});
        if end < items.len() {
            metadata["continue"] = json!(end.to_string());
        }
        let list = json!({"kind": kind, "apiVersion": api_version, "metadata": metadata,
                          "items": items.get(start..end).unwrap_or_default()});
        respond(
            StatusCode::OK,
            Body::from(serde_json::to_vec(&list).unwrap()),
        )
    };
    let f = &fake.fleet;
    match (&parts.method, path) {
        (&Method::GET, p) if p == format!("/apis/apps/v1{ns}deployments") => {
            page("DeploymentList", "apps/v1", &f.deployments)
        }
        (&Method::GET, p) if p == format!("/api/v1{ns}services") => {
            page("ServiceList", "v1", &f.services)
        }
        (&Method::GET, p) if p == format!("/api/v1{ns}secrets") => {
            page("SecretList", "v1", std::slice::from_ref(&f.secret))
        }
        (&Method::GET, p)
            if p.starts_with(&format!("/apis/apps/v1{ns}deployments/"))
                || p.starts_with(&format!("/api/v1{ns}services/")) =>
        {
            // The reconciler reads an object before it patches it.
            let name = p.rsplit('/').next().unwrap_or_default();
            let all = if p.contains("/deployments/") {
                &f.deployments
            } else {
                &f.services
            };
            match all.iter().find(|o| o["metadata"]["name"] == name) {
                Some(o) => respond(StatusCode::OK, Body::from(o.to_string())),
                None => not_found(),
            }
        }
        (&Method::PATCH, p) if p.contains(ns) => {
            // A reconcile write: counted by the server's metrics; nothing is stored.
            let name = p.rsplit('/').next().unwrap_or_default();
            let object = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}});
            respond(StatusCode::OK, Body::from(object.to_string()))
        }
        (&Method::POST, p) if p.starts_with("/apis/events.k8s.io/") => {
            respond(StatusCode::CREATED, Body::from(body.to_vec()))
        }
        (method, p) if p.starts_with("/apis/coordination.k8s.io/v1/namespaces/") => {
            lease(&fake.lease, method, &body)
        }
        _ => not_found(),
    }
}

/// A Lease store that is enough for the webhook's Lease: get, create, and updates that carry
/// the resourceVersion read.
fn lease(store: &Mutex<Option<Value>>, method: &Method, body: &[u8]) -> Response {
    let mut lease = store.lock().unwrap();
    match *method {
        Method::GET => {}
        Method::POST | Method::PUT => {
            let mut written: Value = serde_json::from_slice(body).unwrap();
            let version = lease
                .as_ref()
                .and_then(|l| {
                    l["metadata"]["resourceVersion"]
                        .as_str()?
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0);
            written["metadata"]["resourceVersion"] = json!((version + 1).to_string());
            *lease = Some(written);
        }
        _ => return not_found(),
    }
    match lease.as_ref() {
        Some(l) => respond(StatusCode::OK, Body::from(l.to_string())),
        None => not_found(),
    }
}

fn not_found() -> Response {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "NotFound", "code": 404});
    respond(StatusCode::NOT_FOUND, Body::from(status.to_string()))
}

fn respond(code: StatusCode, body: Body) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap()
}

fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A plain HTTP/1.0 GET: status code and body.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(tcp, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_owned()))
}

/// A gauge's value in the `OpenMetrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The sum of a counter's values over its labels.
fn counter_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `count` reviews over two keep-alive TLS connections, alternating the embedded outpost's
/// Service CREATE and the `public` outpost's Deployment CREATE; each must be answered allowed.
async fn send_reviews(addr: SocketAddr, ca_pem: &str, count: usize) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bodies = [
        Bytes::from(std::fs::read(
            root.join("tests/golden/embedded-service-create/review.json"),
        )?),
        Bytes::from(std::fs::read(root.join(
            "tests/fixtures/admissionreview-public-deployment-create.json",
        ))?),
    ];
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = Arc::new(
        ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut connections = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(&config))
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        connections.push(sender);
    }
    for i in 0..count {
        let sender = &mut connections[i % 2];
        let request = hyper::Request::post("/mutate?timeout=10s")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(bodies[i % 2].clone()))?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let code = response.status();
        let answer: Value =
            serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
        if code != 200 || answer["response"]["allowed"] != true {
            return Err(format!("review {i}: {code} {answer}").into());
        }
    }
    Ok(())
}
