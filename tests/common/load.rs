//! Load: clients that behave as the apiserver, retrying nothing and counting every failure.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;

use super::{
    client::{client_config, read_json, review_request, tls_connect},
    fixtures::golden_review,
};

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
    /// Requests answered so far, good or bad.
    count: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sent>>>,
}

impl Load {
    pub fn start(addr: SocketAddr, ca_pem: &str, clients: usize, reconnect_every: usize) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let review = golden_review("embedded-deployment-create");
        let tasks = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let count = Arc::clone(&count);
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
                            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if broken {
                                continue 'connections;
                            }
                        }
                    }
                    sent
                })
            })
            .collect();
        Self { stop, count, tasks }
    }

    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` requests have been answered, at most `limit`: load is measured in
    /// requests, never in time, so a slow machine only makes the test slower.
    pub async fn wait_for(&self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.count.load(std::sync::atomic::Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} requests in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
