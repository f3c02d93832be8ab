//! The hostile load of issue 12, against a running `serve` on loopback, while a normal client
//! sends one review every 100 ms and times it, and the server's resident memory is sampled. The
//! server's connection limits are per client address: the normal client (the apiserver)
//! connects from 127.0.0.2, each kind of attacker from an address of its own (127.0.0.3 to 6).
//!
//! `scripts/hostile-load.sh` builds and starts the server and runs this; by hand:
//! `hostile_load ADDR HEALTH_ADDR CA_FILE SERVER_PID [SECONDS=40]`. Prints what each attacker
//! was answered, the peak RSS against `budget::worst_case_rss` and the Deployment's 128 MiB
//! limit, and the normal review's latency; exits 1 when the peak is over either or a normal
//! review took 100 ms or more. Every attacker stops at the deadline, and each loop is also bounded
//! in count. Only loopback addresses are accepted.

// An example, not the product: a failed setup step should stop it with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, body::Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use outpost_webhook::serve::{budget, listen, tls};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// The review a normal client sends: the embedded outpost's Service, as the apiserver sends it.
const REVIEW: &str = include_str!("../tests/golden/embedded-service-create/review.json");
/// The Deployment's memory limit (deploy/base/deployment.yaml).
const DEPLOYMENT_LIMIT: usize = 128 << 20;
/// The server's `--max-connections` default, which the Deployment keeps.
const MAX_CONNECTIONS: usize = outpost_webhook::serve::DEFAULT_MAX_CONNECTIONS;
/// The normal client's address: another client than the attackers'.
const NORMAL_CLIENT: std::net::IpAddr = from(2);

/// 127.0.0.`n`. Each kind of attacker connects from its own address (big HTTP/2 streams 3,
/// idle prefaces 4, slow bodies 5, big HTTP/1 bodies 6), so that every kind gets within the
/// server's per-peer limits and together they reach the port's: the memory bound is what is
/// tested.
const fn from(n: u8) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, n))
}
/// The hostile bodies of the issue.
const BIG_BODY: usize = 6 << 20;
const H2_STREAMS: usize = 256;
/// Connections of each kind, 104 in all with the normal client's, under `--max-connections`. The
/// 48 idle prefaces are over `--max-pending-per-peer` (32) of their address, so the oldest of
/// them gives way to each newer one.
const H2_CONNECTIONS: usize = H2_STREAMS / listen::H2_MAX_STREAMS as usize;
const IDLE_CONNECTIONS: usize = 48;
const SLOW_CONNECTIONS: usize = 16;
const H1_BIG_CONNECTIONS: usize = 8;
/// The most rounds any one attacker makes, whatever the deadline.
const MAX_ROUNDS: usize = 10_000;

/// What one kind of attacker was answered: a status or an error, and how often.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    fn add(&self, what: impl Into<String>) {
        *self.0.lock().unwrap().entry(what.into()).or_default() += 1;
    }

    fn show(&self) -> String {
        let map = self.0.lock().unwrap();
        if map.is_empty() {
            return "nothing".into();
        }
        map.iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The longest of some durations.
#[derive(Default)]
struct Longest(Mutex<Duration>);

impl Longest {
    fn add(&self, d: Duration) {
        let mut m = self.0.lock().unwrap();
        *m = (*m).max(d);
    }

    fn get(&self) -> Duration {
        *self.0.lock().unwrap()
    }
}

/// A request body of `total` bytes of spaces in 64 KiB frames, with no length announced: the
/// server cannot refuse it from the head and must count what it reads.
struct Spaces {
    chunk: Bytes,
    left: usize,
}

impl hyper::body::Body for Spaces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let n = self.left.min(self.chunk.len());
        if n == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
}

