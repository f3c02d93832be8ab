//! Floods from one client address while another is served: the binary on loopback, client A at
//! 127.0.0.1 as the attacker (any pod can reach the port), client B at 127.0.0.2 as the
//! apiserver. The server's peak RSS is the process's own (`VmHWM`). Every attacker stops at the
//! deadline and is bounded in count; the tests run one at a time.
//!
//! `FLOOD_SECONDS` (default 25) sets how long each flood lasts.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
// SERIAL orders whole tests, each on its own runtime.
#![allow(clippy::await_holding_lock)]

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Served, apply_answer, certs_into, golden_review, serve, temp_dir};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

const A: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The bound on the server's peak RSS under a flood.
const PEAK_RSS_KIB: usize = 96 * 1024;
/// The longest one of B's reviews may take, from connect to the whole answer.
const B_LIMIT: Duration = Duration::from_secs(2);
/// The most connections one attacker task opens, whatever the deadline.
const MAX_ROUNDS: usize = 2_000;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn flood_seconds() -> u64 {
    std::env::var("FLOOD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25)
}

/// The soft limit on open files of this process.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Raises this process's soft limit on open files to `at_least`, with util-linux `prlimit` (the
/// crate forbids unsafe code, so no setrlimit here): the attacker's 1,300 sockets are over the
/// usual 1,024. Root may raise the hard limit too.
fn raise_open_files(at_least: u64) {
    if open_files_limit() >= at_least {
        return;
    }
    let pid = std::process::id().to_string();
    for value in [format!("{at_least}:"), format!("{at_least}:{at_least}")] {
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={value}")])
            .status();
        if status.is_ok_and(|s| s.success()) && open_files_limit() >= at_least {
            return;
        }
    }
    panic!(
        "cannot raise the open-files limit to {at_least} (now {}): prlimit (util-linux) is needed",
        open_files_limit()
    );
}

fn status_kib(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

/// What an attacker did: connections opened, and how many the server closed.
#[derive(Default)]
struct Tally {
    opened: AtomicUsize,
    closed_by_server: AtomicUsize,
}

/// Waits until the server closes `io` (EOF or an error), or `until`; true when it closed it.
/// With `dribble`, writes one byte of `head` every 500 ms meanwhile, as a slowloris does.
async fn hold<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    head: &[u8],
    dribble: bool,
    until: Instant,
) -> bool {
    if !dribble {
        io.write_all(head).await.ok();
        io.flush().await.ok();
    }
    let mut buf = [0u8; 512];
    let mut next = 0;
    while Instant::now() < until {
        if dribble && next < head.len() {
            if io.write_all(&head[next..=next]).await.is_err() || io.flush().await.is_err() {
                return true;
            }
            next += 1;
        }
        let read = tokio::time::timeout(Duration::from_millis(500), io.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return true;
        }
    }
    false
}

/// One attacker connection after another from A until `until`: TLS (when `tls` is given) or
/// plain, then `head` at once or dribbled, held until the server closes it, then replaced.
async fn attacker(
    addr: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    head: &'static [u8],
    dribble: bool,
    until: Instant,
    tally: Arc<Tally>,
) {
    for _ in 0..MAX_ROUNDS {
        if Instant::now() >= until {
            return;
        }
        let Ok(tcp) = common::tcp_connect_from(A, addr).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tally.opened.fetch_add(1, Ordering::Relaxed);
        let closed = match &tls {
            Some(config) => {
                let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
                let name = rustls::pki_types::ServerName::try_from(common::SERVER_NAME).unwrap();
                match tokio::time::timeout_at(until.into(), connector.connect(name, tcp)).await {
                    Ok(Ok(stream)) => hold(stream, head, dribble, until).await,
                    Ok(Err(_)) => true,
                    Err(_) => false,
                }
            }
            None => hold(tcp, head, dribble, until).await,
        };
        if closed {
            tally.closed_by_server.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Spawns `n` attackers of one kind.
fn spawn_attackers(
    n: usize,
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    head: &'static [u8],
    dribble: bool,
    until: Instant,
    tally: &Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            tokio::spawn(attacker(
                addr,
                tls.cloned(),
                head,
                dribble,
                until,
                Arc::clone(tally),
            ))
        })
        .collect()
}

/// B's review: a new TLS connection from 127.0.0.2, one POST, the whole answer; timed from the
/// connect.
async fn review_from_b(addr: SocketAddr, config: Arc<ClientConfig>, review: &Value) -> Duration {
    let started = Instant::now();
    let answered = async {
        let tls = common::tls_connect_from(B, addr, config).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender
            .send_request(common::review_request(review))
            .await
            .unwrap();
        common::read_json(resp).await
    };
    let (status, answer) = tokio::time::timeout(Duration::from_secs(20), answered)
        .await
        .expect("B's review hung");
    let took = started.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert!(answer["response"]["patch"].is_string(), "{answer}");
    apply_answer(review, &answer);
    took
}

/// A plain GET from 127.0.0.2 on the health port: status and body.
async fn health_from_b(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = common::tcp_connect_from(B, addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The sum of every series of a metric whose labels contain `labels`.
fn metric_sum(metrics: &str, name: &str, labels: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Samples the server's RSS every 100 ms until `until`; returns the highest.
fn sample_rss(pid: u32, until: Instant) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while Instant::now() < until {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                break;
            };
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            {
                peak = peak.max(kib);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The admission flood: A's `idle` TLS connections and `dribble` slowloris ones for the flood's
/// length while B sends 40 reviews, each on a new connection. Asserts B's answers and times, the
/// peak RSS, that A was shed, and that the server is ready afterwards.
fn admission_flood(idle: usize, dribble: usize) {
    raise_open_files(8192);
    let dir = temp_dir("flood");
    certs_into(&dir);
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
    let served = serve(&dir, &[]);
    let pid = served.child.id();
    let seconds = flood_seconds();
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let rss = sample_rss(pid, until + Duration::from_secs(1));
    let (times, metrics) = runtime().block_on(async {
        let config = common::client_config(&ca, &[b"http/1.1"], None);
        let tally = Arc::new(Tally::default());
        let head: &'static [u8] =
            b"POST /mutate?timeout=10s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
        let mut attackers =
            spawn_attackers(idle, served.addr, Some(&config), b"", false, until, &tally);
        attackers.extend(spawn_attackers(
            dribble,
            served.addr,
            Some(&config),
            head,
            true,
            until,
            &tally,
        ));
        // B, as the apiserver, on its own thread and runtime (it shares no scheduler with the
        // attacker), starts once the flood is under way and spreads its 40 reviews over it.
        let review = golden_review("embedded-deployment-create");
        let b = {
            let (addr, config, review) = (served.addr, Arc::clone(&config), review.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    tokio::time::sleep(
                        Duration::from_secs(3).min(Duration::from_secs(seconds / 4)),
                    )
                    .await;
                    let gap = Duration::from_secs(seconds).saturating_sub(start.elapsed()) / 41;
                    let mut times = Vec::new();
                    for _ in 0..40 {
                        times.push(review_from_b(addr, Arc::clone(&config), &review).await);
                        tokio::time::sleep(gap).await;
                    }
                    times
                })
            })
        };
        let times = tokio::task::spawn_blocking(move || b.join().unwrap())
            .await
            .unwrap();
        for a in attackers {
            tokio::time::timeout(Duration::from_secs(30), a)
                .await
                .expect("an attacker outlived the deadline")
                .unwrap();
        }
        let opened = tally.opened.load(Ordering::Relaxed);
        assert!(
            opened >= idle + dribble,
            "the attacker opened only {opened} connections"
        );
        // Ready afterwards, and serving.
        assert_eq!(health_from_b(served.health, "/readyz").await.0, 200);
        review_from_b(served.addr, Arc::clone(&config), &review).await;
        (times, health_from_b(served.health, "/metrics").await.1)
    });
    let peak = rss.join().unwrap().max(status_kib(pid, "VmHWM:"));
    let slowest = times.iter().max().unwrap();
    eprintln!(
        "flood of {idle} idle + {dribble} dribbling TLS connections for {seconds} s: B's 40 reviews \
         answered, slowest {slowest:?} ({times:?}); server peak RSS {peak} KiB"
    );
    assert!(*slowest < B_LIMIT, "a review took {slowest:?}: {times:?}");
    assert!(peak <= PEAK_RSS_KIB, "peak RSS {peak} KiB");
    let shed = metric_sum(
        &metrics,
        "outpost_webhook_connections_shed_total",
        "port=\"admission\",reason=\"peer_pending\"",
    );
    assert!(shed > 0, "nothing was shed:\n{metrics}");
    assert_eq!(
        metric_sum(&metrics, "outpost_webhook_panics_total", ""),
        0,
        "{metrics}"
    );
    stop(served, Duration::from_secs(20));
}

/// SIGTERM, and the exit code within `limit`.
fn stop(mut served: Served, limit: Duration) -> Duration {
    let sent = Instant::now();
    served.sigterm();
    let status = served.wait_exit(limit);
    assert!(status.success(), "{status}");
    sent.elapsed()
}

#[test]
fn a_flood_of_idle_and_dribbling_connections_from_one_address_leaves_another_served() {
    let _serial = one_at_a_time();
    admission_flood(1000, 300);
}

#[test]
fn three_hundred_slowloris_connections_leave_another_address_served() {
    let _serial = one_at_a_time();
    admission_flood(0, 300);
}

#[test]
fn three_thousand_half_sent_requests_on_the_health_port_stay_bounded_and_sigterm_still_stops() {
    let _serial = one_at_a_time();
    raise_open_files(8192);
    let dir = temp_dir("health-flood");
    certs_into(&dir);
    let (drain, grace) = (Duration::from_secs(1), Duration::from_secs(3));
    let served = serve(&dir, &["--shutdown-grace", "3s"]); // --drain-seconds 1
    let pid = served.child.id();
    let seconds = flood_seconds();
    let until = Instant::now() + Duration::from_secs(seconds);
    let rss = sample_rss(pid, until);
    let tally = Arc::new(Tally::default());
    let rt = runtime();
    // The attackers go on through the shutdown below.
    let attackers_until = until + drain + grace + Duration::from_secs(5);
    let attackers = rt.block_on(async {
        let attackers = spawn_attackers(
            3000,
            served.health,
            None,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
            false,
            attackers_until,
            &tally,
        );
        // The kubelet, from another address, is answered throughout.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut slowest = Duration::ZERO;
        let mut asked_times = 0;
        while Instant::now() < until {
            let asked = Instant::now();
            let (status, _) = tokio::time::timeout(
                Duration::from_secs(10),
                health_from_b(served.health, "/readyz"),
            )
            .await
            .expect("/readyz hung");
            assert_eq!(status, 200);
            slowest = slowest.max(asked.elapsed());
            asked_times += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(asked_times > 0);
        assert!(slowest < B_LIMIT, "/readyz took {slowest:?}");
        let (_, metrics) = health_from_b(served.health, "/metrics").await;
        let shed = metric_sum(
            &metrics,
            "outpost_webhook_connections_shed_total",
            "port=\"health\"",
        );
        assert!(shed > 0, "nothing was shed:\n{metrics}");
        attackers
    });
    let peak = rss.join().unwrap().max(status_kib(pid, "VmHWM:"));
    let opened = tally.opened.load(Ordering::Relaxed);
    eprintln!("health flood: {opened} half-sent requests over {seconds} s; peak RSS {peak} KiB");
    assert!(opened >= 3000, "the attacker opened only {opened}");
    assert!(peak <= PEAK_RSS_KIB, "peak RSS {peak} KiB");
    // SIGTERM while the half-sent requests still arrive: the process stops within its drain and
    // grace, however many of them are open.
    let took = stop(served, drain + grace + Duration::from_secs(5));
    eprintln!("SIGTERM under the health flood: exited 0 after {took:?}");
    assert!(
        took <= drain + grace + Duration::from_secs(2),
        "took {took:?} to stop"
    );
    for a in attackers {
        a.abort();
    }
}
