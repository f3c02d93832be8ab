//! Faults and hostile input, against a real server on 127.0.0.1 (in-process, or the binary where
//! the process itself is under test). "Failed" means what an apiserver would see: a non-200
//! answer or a connection error, with no retry. Every test is bounded in time and count.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
// SERIAL orders whole tests, each on its own runtime (see one_at_a_time).
#![allow(clippy::await_holding_lock)]

mod common;

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    BIN, Http1, Load, TestServer, apply_answer, assert_no_failures, certs_into, golden_reviews,
    health_get, serve, serve_with, temp_dir,
};
use outpost_webhook::{pki::Ca, serve::metrics::Reloaded};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The fault tests load both cores; one at a time keeps each within its bounds. The guard is held
/// across awaits on purpose: each test runs on its own runtime, and the lock orders whole tests.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sans() -> Vec<String> {
    let mut sans = outpost_webhook::pki::service_dns_names("outpost-webhook", "outpost-webhook");
    sans.push("127.0.0.1".into());
    sans
}

/// Runs `fault` while 4 clients load `server` (reconnecting every `reconnect_every` requests, so
/// new connections see what is served now), with load before and after it, and asserts that no
/// request failed.
async fn no_request_fails_during(
    server: &TestServer,
    ca: &str,
    reconnect_every: usize,
    fault: impl AsyncFnOnce(),
) {
    let load = Load::start(server.addr(), ca, 4, reconnect_every);
    load.wait_for(25, Duration::from_secs(20)).await;
    fault().await;
    load.wait_for(load.answered() + 25, Duration::from_secs(20))
        .await;
    assert_no_failures(&load.finish().await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_certificate_ten_times_under_load_fails_no_request() {
    let _serial = one_at_a_time();
    let ca = Ca::new("rotation CA", 1).unwrap();
    let server = TestServer::start_with_certs(ca.serving(&sans(), 1).unwrap(), |_| {}).await;
    let app = Arc::clone(&server.running.app);
    no_request_fails_during(&server, &ca.pem(), 10, async || {
        for generation in 2..=11 {
            let g = ca.serving(&sans(), 1).unwrap();
            common::write_secret_volume(server.dir.path(), generation, &g.cert_pem, &g.key_pem);
            app.reload();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    })
    .await;
    assert_eq!(app.metrics.reloads(Reloaded::Certificate), (10, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_certificate_written_under_load_is_refused_and_the_old_one_serves() {
    let _serial = one_at_a_time();
    let ca = Ca::new("CA", 1).unwrap();
    let server = TestServer::start_with_certs(ca.serving(&sans(), 1).unwrap(), |_| {}).await;
    let app = Arc::clone(&server.running.app);
    no_request_fails_during(&server, &ca.pem(), 5, async || {
        let good_key = std::fs::read_to_string(server.dir.path().join("tls.key")).unwrap();
        let garbage = "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n";
        common::write_secret_volume(server.dir.path(), 2, garbage, &good_key);
        app.reload();
    })
    .await;
    assert_eq!(app.metrics.reloads(Reloaded::Certificate), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_policy_written_under_load_is_refused_and_the_old_one_stays() {
    let _serial = one_at_a_time();
    let dir = temp_dir("policy-fault");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "rules: [{deployment: {replicas: 3}}]").unwrap();
    let path = policy.clone();
    let server = TestServer::start_with(|c| c.policy = Some(path)).await;
    let app = Arc::clone(&server.running.app);
    no_request_fails_during(&server, &server.ca_pem, 10, async || {
        std::fs::write(&policy, "rules: [{deployment: {replicas: 3, replica: 4}}]").unwrap();
        app.reload();
    })
    .await;
    assert_eq!(app.metrics.reloads(Reloaded::Policy), (0, 1));
    let review = common::golden_review("embedded-deployment-create");
    let mut client = Http1::connect(server.addr(), &server.ca_pem).await;
    let (_, answer) = client.review(&review).await;
    assert_eq!(apply_answer(&review, &answer)["spec"]["replicas"], 3);
}

#[test]
fn sigterm_under_load_turns_readiness_first_and_exits_zero_within_the_drain() {
    let _serial = one_at_a_time();
    let dir = temp_dir("sigterm-load");
    certs_into(&dir);
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
    let mut served = serve(&dir, &[]); // --drain-seconds 1
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (sent, turned) = runtime.block_on(async {
        let load = Load::start(served.addr, &ca, 4, 1_000);
        load.wait_for(100, Duration::from_secs(20)).await;
        served.sigterm();
        let deadline = Instant::now() + Duration::from_secs(1);
        let turned = loop {
            if health_get(served.health, "/readyz").await.0 == 503 {
                break Instant::now();
            }
            assert!(Instant::now() < deadline, "/readyz did not turn");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // Keep loading through the drain, until the listener closes.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        (load.finish().await, turned)
    });
    let before: Vec<_> = sent.iter().filter(|s| s.at < turned).cloned().collect();
    assert_no_failures(&before, 100);
    let status = served.wait_exit(Duration::from_secs(3));
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_slow_clients_give_way_oldest_first_and_a_normal_one_is_served() {
    let _serial = one_at_a_time();
    // Room for all 500 on the port: the per-peer limit alone decides.
    let server = TestServer::start_with(|c| {
        c.settings.max_connections = 1000;
        c.settings.max_connections_per_peer = 64;
        c.settings.max_pending_per_peer = 32;
    })
    .await;
    let config = common::client_config(&server.ca_pem, &[b"http/1.1"], None);
    let mut slow = Vec::new();
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..500 {
        let config = Arc::clone(&config);
        let addr = server.addr();
        let closed = Arc::clone(&closed);
        slow.push(tokio::spawn(async move {
            // One byte of headers a second, for at most 5 s; a connection the server closes
            // (in its handshake, or after) is counted once.
            let gone = async {
                let mut tls = common::tls_connect(addr, config).await.ok()?;
                for byte in b"POST /mu".iter().take(5) {
                    tls.write_all(&[*byte]).await.ok()?;
                    tls.flush().await.ok()?;
                    let mut buf = [0u8; 16];
                    if let Ok(read) =
                        tokio::time::timeout(Duration::from_secs(1), tls.read(&mut buf)).await
                    {
                        // EOF or an error: the server closed it.
                        if read.map_or(true, |n| n == 0) {
                            return None;
                        }
                    }
                }
                Some(())
            };
            if gone.await.is_none() {
                closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    // The slow clients' oldest are closed as newer ones arrive: all but the newest 32 pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    while closed.load(std::sync::atomic::Ordering::Relaxed) < 500 - 32 {
        assert!(
            Instant::now() < deadline,
            "the slow clients were not shed: {} closed",
            closed.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A normal client from the same address: its connection is the newest, and once it has sent
    // a request it is no longer pending.
    let review = golden_reviews().remove(0).1;
    let mut client = Http1::connect(server.addr(), &server.ca_pem).await;
    for _ in 0..20 {
        let (status, _) = tokio::time::timeout(Duration::from_secs(10), client.review(&review))
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    let shed = metric(
        server.running.health_addr,
        "outpost_webhook_connections_shed_total{port=\"admission\",reason=\"peer_pending\",state=\"no_request\"}",
    )
    .await
        + metric(
            server.running.health_addr,
            "outpost_webhook_connections_shed_total{port=\"admission\",reason=\"peer_pending\",state=\"handshake\"}",
        )
        .await;
    assert!(shed >= 500 - 32, "shed {shed}");
    assert!(connections_open(server.running.health_addr).await <= 33);
    for task in slow {
        task.abort();
    }
}

#[test]
fn two_thousand_connections_at_once_are_served_or_shed_cleanly() {
    let _serial = one_at_a_time();
    let dir = temp_dir("c2000");
    certs_into(&dir);
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
    // One client address: the port's limit is what is tested, so the per-peer ones are as large.
    let mut served = serve(
        &dir,
        &[
            "--max-connections",
            "500",
            "--max-connections-per-peer",
            "2000",
            "--max-pending-per-peer",
            "2000",
        ],
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let review = golden_reviews().remove(0).1;
        let config = common::client_config(&ca, &[b"http/1.1"], None);
        let all_tried = Arc::new(tokio::sync::Barrier::new(2000));
        let mut tasks = Vec::new();
        for _ in 0..2000 {
            let (config, review, all_tried) =
                (Arc::clone(&config), review.clone(), Arc::clone(&all_tried));
            let addr = served.addr;
            tasks.push(tokio::spawn(async move {
                let outcome = async {
                    let tls = common::tls_connect(addr, config)
                        .await
                        .map_err(|e| e.to_string())?;
                    let (mut sender, conn) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                            .await
                            .map_err(|e| e.to_string())?;
                    tokio::spawn(conn);
                    let resp = sender
                        .send_request(common::review_request(&review))
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((resp.status().as_u16(), sender))
                };
                let result = tokio::time::timeout(Duration::from_secs(20), outcome).await;
                // Hold the connection until every client has tried, so they are all open at once.
                all_tried.wait().await;
                let result = result.expect("a connection hung instead of being served or refused");
                result.map(|(status, _sender)| status)
            }));
        }
        let (mut served_ok, mut refused) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(200) => served_ok += 1,
                Ok(other) => panic!("answered {other}"),
                Err(_) => refused += 1,
            }
        }
        assert_eq!(served_ok + refused, 2000);
        assert!(served_ok >= 400, "served {served_ok}");
        assert!(refused >= 1000, "refused {refused}: the limit did not hold");
        // The server is still there and serving.
        let mut client = Http1::connect(served.addr, &ca).await;
        assert_eq!(client.review(&review).await.0, 200);
        // The server says why: the port's limit, the oldest connections with no request (or
        // the new one, when all were busy) closed.
        let (_, metrics) = health_get(served.health, "/metrics").await;
        let shed: u64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with(
                    "outpost_webhook_connections_shed_total{port=\"admission\",reason=\"max_connections\"",
                )
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert!(shed >= 1000, "shed {shed}\n{metrics}");
        assert_no_panics(served.health, Some(&mut served.child)).await;
    });
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    served.child.kill().unwrap();
    let _ = served.child.wait();
}

/// Sends raw bytes as the body with the given Content-Length (or chunked when `None`), over a
/// fresh TLS connection; returns the status the server answered, if any.
async fn post_raw(
    addr: std::net::SocketAddr,
    ca: &str,
    body: Vec<u8>,
    declared: Option<usize>,
) -> (u16, Value) {
    post_raw_result(addr, ca, body, declared).await.unwrap()
}

/// Writes only the request head of a POST declaring `length` bytes, and returns what comes back.
async fn post_headers_only(addr: std::net::SocketAddr, ca: &str, length: usize) -> String {
    let config = common::client_config(ca, &[b"http/1.1"], None);
    let mut tls = common::tls_connect(addr, config).await.unwrap();
    let head = format!(
        "POST /mutate?timeout=10s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the JSON body has arrived (or the server closes), within 5 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !answer.ends_with(b"}") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

async fn post_raw_result(
    addr: std::net::SocketAddr,
    ca: &str,
    body: Vec<u8>,
    declared: Option<usize>,
) -> Result<(u16, Value), String> {
    let config = common::client_config(ca, &[b"http/1.1"], None);
    let tls = common::tls_connect(addr, config).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let mut req =
        hyper::Request::post("/mutate?timeout=10s").header("content-type", "application/json");
    if let Some(len) = declared {
        req = req.header("content-length", len);
    }
    let req = req.body(common::ChannelBody(rx)).unwrap();
    // Feed the body in 1 MiB pieces; stop when the server has answered.
    let feeder = tokio::spawn(async move {
        for chunk in body.chunks(1 << 20) {
            if tx.send(bytes::Bytes::copy_from_slice(chunk)).await.is_err() {
                return;
            }
        }
    });
    let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .map_err(|_| "no answer within 20 s".to_owned())?;
    feeder.abort();
    let resp = resp.map_err(|e| format!("{e:?}"))?;
    Ok(common::read_json(resp).await)
}

#[test]
fn bodies_of_every_size_and_shape_get_a_clear_answer_and_memory_stays_bounded() {
    let _serial = one_at_a_time();
    let dir = temp_dir("bodies");
    certs_into(&dir);
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
    let mut served = serve(&dir, &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (addr, health) = (served.addr, served.health);
        let review = common::golden_review("embedded-service-create");
        let bytes = serde_json::to_vec(&review).unwrap();
        let reason = |(status, body): (u16, Value)| (status, body["reason"].as_str().unwrap_or("").to_owned());

        assert_eq!(reason(post_raw(addr, &ca, vec![], Some(0)).await), (400, "not_json".into()));
        assert_eq!(reason(post_raw(addr, &ca, b"{".to_vec(), Some(1)).await), (400, "not_json".into()));
        let truncated = bytes[..bytes.len() / 2].to_vec();
        let n = truncated.len();
        assert_eq!(reason(post_raw(addr, &ca, truncated, Some(n)).await), (400, "not_json".into()));
        let mut invalid = bytes.clone();
        let at = invalid.iter().position(|b| *b == b'u').unwrap(); // inside "uid"
        invalid[at] = 0xff;
        let n = invalid.len();
        assert_eq!(reason(post_raw(addr, &ca, invalid, Some(n)).await), (400, "not_json".into()));
        // 10,000 levels of nesting: refused by the parser's depth limit, not by a stack overflow.
        let deep = format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","kind":{{"group":"","version":"v1","kind":"Service"}},"operation":"CREATE","object":{}{}}}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let n = deep.len();
        let (status, body) = post_raw(addr, &ca, deep.into_bytes(), Some(n)).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["message"].as_str().unwrap().contains("recursion limit"), "{body}");

        // 3 MiB (an UPDATE of two of the largest objects etcd stores): accepted and patched.
        let mut big = review.clone();
        big["request"]["object"]["metadata"]["annotations"] = json!({"example.com/big": "x".repeat(3 << 20)});
        let big_bytes = serde_json::to_vec(&big).unwrap();
        assert!(big_bytes.len() > 3 << 20);
        let n = big_bytes.len();
        let (status, answer) = post_raw(addr, &ca, big_bytes, Some(n)).await;
        assert_eq!(status, 200);
        apply_answer(&big, &answer);

        // 64 MiB declared: answered 413 from the headers alone; not a byte of body is sent.
        let head = tokio::time::timeout(Duration::from_secs(5), post_headers_only(addr, &ca, 64 << 20))
            .await
            .expect("a declared 64 MiB body is answered from the headers");
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
        assert!(head.contains("body_too_large"), "{head}");
        // 64 MiB chunked, no length declared: refused once the limit is passed. The server
        // closes the connection while the client is still writing, so the client sees either the
        // 413 or a reset; the server's own count says it answered 413.
        match post_raw_result(addr, &ca, vec![b' '; 64 << 20], None).await {
            Ok(answer) => assert_eq!(reason(answer), (413, "body_too_large".into())),
            Err(e) => assert!(e.contains("Broken pipe") || e.contains("reset") || e.contains("closed"), "{e}"),
        }
        let (_, metrics) = health_get(health, "/metrics").await;
        assert!(metrics.contains("outpost_webhook_bad_requests_total{reason=\"body_too_large\"} 2"), "{metrics}");

        let mut client = Http1::connect(addr, &ca).await;
        assert_eq!(client.review(&review).await.0, 200);
        assert_no_panics(health, Some(&mut served.child)).await;
    });
    // Nothing near 64 MiB was held: the 3 MiB body and its parse are the peak.
    let status = std::fs::read_to_string(format!("/proc/{}/status", served.child.id())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    assert!(hwm_kib < 48 * 1024, "peak RSS {hwm_kib} KiB");
    served.child.kill().unwrap();
    let _ = served.child.wait();
}

/// A minimal `ClientHello` offering only `version` (no `supported_versions` extension), as a
/// TLS 1.0 or 1.1 client sends.
fn old_client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut body = version.to_vec();
    body.extend([7u8; 32]); // random
    body.push(0); // session id
    body.extend([0, 4, 0x00, 0x2f, 0x00, 0x35]); // TLS_RSA_WITH_AES_{128,256}_CBC_SHA
    body.extend([1, 0]); // no compression
    let mut hs = vec![1, 0, 0, u8::try_from(body.len()).unwrap()];
    hs.extend(body);
    let mut record = vec![0x16, 3, 1, 0, u8::try_from(hs.len()).unwrap()];
    record.extend(hs);
    record
}

#[tokio::test]
async fn garbage_and_old_tls_versions_are_refused_and_the_server_keeps_serving() {
    let _serial = one_at_a_time();
    let server = TestServer::start().await;
    for (what, bytes) in [
        (
            "plain HTTP",
            b"POST /mutate HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("TLS 1.0", old_client_hello([3, 1])),
        ("TLS 1.1", old_client_hello([3, 2])),
        ("random bytes", (0u8..=255).cycle().take(1024).collect()),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        tcp.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "{what}: the connection was not closed");
        // Nothing but, at most, a TLS alert record comes back.
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "{what}: answered {answer:?}"
        );
        if what.starts_with("TLS 1.") {
            assert_eq!(
                answer.first(),
                Some(&0x15),
                "{what}: expected a protocol_version alert"
            );
        }
    }
    let mut client = Http1::connect(server.addr(), &server.ca_pem).await;
    assert_eq!(client.review(&golden_reviews().remove(0).1).await.0, 200);
    let (_, metrics) = health_get(server.running.health_addr, "/metrics").await;
    assert!(
        metrics.contains("outpost_webhook_tls_handshake_failures_total 4"),
        "{metrics}"
    );
}

#[test]
fn runs_on_a_read_only_filesystem_with_no_writable_home() {
    let _serial = one_at_a_time();
    let dir = temp_dir("readonly");
    certs_into(&dir);
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    // A private mount namespace in which `/` (and so the certificate files) and the process's
    // only temporary directory and home are read-only.
    let script = format!(
        "set -e; mount -t tmpfs -o ro tmpfs '{ro}'; mount --make-rprivate /; \
         mount -o remount,bind,ro /; for m in /tmp /var/tmp /root; do mountpoint -q $m && mount -o remount,bind,ro $m || true; done; \
         touch '{ro}/probe' 2>/dev/null && exit 90; touch /probe 2>/dev/null && exit 91; \
         exec env -i HOME='{ro}' TMPDIR='{ro}' \"$0\" \"$@\"",
        ro = ro.display()
    );
    let mut command = Command::new("unshare");
    command.args(["-m", "sh", "-c", &script, BIN]);
    let mut served = serve_with(command, &dir, &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(served.assert_serves(&ca));
    served.sigterm();
    let status = served.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}\n{}", served.log.join("\n"));
}

/// An HTTP/2 connection over TLS (ALPN `h2`), as the apiserver's client opens one; the task
/// drives it and ends when the server closes it.
async fn h2_connect(
    addr: std::net::SocketAddr,
    ca: &str,
) -> (
    hyper::client::conn::http2::SendRequest<common::ChannelBody>,
    tokio::task::JoinHandle<()>,
) {
    let config = common::client_config(ca, &[b"h2"], None);
    let tls = common::tls_connect(addr, config).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

/// A body of `bytes`, sent whole.
fn whole(bytes: bytes::Bytes) -> common::ChannelBody {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.try_send(bytes).unwrap();
    common::ChannelBody(rx)
}

/// A metric of one series (`outpost_webhook_connections_open`), read from `/metrics`.
async fn metric(health: std::net::SocketAddr, name: &str) -> i64 {
    let (_, metrics) = health_get(health, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
        .parse()
        .unwrap()
}

async fn connections_open(health: std::net::SocketAddr) -> i64 {
    metric(health, "outpost_webhook_connections_open").await
}

/// Waits, for at most 10 s, until `connections_open` is `open`: the connections closed on the
/// client's side are no longer counted.
async fn connections_open_comes_to(health: std::net::SocketAddr, open: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = connections_open(health).await;
        if now == open {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "connections_open is {now} with {open} connections open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After hostile input: nothing panicked, and the server process (when it is one) still runs.
async fn assert_no_panics(health: std::net::SocketAddr, child: Option<&mut std::process::Child>) {
    assert_eq!(metric(health, "outpost_webhook_panics_total").await, 0);
    if let Some(child) = child {
        assert!(child.try_wait().unwrap().is_none(), "the server died");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_a_413_or_415_arrives_whole_while_the_client_is_still_sending() {
    let _serial = one_at_a_time();
    let server = TestServer::start().await;
    let (mut sender, _conn) = h2_connect(server.addr(), &server.ca_pem).await;
    for round in 0..10 {
        for (content_type, length, code, reason) in [
            ("application/yaml", 100_000, 415, "unsupported_media_type"),
            ("application/json", 64 << 20, 413, "body_too_large"),
        ] {
            // The client has sent part of its body and is still sending when it is answered.
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(bytes::Bytes::from(vec![b' '; 16 * 1024]))
                .await
                .unwrap();
            let req = hyper::Request::post("/mutate?timeout=10s")
                .header("content-type", content_type)
                .header("content-length", length)
                .body(common::ChannelBody(rx))
                .unwrap();
            sender.ready().await.unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}, {code}: {e:?}"));
            assert_eq!(resp.status().as_u16(), code);
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap_or_else(|e| panic!("round {round}, {code}: the body broke: {e:?}"))
                .to_bytes();
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["reason"], reason, "{body}");
            drop(tx);
        }
    }
    // The connection still serves a review.
    let review = serde_json::to_vec(&common::golden_review("embedded-service-create")).unwrap();
    let req = hyper::Request::post("/mutate?timeout=10s")
        .header("content-type", "application/json")
        .header("content-length", review.len())
        .body(whole(review.into()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_timeouts_are_answered_and_connections_open_does_not_drift() {
    let _serial = one_at_a_time();
    let server = TestServer::start().await;
    let (addr, health) = (server.addr(), server.running.health_addr);
    let review = common::golden_review("embedded-service-create");
    let body = bytes::Bytes::from(serde_json::to_vec(&review).unwrap());
    // Each once panicked the parser, asked for an unbounded wait, or is not a duration at all.
    let queries = [
        "timeout=18000000000000000000s18000000000000000000s",
        "timeout=1e400s",
        "timeout=99999999999999999999h",
        "timeout=1000h",
        "timeout=-1s",
        "timeout=%00%0a",
        "timeout=",
        "timeout=0.000000000001ns",
        "timeout=1s&timeout=1000h",
        "timeout=9.9.9s",
    ];
    for query in queries {
        let mut client = Http1::connect(addr, &server.ca_pem).await;
        let req = hyper::Request::post(format!("/mutate?{query}"))
            .header("host", common::SERVER_NAME)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(body.clone()))
            .unwrap();
        let resp = client
            .send(req)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        let (status, answer) = common::read_json(resp).await;
        assert_eq!(status, 200, "{query}: {answer}");
        apply_answer(&review, &answer);
        client.task.abort();
    }
    assert_no_panics(health, None).await;
    // With three connections held open, the gauge comes back to three: none of the closed ones
    // is still counted.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut client = Http1::connect(addr, &server.ca_pem).await;
        assert_eq!(client.review(&review).await.0, 200);
        held.push(client);
    }
    connections_open_comes_to(health, 3).await;
}

async fn a_buggy_handler() -> &'static str {
    panic!("a bug in a handler")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_is_answered_500_and_counted_and_its_connection_serves_on() {
    let _serial = one_at_a_time();
    let dir = temp_dir("panic");
    let g = common::certs();
    common::write_secret_volume(dir.path(), 1, &g.cert_pem, &g.key_pem);
    let config = outpost_webhook::serve::Config {
        settings: common::settings(),
        certs: outpost_webhook::serve::CertSource::Files {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        },
        client_ca: None,
        policy: None,
        limits: common::limits(),
        cluster: outpost_webhook::cluster::Settings::off(),
    };
    let (app, tls) = outpost_webhook::serve::prepare(&config).unwrap();
    // The real stack (TLS, HTTP/1 and HTTP/2, the connection limits) around a handler with a bug.
    let router = axum::Router::new()
        .route("/mutate", axum::routing::post(a_buggy_handler))
        .route("/ok", axum::routing::get(|| async { "ok" }));
    let running = outpost_webhook::serve::start_with(config.settings, app, tls, router)
        .await
        .unwrap();
    let (addr, health) = (running.addr, running.health_addr);
    let post = || {
        hyper::Request::post("/mutate?timeout=10s")
            .header("host", common::SERVER_NAME)
            .header("content-type", "application/json")
    };
    let get_ok = || hyper::Request::get("/ok").header("host", common::SERVER_NAME);

    // Each response is read whole (or dropped) at once: an unread HTTP/2 response keeps its
    // connection open.
    let mut h1 = Http1::connect(addr, &g.ca_pem).await;
    let empty = || http_body_util::Full::default();
    let resp = h1.send(post().body(empty()).unwrap()).await.unwrap();
    let (status, body) = common::read_json(resp).await;
    assert_eq!((status, body["code"].as_u64()), (500, Some(500)), "{body}");
    let status = h1
        .send(get_ok().body(empty()).unwrap())
        .await
        .unwrap()
        .status();
    assert_eq!(
        status, 200,
        "the HTTP/1 connection did not survive the panic"
    );

    let (mut h2, h2_task) = h2_connect(addr, &g.ca_pem).await;
    let resp = h2.send_request(post().body(whole("{}".into())).unwrap());
    let (status, body) = common::read_json(resp.await.unwrap()).await;
    assert_eq!((status, body["code"].as_u64()), (500, Some(500)), "{body}");
    let resp = h2.send_request(get_ok().body(whole("".into())).unwrap());
    let status = resp.await.unwrap().status();
    assert_eq!(
        status, 200,
        "the HTTP/2 connection did not survive the panic"
    );

    assert_eq!(metric(health, "outpost_webhook_panics_total").await, 2);
    assert_eq!(connections_open(health).await, 2);
    // The clients hang up; the count comes back to 0.
    h1.task.abort();
    drop(h2);
    h2_task.abort();
    connections_open_comes_to(health, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_only_the_http2_preface_or_sit_idle_are_closed() {
    let _serial = one_at_a_time();
    let server = TestServer::start_with(|c| {
        c.settings.header_timeout = Duration::from_secs(1);
        c.settings.idle_timeout = Duration::from_secs(1);
    })
    .await;
    // The HTTP/2 preface and an empty SETTINGS frame, then nothing.
    let config = common::client_config(&server.ca_pem, &[b"h2"], None);
    let mut tls = common::tls_connect(server.addr(), config).await.unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut answer)).await;
    assert!(
        closed.is_ok(),
        "a connection that sent only the preface was left open"
    );
    // An HTTP/2 connection idle after a request, and an HTTP/1 keep-alive one.
    let review = serde_json::to_vec(&common::golden_review("embedded-service-create")).unwrap();
    let (mut sender, h2_task) = h2_connect(server.addr(), &server.ca_pem).await;
    let req = hyper::Request::post("/mutate?timeout=10s")
        .header("content-type", "application/json")
        .header("content-length", review.len())
        .body(whole(review.into()))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let mut h1 = Http1::connect(server.addr(), &server.ca_pem).await;
    assert_eq!(
        h1.review(&common::golden_review("embedded-service-create"))
            .await
            .0,
        200
    );
    tokio::time::timeout(Duration::from_secs(15), h2_task)
        .await
        .expect("an idle HTTP/2 connection was left open")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(15), &mut h1.task)
        .await
        .expect("an idle HTTP/1 connection was left open")
        .unwrap();
    assert_eq!(connections_open(server.running.health_addr).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_is_closed_gracefully_at_its_maximum_age() {
    let _serial = one_at_a_time();
    let server = TestServer::start_with(|c| {
        c.settings.max_connection_age = Duration::from_secs(1);
    })
    .await;
    let review = bytes::Bytes::from(
        serde_json::to_vec(&common::golden_review("embedded-service-create")).unwrap(),
    );
    let (mut sender, task) = h2_connect(server.addr(), &server.ca_pem).await;
    let mut answered = 0;
    // At most 200 requests, 50 ms apart: the connection is closed long before.
    for _ in 0..200 {
        if sender.ready().await.is_err() {
            break;
        }
        let req = hyper::Request::post("/mutate?timeout=10s")
            .header("content-type", "application/json")
            .header("content-length", review.len())
            .body(whole(review.clone()))
            .unwrap();
        match sender.send_request(req).await {
            Ok(resp) => {
                assert_eq!(resp.status(), 200);
                answered += 1;
            }
            // Sent as the GOAWAY arrived: refused before the server read it, so safe to retry.
            Err(e) => {
                assert!(sender.is_closed() || e.is_canceled(), "{e:?}");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answered >= 1);
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the connection outlived --max-connection-age")
        .unwrap();
}

#[test]
fn many_http2_streams_of_large_bodies_stay_within_the_documented_memory_bound() {
    use outpost_webhook::serve::budget;
    let _serial = one_at_a_time();
    let dir = temp_dir("h2-memory");
    certs_into(&dir);
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
    let mut served = serve(&dir, &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (ok, overloaded) = runtime.block_on(async {
        // Just under the body limit, the bulk in a label value: a field the rules keep.
        let mut review = common::golden_review("embedded-service-create");
        review["request"]["object"]["metadata"]["labels"]["example.com/big"] =
            json!("x".repeat(budget::DEFAULT_MAX_BODY_BYTES - (16 << 10)));
        let body = bytes::Bytes::from(serde_json::to_vec(&review).unwrap());
        assert!(body.len() <= budget::DEFAULT_MAX_BODY_BYTES);
        let mut streams = Vec::new();
        // 24 streams, each connection at the server's stream limit (more are refused with
        // REFUSED_STREAM before the client has read the server's SETTINGS).
        for _ in 0..3 {
            let (sender, _task) = h2_connect(served.addr, &ca).await;
            for _ in 0..outpost_webhook::serve::listen::H2_MAX_STREAMS {
                let mut sender = sender.clone();
                let body = body.clone();
                streams.push(tokio::spawn(async move {
                    let req = hyper::Request::post("/mutate?timeout=30s")
                        .header("content-type", "application/json")
                        .header("content-length", body.len())
                        .body(whole(body))
                        .unwrap();
                    sender.ready().await.unwrap();
                    let resp =
                        tokio::time::timeout(Duration::from_secs(60), sender.send_request(req))
                            .await
                            .expect("a stream hung")
                            .unwrap();
                    resp.status().as_u16()
                }));
            }
        }
        let (mut ok, mut overloaded) = (0, 0);
        for s in streams {
            match s.await.unwrap() {
                // The label value is not a valid one, so the webhook skips or fixes it: 200.
                200 => ok += 1,
                503 => overloaded += 1,
                other => panic!("answered {other}"),
            }
        }
        assert_no_panics(served.health, Some(&mut served.child)).await;
        (ok, overloaded)
    });
    assert!(ok >= 4, "{ok} answered, {overloaded} overloaded");
    let status = std::fs::read_to_string(format!("/proc/{}/status", served.child.id())).unwrap();
    let hwm_kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    let bound = budget::worst_case_rss(
        budget::DEFAULT_MAX_INFLIGHT_BYTES,
        outpost_webhook::serve::DEFAULT_MAX_CONNECTIONS,
        outpost_webhook::serve::DEFAULT_HEALTH_MAX_CONNECTIONS,
    );
    assert!(
        hwm_kib * 1024 < bound,
        "peak RSS {hwm_kib} KiB over the bound of {} KiB",
        bound / 1024
    );
    served.child.kill().unwrap();
    let _ = served.child.wait();
}

#[test]
fn the_development_ca_is_never_written_through_a_symlink() {
    let _serial = one_at_a_time();
    let dir = temp_dir("dev-ca");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let target = dir.path().join("ca.crt");
    std::os::unix::fs::symlink(&victim, &target).unwrap();
    let mut child = Command::new(BIN)
        .args(common::SERVE_ON_LOOPBACK)
        .arg("--dev-ca-out")
        .arg(&target)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("serve started with a symlink at --dev-ca-out");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("cannot write the development CA bundle"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert!(
        std::fs::symlink_metadata(&target)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}
