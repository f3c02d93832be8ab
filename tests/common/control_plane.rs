//! A real control plane for the tests, as envtest runs one: etcd and kube-apiserver on loopback
//! ports, a throwaway PKI made here (the apiserver's serving certificate, an admin client
//! certificate in `system:masters`, the `ServiceAccount` signing key), `--authorization-mode=Node,RBAC`.
//! No kubelet, no kube-controller-manager, no kube-proxy: tests write the Pods, `EndpointSlices` and
//! Roles those would.
//!
//! The binaries come from `scripts/ensure-kube-apiserver.sh`, found by envtest's conventions:
//! `TEST_ASSET_KUBE_APISERVER` and `TEST_ASSET_ETCD` name single binaries, else
//! `KUBEBUILDER_ASSETS` the directory holding both, else the directory the script builds into.
//! Missing binaries fail the test with the command that builds them; nothing is skipped.
//!
//! Every process is started by one keeper thread that lives as long as the test binary, under
//! `setpriv --pdeathsig KILL`: when the test binary exits, however it exits, the kernel kills
//! them. (A `static` is never dropped, so [`shared`] could not kill its processes on drop.)

use std::{
    io::{Read as _, Seek as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

/// The release `scripts/ensure-kube-apiserver.sh` builds, as it pins it.
pub fn kubernetes_version() -> String {
    super::tools::pinned("ensure-kube-apiserver.sh", "version")
}
const INSTALL: &str = "scripts/ensure-kube-apiserver.sh";
/// A cold apiserver is ready in about 3 s here; a machine busy compiling takes longer.
const READY_WITHIN: Duration = Duration::from_secs(90);

/// The apiserver and etcd of one test binary, started on first use.
pub fn shared() -> &'static ControlPlane {
    static SHARED: OnceLock<ControlPlane> = OnceLock::new();
    SHARED.get_or_init(ControlPlane::start)
}

/// kube-apiserver and etcd, with what a test needs to reach them.
pub struct ControlPlane {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    pub port: u16,
    /// The CA that signed the apiserver's serving certificate and the admin's client certificate.
    pub ca_pem: String,
    /// A kubeconfig for the admin (`system:masters`), for `kubectl` and kube clients.
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    etcd_url: String,
    processes: Mutex<Processes>,
}

struct Processes {
    etcd: Option<Child>,
    apiserver: Option<Child>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let mut p = self
            .processes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for child in [p.apiserver.take(), p.etcd.take()].into_iter().flatten() {
            stop(child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Where a binary is, by envtest's conventions, or a panic saying how to build it.
fn asset(name: &str, single: &str) -> PathBuf {
    let path = if let Some(p) = std::env::var_os(single) {
        PathBuf::from(p)
    } else if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS") {
        PathBuf::from(dir).join(name)
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/tools")
            .join(format!("k8s-{}", kubernetes_version()))
            .join(name)
    };
    assert!(
        path.is_file(),
        "{name} not found at {}: run `{INSTALL}` (it builds kube-apiserver {} and etcd once; \
         README's test command runs it), or set KUBEBUILDER_ASSETS to a directory holding both, \
         or {single} to a binary",
        path.display(),
        kubernetes_version()
    );
    path
}

/// A port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Starts `command` from the keeper thread, under `setpriv --pdeathsig KILL`, with only the
/// environment the caller set on it (and `PATH`), its output appended to `log` when given.
pub fn spawn_kept(command: &Command, log: Option<&Path>) -> Child {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("process-keeper".into())
            .spawn(move || {
                // The children's parent-death signal is tied to this thread, which lives until
                // the test binary exits.
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                loop {
                    std::thread::park();
                }
            })
            .unwrap();
        Mutex::new(tx)
    });
    let program = command.get_program().to_owned();
    let mut kept = Command::new("setpriv");
    kept.args(["--pdeathsig", "KILL", "--"])
        .arg(&program)
        .args(command.get_args())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    if let Some(dir) = command.get_current_dir() {
        kept.current_dir(dir);
    }
    for (k, v) in command.get_envs() {
        if let Some(v) = v {
            kept.env(k, v);
        }
    }
    if let Some(log) = log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        kept.stdout(file.try_clone().unwrap()).stderr(file);
    } else {
        kept.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let (reply, answer) = mpsc::channel();
    keeper.lock().unwrap().send((kept, reply)).unwrap();
    answer
        .recv()
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.to_string_lossy()))
}