/// A request body fed by a channel: a client as slow as it likes.
struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Channel {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn client_config(ca_pem: &str, alpn: &[u8]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// A TLS connection to the development certificate's name, from the loopback address `local`
/// when given.
async fn connect_from(
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = match local {
        Some(local) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(local, 0))?;
            socket.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    tcp.set_nodelay(true)?;
    TlsConnector::from(Arc::clone(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn post(query: &str) -> hyper::http::request::Builder {
    Request::post(format!("/mutate?{query}"))
        .header("host", "localhost")
        .header("content-type", "application/json")
}

/// The short form of an error, to count like errors together.
fn kind_of(e: &hyper::Error) -> String {
    let text = format!("{e:?}");
    if text.contains("REFUSED_STREAM") {
        "REFUSED_STREAM".into()
    } else {
        format!(
            "error: {}",
            e.to_string().chars().take(60).collect::<String>()
        )
    }
}

/// 8 streams at a time on one HTTP/2 connection (the server's limit), each a 6 MiB body of no
/// announced length under `?timeout=1h`, round after round until the deadline.
async fn h2_big_streams(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    until: Instant,
    tally: Arc<Tally>,
) {
    let Ok(tls) = connect_from(Some(from(3)), addr, &config).await else {
        tally.add("connect failed");
        return;
    };
    let Ok((sender, conn)) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await
    else {
        tally.add("handshake failed");
        return;
    };
    tokio::spawn(conn);
    let chunk = Bytes::from(vec![b' '; 64 << 10]);
    for _ in 0..MAX_ROUNDS {
        if Instant::now() >= until || sender.is_closed() {
            break;
        }
        let mut streams = Vec::new();
        for _ in 0..listen::H2_MAX_STREAMS {
            let mut sender = sender.clone();
            let body = Spaces {
                chunk: chunk.clone(),
                left: BIG_BODY,
            };
            let tally = Arc::clone(&tally);
            streams.push(tokio::spawn(async move {
                if sender.ready().await.is_err() {
                    tally.add("connection closed");
                    return;
                }
                let req = post("timeout=1h").body(body).unwrap();
                match tokio::time::timeout(Duration::from_secs(60), sender.send_request(req)).await
                {
                    Ok(Ok(resp)) => {
                        tally.add(resp.status().as_str());
                        let _ = resp.into_body().collect().await;
                    }
                    Ok(Err(e)) => tally.add(kind_of(&e)),
                    Err(_) => tally.add("no answer in 60 s"),
                }
            }));
        }
        for s in streams {
            let _ = s.await;
        }
    }
}

/// Connections that send the HTTP/2 preface and an empty SETTINGS frame, then nothing: how long
/// the server keeps each. Reopened as they are closed.
async fn idle_prefaces(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    until: Instant,
    tally: Arc<Tally>,
    held: Arc<Longest>,
) {
    for _ in 0..MAX_ROUNDS {
        if Instant::now() >= until {
            break;
        }
        let opened = Instant::now();
        let Ok(mut tls) = connect_from(Some(from(4)), addr, &config).await else {
            tally.add("connect failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        if tls.write_all(preface).await.is_err() || tls.flush().await.is_err() {
            tally.add("write failed");
            continue;
        }
        let mut sink = Vec::new();
        let read = tokio::time::timeout_at(until.into(), tls.read_to_end(&mut sink)).await;
        held.add(opened.elapsed());
        tally.add(if read.is_ok() {
            "closed by the server"
        } else {
            "still open at the deadline"
        });
    }
}

/// HTTP/1 requests under `?timeout=1000h` whose body arrives 64 bytes a second: how long the
/// server waits for each.
async fn slow_bodies(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    until: Instant,
    tally: Arc<Tally>,
    held: Arc<Longest>,
) {
    let review = Bytes::from_static(REVIEW.as_bytes());
    for _ in 0..MAX_ROUNDS {
        if Instant::now() >= until {
            break;
        }
        let Ok(tls) = connect_from(Some(from(5)), addr, &config).await else {
            tally.add("connect failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await
        else {
            tally.add("handshake failed");
            continue;
        };
        tokio::spawn(conn);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let req = post("timeout=1000h")
            .header("content-length", review.len())
            .body(Channel(rx))
            .unwrap();
        let piece = review.clone();
        let feeder = tokio::spawn(async move {
            for at in (0..piece.len()).step_by(64) {
                if tx
                    .send(piece.slice(at..(at + 64).min(piece.len())))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let started = Instant::now();
        match tokio::time::timeout(Duration::from_secs(90), sender.send_request(req)).await {
            Ok(Ok(resp)) => tally.add(resp.status().as_str()),
            Ok(Err(e)) => tally.add(kind_of(&e)),
            Err(_) => tally.add("no answer in 90 s"),
        }
        held.add(started.elapsed());
        feeder.abort();
    }
}

/// An HTTP/1 keep-alive client, as the apiserver pools them, that reconnects when the server has
/// closed its connection.
struct KeepAlive {
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl KeepAlive {
    fn new(addr: SocketAddr, config: Arc<ClientConfig>) -> Self {
        Self {
            local: None,
            addr,
            config,
            sender: None,
        }
    }

    /// A connection ready for a request: the open one, or a new one.
    async fn connected(
        &mut self,
    ) -> Result<&mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
        if self
            .sender
            .as_ref()
            .is_none_or(hyper::client::conn::http1::SendRequest::is_closed)
        {
            let tls = connect_from(self.local, self.addr, &self.config)
                .await
                .map_err(|_| "connect failed".to_owned())?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| kind_of(&e))?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().ok_or("no connection")?;
        sender.ready().await.map_err(|e| kind_of(&e))?;
        Ok(sender)
    }

    /// `POST /mutate?{query}` with `body`; the status and the whole answer, within `limit`.
    async fn review(
        &mut self,
        query: &str,
        body: &Bytes,
        limit: Duration,
    ) -> Result<(u16, Bytes), String> {
        let sender = self.connected().await?;
        let req = post(query)
            .header("content-length", body.len())
            .body(Full::new(body.clone()))
            .unwrap();
        let answered = async {
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            Ok::<_, hyper::Error>((status, resp.into_body().collect().await?.to_bytes()))
        };
        let result = match tokio::time::timeout(limit, answered).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => kind_of(&e),
            Err(_) => format!("no answer in {} s", limit.as_secs()),
        };
        self.sender = None;
        Err(result)
    }
}

/// Concurrent HTTP/1 reviews just under the body limit, the bulk in a label the rules keep.
async fn h1_big_bodies(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    until: Instant,
    tally: Arc<Tally>,
    body: Bytes,
) {
    let mut client = KeepAlive::new(addr, config);
    client.local = Some(from(6));
    for _ in 0..MAX_ROUNDS {
        if Instant::now() >= until {
            break;
        }
        match client
            .review("timeout=10s", &body, Duration::from_secs(60))
            .await
        {
            Ok((status, _)) => tally.add(status.to_string()),
            Err(e) => {
                tally.add(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The normal client: one review every 100 ms over a keep-alive HTTP/1 connection (reopened if
/// the server closes it), each timed from the request to the whole answer. On its own thread and
/// runtime, so the attackers' tasks never delay its timing.
fn normal_reviews(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    from: Instant,
    until: Instant,
) -> (Vec<Duration>, Tally) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let (mut latencies, tally) = (Vec::new(), Tally::default());
        let body = Bytes::from_static(REVIEW.as_bytes());
        let mut client = KeepAlive::new(addr, config);
        client.local = Some(NORMAL_CLIENT);
        tokio::time::sleep_until(from.into()).await;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for _ in 0..MAX_ROUNDS {
            tick.tick().await;
            if Instant::now() >= until {
                break;
            }
            // A connection first: the time of a review, not of a TLS handshake, is measured.
            if let Err(e) = client.connected().await {
                tally.add(e);
                continue;
            }
            let started = Instant::now();
            match client
                .review("timeout=10s", &body, Duration::from_secs(10))
                .await
            {
                Ok((status, answer)) => {
                    latencies.push(started.elapsed());
                    let allowed = serde_json::from_slice::<Value>(&answer)
                        .is_ok_and(|v| v["response"]["allowed"] == json!(true));
                    tally.add(if status == 200 && allowed {
                        "200 allowed".to_owned()
                    } else {
                        status.to_string()
                    });
                }
                Err(e) => tally.add(e),
            }
        }
        (latencies, tally)
    })
}

/// `VmRSS` or `VmHWM` of `pid`, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()
}

/// A plain GET on the health port.
async fn health_get(addr: SocketAddr, path: &str) -> Option<String> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

fn metric(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or("?")
        .to_owned()
}

/// The non-zero series of `connections_shed_total`, by their labels.
fn shed(metrics: &str) -> String {
    let shed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("outpost_webhook_connections_shed_total") && !l.ends_with(" 0"))
        .map(|l| l.trim_start_matches("outpost_webhook_connections_shed_total"))
        .collect();
    if shed.is_empty() {
        "none".into()
    } else {
        shed.join(", ")
    }
}

fn mib(bytes: usize) -> String {
    let kib = u32::try_from(bytes >> 10).unwrap_or(u32::MAX);
    format!("{:.1} MiB", f64::from(kib) / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

type BoxedAttacker = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The attackers, all at once until `until`.
struct Attack {
    addr: SocketAddr,
    h1: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
    until: Instant,
    /// What each kind was answered: big HTTP/2 streams, idle prefaces, slow bodies, big HTTP/1.
    tallies: [Arc<Tally>; 4],
    idle_held: Arc<Longest>,
    slow_held: Arc<Longest>,
}

impl Attack {
    async fn run(&self, big: &Bytes) {
        let (addr, until) = (self.addr, self.until);
        let (h1, h2, t) = (&self.h1, &self.h2, &self.tallies);
        let mut tasks = Vec::new();
        let mut spawn = |n: usize, attacker: &dyn Fn() -> BoxedAttacker| {
            tasks.extend((0..n).map(|_| tokio::spawn(attacker())));
        };
        spawn(H2_CONNECTIONS, &|| {
            Box::pin(h2_big_streams(
                addr,
                Arc::clone(h2),
                until,
                Arc::clone(&t[0]),
            ))
        });
        spawn(IDLE_CONNECTIONS, &|| {
            let held = Arc::clone(&self.idle_held);
            Box::pin(idle_prefaces(
                addr,
                Arc::clone(h2),
                until,
                Arc::clone(&t[1]),
                held,
            ))
        });
        spawn(SLOW_CONNECTIONS, &|| {
            let held = Arc::clone(&self.slow_held);
            Box::pin(slow_bodies(
                addr,
                Arc::clone(h1),
                until,
                Arc::clone(&t[2]),
                held,
            ))
        });
        spawn(H1_BIG_CONNECTIONS, &|| {
            Box::pin(h1_big_bodies(
                addr,
                Arc::clone(h1),
                until,
                Arc::clone(&t[3]),
                big.clone(),
            ))
        });
        for t in tasks {
            // Each attacker ends within its longest wait (90 s) of the deadline.
            let _ = tokio::time::timeout(Duration::from_secs(180), t).await;
        }
    }
}

/// What was measured on the server.
struct Server {
    pid: u32,
    rss_before: usize,
    peak: usize,
    hwm: usize,
    alive: bool,
    metrics: String,
}

/// Prints the results; whether every requirement held.
fn report(
    seconds: u64,
    attack: &Attack,
    big: usize,
    normal: (Vec<Duration>, Tally),
    server: &Server,
) -> bool {
    let (mut sorted, normal_tally) = normal;
    sorted.sort();
    let pick = |percent: usize| {
        sorted
            .get(sorted.len().saturating_sub(1) * percent / 100)
            .copied()
            .unwrap_or_default()
    };
    let over_100ms = sorted
        .iter()
        .filter(|d| **d >= Duration::from_millis(100))
        .count();
    let bound = budget::worst_case_rss(
        budget::DEFAULT_MAX_INFLIGHT_BYTES,
        MAX_CONNECTIONS,
        outpost_webhook::serve::DEFAULT_HEALTH_MAX_CONNECTIONS,
    );
    let panics = metric(&server.metrics, "outpost_webhook_panics_total");
    let t = &attack.tallies;
    println!(
        "hostile load for {seconds} s against {} (server pid {})",
        attack.addr, server.pid
    );
    println!(
        "  {H2_STREAMS} HTTP/2 streams x 6 MiB, no length, ?timeout=1h ({H2_CONNECTIONS} connections x {}): {}",
        listen::H2_MAX_STREAMS,
        t[0].show()
    );
    println!(
        "  {IDLE_CONNECTIONS} idle HTTP/2 connections (preface only), reopened: {}; longest held {:.1} s",
        t[1].show(),
        attack.idle_held.get().as_secs_f64()
    );
    println!(
        "  {SLOW_CONNECTIONS} HTTP/1 bodies at 64 B/s under ?timeout=1000h: {}; longest held {:.1} s",
        t[2].show(),
        attack.slow_held.get().as_secs_f64()
    );
    println!(
        "  {H1_BIG_CONNECTIONS} concurrent HTTP/1 bodies of {}: {}",
        mib(big),
        t[3].show()
    );
    println!(
        "normal review (every 100 ms, from 2 s in): {}",
        normal_tally.show()
    );
    println!(
        "  latency p50 {}, p99 {}, max {}; {over_100ms} of {} at 100 ms or more",
        ms(pick(50)),
        ms(pick(99)),
        ms(pick(100)),
        sorted.len()
    );
    println!(
        "server RSS: {} before, peak sampled {}, VmHWM {}",
        mib(server.rss_before),
        mib(server.peak),
        mib(server.hwm)
    );
    println!(
        "  bound budget::worst_case_rss({}, {MAX_CONNECTIONS}, health) = {}; Deployment limit {}",
        mib(budget::DEFAULT_MAX_INFLIGHT_BYTES),
        mib(bound),
        mib(DEPLOYMENT_LIMIT)
    );
    println!(
        "server after: alive {}, panics_total {panics}, connections_open {}",
        server.alive,
        metric(&server.metrics, "outpost_webhook_connections_open")
    );
    println!("  connections shed: {}", shed(&server.metrics));
    let peak = server.hwm.max(server.peak);
    let mut failed = Vec::new();
    if peak >= bound {
        failed.push("the peak RSS reached the documented bound");
    }
    if peak >= DEPLOYMENT_LIMIT {
        failed.push("the peak RSS reached the Deployment's limit");
    }
    let all_allowed = normal_tally
        .0
        .lock()
        .unwrap()
        .keys()
        .all(|k| k == "200 allowed");
    if sorted.is_empty() || over_100ms > 0 || !all_allowed {
        failed.push("a normal review was not answered 200 in under 100 ms");
    }
    if !server.alive || panics != "0" {
        failed.push("the server died or panicked");
    }
    if failed.is_empty() {
        println!("PASS");
    } else {
        println!("FAIL: {}", failed.join("; "));
    }
    failed.is_empty()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    assert!(
        (4..=5).contains(&args.len()),
        "usage: hostile_load ADDR HEALTH_ADDR CA_FILE SERVER_PID [SECONDS=40]"
    );
    let addr: SocketAddr = args[0].parse().unwrap();
    let health: SocketAddr = args[1].parse().unwrap();
    assert!(
        addr.ip().is_loopback() && health.ip().is_loopback(),
        "loopback addresses only"
    );
    let ca = std::fs::read_to_string(&args[2]).unwrap();
    let pid: u32 = args[3].parse().unwrap();
    let seconds: u64 = args.get(4).map_or(40, |s| s.parse().unwrap());

    let mut review: Value = serde_json::from_str(REVIEW).unwrap();
    review["request"]["object"]["metadata"]["labels"]["example.com/big"] =
        json!("x".repeat(budget::DEFAULT_MAX_BODY_BYTES - (16 << 10)));
    let big = Bytes::from(serde_json::to_vec(&review).unwrap());

    let rss_before = status_kib(pid, "VmRSS:").unwrap() * 1024;
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let attack = Attack {
        addr,
        h1: client_config(&ca, b"http/1.1"),
        h2: client_config(&ca, b"h2"),
        until,
        tallies: Default::default(),
        idle_held: Arc::default(),
        slow_held: Arc::default(),
    };
    // Sample the server's RSS every 100 ms.
    let peak_kib = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = std::thread::spawn({
        let peak_kib = Arc::clone(&peak_kib);
        move || {
            while Instant::now() < until + Duration::from_secs(2) {
                if let Some(kib) = status_kib(pid, "VmRSS:") {
                    peak_kib.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    // The normal client starts once the attack is under way.
    let normal = std::thread::spawn({
        let h1 = Arc::clone(&attack.h1);
        move || normal_reviews(addr, h1, start + Duration::from_secs(2), until)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let metrics = runtime.block_on(async {
        attack.run(&big).await;
        health_get(health, "/metrics").await.unwrap_or_default()
    });
    let normal = normal.join().unwrap();
    sampler.join().unwrap();
    let server = Server {
        pid,
        rss_before,
        peak: peak_kib.load(std::sync::atomic::Ordering::Relaxed) * 1024,
        hwm: status_kib(pid, "VmHWM:").unwrap_or(0) * 1024,
        // A zombie has no VmRSS.
        alive: status_kib(pid, "VmRSS:").is_some(),
        metrics,
    };
    if !report(seconds, &attack, big.len(), normal, &server) {
        std::process::exit(1);
    }
}