/// The last `n` bytes of a log file, for a failure message.
pub fn tail(path: &Path, n: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("({} missing)", path.display());
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(n)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

/// The throwaway PKI, PEM.
struct Pki {
    ca: String,
    serving_cert: String,
    serving_key: String,
    admin_cert: String,
    admin_key: String,
    service_account_key: String,
    service_account_public: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "outpost-webhook test control plane");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut serving = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ])
    .unwrap();
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate().unwrap();
    let serving_cert = serving.signed_by(&serving_key, &issuer).unwrap();

    // The apiserver maps a client certificate's CN to the user and each O to a group.
    let mut admin = CertificateParams::new(Vec::<String>::new()).unwrap();
    admin.distinguished_name.push(DnType::CommonName, "admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_key = KeyPair::generate().unwrap();
    let admin_cert = admin.signed_by(&admin_key, &issuer).unwrap();

    let service_account = KeyPair::generate().unwrap();
    Pki {
        ca: ca_cert.pem(),
        serving_cert: serving_cert.pem(),
        serving_key: serving_key.serialize_pem(),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
        service_account_key: service_account.serialize_pem(),
        service_account_public: service_account.public_key_pem(),
    }
}

/// A directory for one control plane's files under the target's temporary directory; those of
/// earlier test runs whose process is gone are removed first.
fn instance_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("control-plane");
    std::fs::create_dir_all(&base).unwrap();
    for entry in std::fs::read_dir(&base).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().unwrap_or_default();
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = base.join(format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl ControlPlane {
    /// A control plane of its own, stopped on drop: for tests that stop or restart the
    /// apiserver, which would break every other test on the shared one.
    pub fn start() -> Self {
        let apiserver = asset("kube-apiserver", "TEST_ASSET_KUBE_APISERVER");
        let etcd = asset("etcd", "TEST_ASSET_ETCD");
        let dir = instance_dir();
        let pki = pki();
        for (name, pem) in [
            ("ca.crt", &pki.ca),
            ("apiserver.crt", &pki.serving_cert),
            ("apiserver.key", &pki.serving_key),
            ("admin.crt", &pki.admin_cert),
            ("admin.key", &pki.admin_key),
            ("service-account.key", &pki.service_account_key),
            ("service-account.pub", &pki.service_account_public),
        ] {
            std::fs::write(dir.join(name), pem).unwrap();
        }
        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
                 clusters: [{{name: test, cluster: {{server: '{url}', certificate-authority: '{d}/ca.crt'}}}}]\n\
                 users: [{{name: admin, user: {{client-certificate: '{d}/admin.crt', client-key: '{d}/admin.key'}}}}]\n\
                 contexts: [{{name: test, context: {{cluster: test, user: admin}}}}]\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let etcd_url = format!("http://127.0.0.1:{}", free_port());
        let plane = Self {
            url,
            port,
            ca_pem: pki.ca,
            kubeconfig,
            dir,
            etcd_url,
            processes: Mutex::new(Processes {
                etcd: None,
                apiserver: None,
            }),
        };
        plane.start_etcd(&etcd);
        plane.start_apiserver_with(&apiserver, &[]);
        plane
    }

    fn start_etcd(&self, etcd: &Path) {
        let peer = format!("http://127.0.0.1:{}", free_port());
        let mut command = Command::new(etcd);
        // etcd reads every ETCD_* variable as a flag: the child gets none (spawn_kept clears
        // the environment).
        command
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={}", self.etcd_url))
            .arg(format!("--advertise-client-urls={}", self.etcd_url))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .args(["--unsafe-no-fsync", "--log-level=warn"]);
        let child = spawn_kept(&command, Some(&self.dir.join("etcd.log")));
        self.lock().etcd = Some(child);
    }

    /// The apiserver's flags, plus `extra`.
    fn apiserver_command(&self, binary: &Path, port: u16, extra: &[String]) -> Command {
        let d = &self.dir;
        let mut command = Command::new(binary);
        command
            .arg(format!("--etcd-servers={}", self.etcd_url))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={port}"))
            // Endpoints refuse loopback addresses: nothing reconciles the `kubernetes` Service.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!(
                "--tls-cert-file={}",
                d.join("apiserver.crt").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                d.join("apiserver.key").display()
            ))
            .arg(format!("--client-ca-file={}", d.join("ca.crt").display()))
            .arg("--service-cluster-ip-range=10.0.0.0/16")
            // The TokenRequest API: a test hands a replica its ServiceAccount's real token.
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("service-account.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("service-account.key").display()
            ))
            .arg("--authorization-mode=Node,RBAC")
            // No controller creates the `default` ServiceAccount that this plugin requires of
            // every Pod the tests write.
            .arg("--disable-admission-plugins=ServiceAccount")
            .args(extra);
        command
    }

    /// Starts kube-apiserver (again, after [`ControlPlane::stop_apiserver`]) with `extra` flags,
    /// and waits until it is ready.
    pub fn start_apiserver_with(&self, binary: &Path, extra: &[String]) {
        let log = self.dir.join("kube-apiserver.log");
        let command = self.apiserver_command(binary, self.port, extra);
        let child = self.ready(spawn_kept(&command, Some(&log)), &self.url, &log);
        self.lock().apiserver = Some(child);
    }

    /// Restarts the apiserver on the same port, with the same etcd.
    pub fn restart_apiserver(&self) {
        self.stop_apiserver();
        self.start_apiserver();
    }

    /// Starts the apiserver (again) with the usual flags.
    pub fn start_apiserver(&self) {
        let binary = asset("kube-apiserver", "TEST_ASSET_KUBE_APISERVER");
        self.start_apiserver_with(&binary, &[]);
    }

    /// Stops the apiserver; etcd keeps the state.
    pub fn stop_apiserver(&self) {
        let child = self.lock().apiserver.take();
        if let Some(child) = child {
            stop(child);
        }
    }

    /// A second kube-apiserver on the same etcd, as an HA control plane has, with `extra`
    /// flags: its URL and process (the caller stops it).
    pub fn second_apiserver(&self, extra: &[String]) -> (String, Child) {
        let binary = asset("kube-apiserver", "TEST_ASSET_KUBE_APISERVER");
        let port = free_port();
        let log = self.dir.join(format!("kube-apiserver-{port}.log"));
        let url = format!("https://127.0.0.1:{port}");
        let command = self.apiserver_command(&binary, port, extra);
        let child = self.ready(spawn_kept(&command, Some(&log)), &url, &log);
        (url, child)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Processes> {
        self.processes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Polls `url/readyz` (with `curl`: a blocking check needs no async runtime) until it
    /// answers `ok`; panics with the log's tail if `child` exits first or time runs out.
    fn ready(&self, mut child: Child, url: &str, log: &Path) -> Child {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "kube-apiserver exited ({status}) before it was ready:\n{}",
                    tail(log, 4000)
                );
            }
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "2", "--cacert"])
                .arg(self.dir.join("ca.crt"))
                .arg("--cert")
                .arg(self.dir.join("admin.crt"))
                .arg("--key")
                .arg(self.dir.join("admin.key"))
                .arg(format!("{url}/readyz"))
                .output()
                .unwrap();
            if out.stdout == b"ok" {
                return child;
            }
            if Instant::now() >= deadline {
                stop(child);
                panic!(
                    "kube-apiserver at {url} not ready within {READY_WITHIN:?}:\n{}\netcd:\n{}",
                    tail(log, 4000),
                    tail(&self.dir.join("etcd.log"), 2000)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A kube client as the admin, for the runtime of the calling test.
    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    }

    /// `kubectl` with the admin's kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new("kubectl");
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// `kubectl args...` as the admin with `input` on its stdin; its output, whatever its status.
    pub fn kubectl_with(&self, args: &[&str], input: &str) -> std::process::Output {
        use std::io::Write as _;
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// A new namespace named `<prefix>-<n>`, unique in this test binary.
    pub async fn namespace(&self, prefix: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed));
        self.create_namespace(&name).await;
        name
    }

    /// Creates namespace `name`.
    pub async fn create_namespace(&self, name: &str) {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(self.client().await)
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
    }

    /// A token for `ServiceAccount` `namespace/name`, from the `TokenRequest` API, as the kubelet
    /// asks for the projected token it mounts in a pod.
    pub async fn token(&self, namespace: &str, name: &str) -> String {
        let request = serde_json::from_value(json!({
            "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600}
        }))
        .unwrap();
        let answer = Api::<ServiceAccount>::namespaced(self.client().await, namespace)
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap();
        answer.status.unwrap().token.unwrap()
    }

    /// The etcd server's client URL.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }
}
