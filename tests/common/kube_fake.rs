//! A kube-apiserver in the test process, on loopback and plain HTTP, that holds state: Services,
//! Deployments, Secrets and a Lease, each with a `resourceVersion` (and a Deployment's
//! `metadata.generation`, which moves when its spec does). Lists are paged; watches replay what
//! changed since the resourceVersion they name, then stream ADDED/MODIFIED/DELETED events. A
//! PATCH of a Service or Deployment runs mutating admission as the apiserver does: an
//! AdmissionReview (UPDATE) to the webhook's real `/mutate` over TLS, whose patch is applied
//! before the object is stored. Every such PATCH is recorded, with the token that sent it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{Method, StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use outpost_webhook::core::laws;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    client::{client_config, review_request, tls_connect},
    fixtures::review_for,
};

/// Which object: (resource, namespace, name), the resource plural as in the URL.
pub type Key = (String, String, String);

/// A Service or Deployment PATCH as it arrived.
#[derive(Debug, Clone)]
pub struct Patched {
    pub resource: String,
    pub name: String,
    pub content_type: String,
    /// The query string (`fieldManager=...`).
    pub query: String,
    /// The bearer token: which replica sent it (each has its own kubeconfig).
    pub token: String,
    pub body: Value,
}

struct Watch {
    resource: String,
    namespace: String,
    labels: Option<String>,
    fields: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

struct Event {
    rv: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    events: Vec<Event>,
    watches: Vec<Watch>,
    patches: Vec<Patched>,
    /// Where the webhook listens (the endpoints of its Service), and the CA that signed it.
    webhooks: Vec<SocketAddr>,
    ca: String,
    /// Lists answered 503, as an apiserver that is starting up answers them.
    refuse_lists: bool,
    /// Each admission review sent: operation, kind, name, and the warnings answered.
    reviews: Vec<Reviewed>,
}

/// One admission review the fake sent, and the warnings the webhook answered.
#[derive(Debug, Clone)]
pub struct Reviewed {
    pub operation: String,
    pub kind: String,
    pub name: String,
    pub warnings: Value,
}

/// The fake apiserver's state, shared by its handlers and the test.
#[derive(Clone, Default)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    /// Writes that run admission are serialized, as etcd's compare-and-swap would order them.
    writing: Arc<tokio::sync::Mutex<()>>,
}

/// The resource plural of a `kind`.
fn resource_of(kind: &str) -> &'static str {
    match kind {
        "Service" => "services",
        "Deployment" => "deployments",
        "Secret" => "secrets",
        "Lease" => "leases",
        other => panic!("the fake serves no {other}"),
    }
}

fn key_of(object: &Value) -> Key {
    (
        resource_of(object["kind"].as_str().unwrap()).to_owned(),
        object["metadata"]["namespace"].as_str().unwrap().to_owned(),
        object["metadata"]["name"].as_str().unwrap().to_owned(),
    )
}

impl Inner {
    /// Stores `object` (a new version), bumping resourceVersion and, for a Deployment whose spec
    /// changed, the generation; sends the event to each matching watch.
    fn store(&mut self, mut object: Value) -> Value {
        let key = key_of(&object);
        let old = self.objects.get(&key).cloned();
        self.rv += 1;
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(self.rv.to_string());
        let generation = match &old {
            None => 1,
            Some(old) => {
                let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                if key.0 == "deployments" && old["spec"] != object["spec"] {
                    g + 1
                } else {
                    g
                }
            }
        };
        object["metadata"]["generation"] = json!(generation);
        self.objects.insert(key.clone(), object.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.emit(&key, kind, object.clone());
        object
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.emit(key, "DELETED", object.clone());
        Some(object)
    }

    fn emit(&mut self, key: &Key, kind: &'static str, object: Value) {
        let line = event_line(kind, &object);
        self.watches.retain(|w| {
            if w.resource != key.0 || w.namespace != key.1 || !selects(w, &object) {
                return !w.tx.is_closed();
            }
            w.tx.send(line.clone()).is_ok()
        });
        self.events.push(Event {
            rv: self.rv,
            resource: key.0.clone(),
            namespace: key.1.clone(),
            kind,
            object,
        });
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

/// Whether `object` passes an equality label selector and a `metadata.name` field selector.
fn matches(labels: Option<&str>, fields: Option<&str>, object: &Value) -> bool {
    let labels_ok = labels.is_none_or(|s| {
        s.split(',').filter(|t| !t.is_empty()).all(|term| {
            let (k, v) = term.split_once('=').unwrap();
            object["metadata"]["labels"][k] == v
        })
    });
    let fields_ok = fields.is_none_or(|s| {
        s.split(',').filter(|t| !t.is_empty()).all(|term| {
            let (k, v) = term.split_once('=').unwrap();
            assert_eq!(k, "metadata.name", "the fake reads only metadata.name");
            object["metadata"]["name"] == v
        })
    });
    labels_ok && fields_ok
}

fn selects(w: &Watch, object: &Value) -> bool {
    matches(w.labels.as_deref(), w.fields.as_deref(), object)
}

/// `%XX` and `+` decoded, as a query string carries a selector.
pub fn decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    let mut pieces = spaced.split('%');
    let mut out = pieces.next().unwrap_or_default().as_bytes().to_vec();
    for piece in pieces {
        let (hex, rest) = piece.split_at(2);
        out.push(u8::from_str_radix(hex, 16).unwrap());
        out.extend_from_slice(rest.as_bytes());
    }
    String::from_utf8(out).unwrap()
}

impl FakeApi {
    /// Serves on an ephemeral loopback port until the runtime ends.
    pub async fn start() -> (Self, SocketAddr) {
        let fake = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(handle).with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (fake, addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where admission goes: the webhook replicas, tried in order, and the CA they present.
    pub fn set_webhooks(&self, addrs: Vec<SocketAddr>, ca: &str) {
        let mut inner = self.lock();
        inner.webhooks = addrs;
        ca.clone_into(&mut inner.ca);
    }

    /// While true, every list is answered 503 Service Unavailable: no watch cache can sync.
    pub fn refuse_lists(&self, refuse: bool) {
        self.lock().refuse_lists = refuse;
    }

    /// Creates or replaces an object as given (no admission), as the test's own write.
    pub fn put(&self, object: Value) -> Value {
        self.lock().store(object)
    }

    /// Writes an object through admission, as the controller's write would be: a CREATE review
    /// when it is new, else an UPDATE with the stored object as `oldObject`.
    pub async fn write_admitted(&self, object: Value) -> Value {
        let _writing = self.writing.lock().await;
        let (old, addrs, ca) = {
            let inner = self.lock();
            let old = inner.objects.get(&key_of(&object)).cloned();
            (old, inner.webhooks.clone(), inner.ca.clone())
        };
        let operation = if old.is_some() { "UPDATE" } else { "CREATE" };
        let review = review_for("controller-write", operation, &object, old.as_ref());
        let admitted = admit(self, &addrs, &ca, &review)
            .await
            .expect("admission answered");
        self.put(admitted)
    }

    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .remove(&(resource.into(), namespace.into(), name.into()))
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(resource.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// Every Service and Deployment PATCH so far, in order.
    pub fn patches(&self) -> Vec<Patched> {
        self.lock().patches.clone()
    }

    /// Every admission review the fake sent, in order.
    pub fn reviews(&self) -> Vec<Reviewed> {
        self.lock().reviews.clone()
    }

    /// Open watches (for a report when something fails).
    pub fn watch_count(&self) -> usize {
        self.lock().watches.len()
    }
}

async fn handle(State(fake): State<FakeApi>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let query: BTreeMap<String, String> = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let segments: Vec<&str> = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    // /api/v1/namespaces/NS/RES[/NAME] or /apis/GROUP/v1/namespaces/NS/RES[/NAME]
    let (["api", "v1", "namespaces", rest @ ..] | ["apis", _, "v1", "namespaces", rest @ ..]) =
        segments.as_slice()
    else {
        return status(StatusCode::NOT_FOUND, "NotFound");
    };
    let header = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    match (&parts.method, rest) {
        (&Method::GET, [ns, res]) if query.get("watch").is_some_and(|w| w == "true") => {
            watch(&fake, ns, res, &query)
        }
        (&Method::GET, [ns, res]) => list(&fake, ns, res, &query),
        (&Method::GET, [ns, res, name]) => match fake.get(res, ns, name) {
            Some(o) => ok(&o),
            None => status(StatusCode::NOT_FOUND, "NotFound"),
        },
        (&Method::POST, [ns, "leases"]) => {
            let mut lease: Value = serde_json::from_slice(&body).unwrap();
            lease["metadata"]["namespace"] = json!(ns);
            lease["kind"] = json!("Lease");
            lease["apiVersion"] = json!("coordination.k8s.io/v1");
            let mut inner = fake.lock();
            if inner.objects.contains_key(&key_of(&lease)) {
                return status(StatusCode::CONFLICT, "AlreadyExists");
            }
            ok(&inner.store(lease))
        }
        (&Method::PATCH, [ns, "leases", name]) => {
            lease_patch(&fake, ns, name, &header(header::CONTENT_TYPE), &body)
        }
        (&Method::PATCH, [ns, res @ ("services" | "deployments"), name]) => {
            let token = header(header::AUTHORIZATION)
                .trim_start_matches("Bearer ")
                .to_owned();
            let patched = Patched {
                resource: (*res).to_owned(),
                name: (*name).to_owned(),
                content_type: header(header::CONTENT_TYPE),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                token,
                body: serde_json::from_slice(&body).unwrap(),
            };
            patch(&fake, ns, patched).await
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
    }
}

fn list(fake: &FakeApi, ns: &str, res: &str, query: &BTreeMap<String, String>) -> Response {
    let inner = fake.lock();
    if inner.refuse_lists {
        return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    }
    let items: Vec<&Value> = inner
        .objects
        .iter()
        .filter(|((r, n, _), o)| {
            r == res
                && n == ns
                && matches(
                    query.get("labelSelector").map(String::as_str),
                    query.get("fieldSelector").map(String::as_str),
                    o,
                )
        })
        .map(|(_, o)| o)
        .collect();
    let start: usize = query.get("continue").map_or(0, |c| c.parse().unwrap());
    let limit: usize = query
        .get("limit")
        .map_or(usize::MAX, |l| l.parse().unwrap());
    let end = start.saturating_add(limit).min(items.len());
    let mut metadata = json!({"resourceVersion": inner.rv.to_string()});
    if end < items.len() {
        metadata["continue"] = json!(end.to_string());
    }
    let kind = match res {
        "services" => "ServiceList",
        "deployments" => "DeploymentList",
        "secrets" => "SecretList",
        _ => "List",
    };
    ok(
        &json!({"kind": kind, "apiVersion": "v1", "metadata": metadata,
               "items": items.get(start..end).unwrap_or_default()}),
    )
}

/// A watch from `resourceVersion`: what changed since, then each change as it happens. Never
/// ends by itself (the client's `timeoutSeconds` is not honoured; the watcher copes either way).
fn watch(fake: &FakeApi, ns: &str, res: &str, query: &BTreeMap<String, String>) -> Response {
    let (tx, rx) = mpsc::unbounded_channel();
    let w = Watch {
        resource: res.to_owned(),
        namespace: ns.to_owned(),
        labels: query.get("labelSelector").cloned(),
        fields: query.get("fieldSelector").cloned(),
        tx,
    };
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let mut inner = fake.lock();
    for e in inner.events.iter().filter(|e| {
        e.rv > since && e.resource == res && e.namespace == ns && selects(&w, &e.object)
    }) {
        w.tx.send(event_line(e.kind, &e.object)).unwrap();
    }
    inner.watches.push(w);
    drop(inner);
    let stream = tokio_stream_of(rx).map(Ok::<_, std::io::Error>);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn tokio_stream_of(mut rx: mpsc::UnboundedReceiver<Bytes>) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Lease writes as kube-lease-manager sends them: server-side apply to take an orphaned Lease
/// (refused with 409 when another holder's identity is there, as a field-manager conflict
/// would be), and strategic-merge patches of `spec` fields (null clears one).
fn lease_patch(fake: &FakeApi, ns: &str, name: &str, content_type: &str, body: &[u8]) -> Response {
    let patch: Value = serde_json::from_slice(body).unwrap();
    let mut inner = fake.lock();
    let key = ("leases".to_owned(), ns.to_owned(), name.to_owned());
    let Some(mut lease) = inner.objects.get(&key).cloned() else {
        return status(StatusCode::NOT_FOUND, "NotFound");
    };
    if content_type.starts_with("application/apply-patch") {
        let held = &lease["spec"]["holderIdentity"];
        let wanted = &patch["spec"]["holderIdentity"];
        if held.is_string() && held != wanted {
            return status(StatusCode::CONFLICT, "Conflict");
        }
    }
    let spec_patch = json!({"spec": patch["spec"].clone()});
    json_patch::merge(&mut lease, &spec_patch);
    ok(&inner.store(lease))
}

/// A Service or Deployment PATCH: applied, admitted (UPDATE), stored.
async fn patch(fake: &FakeApi, ns: &str, patched: Patched) -> Response {
    let _writing = fake.writing.lock().await;
    let content_type = patched.content_type.clone();
    let body_value = patched.body.clone();
    let key = (
        patched.resource.clone(),
        ns.to_owned(),
        patched.name.clone(),
    );
    let (old, addrs, ca) = {
        let mut inner = fake.lock();
        inner.patches.push(patched);
        let Some(old) = inner.objects.get(&key).cloned() else {
            return status(StatusCode::NOT_FOUND, "NotFound");
        };
        (old, inner.webhooks.clone(), inner.ca.clone())
    };
    let mut new = old.clone();
    if content_type.starts_with("application/json-patch+json") {
        let ops: json_patch::Patch = serde_json::from_value(body_value).unwrap();
        if json_patch::patch(&mut new, &ops).is_err() {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
        }
    } else if content_type.starts_with("application/merge-patch+json") {
        json_patch::merge(&mut new, &body_value);
    } else {
        return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType");
    }
    let uid = format!("patch-{}", fake.lock().rv);
    let review = review_for(&uid, "UPDATE", &new, Some(&old));
    let Some(admitted) = admit(fake, &addrs, &ca, &review).await else {
        // failurePolicy: Fail.
        return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
    };
    ok(&fake.lock().store(admitted))
}

/// Sends `review` to the first webhook replica that answers, applies its patch, returns the
/// object as admitted; `None` when none answered.
async fn admit(fake: &FakeApi, addrs: &[SocketAddr], ca: &str, review: &Value) -> Option<Value> {
    for addr in addrs {
        let attempt = async {
            let tls = tls_connect(*addr, client_config(ca, &[b"http/1.1"], None))
                .await
                .ok()?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .ok()?;
            tokio::spawn(conn);
            let response = sender.send_request(review_request(review)).await.ok()?;
            let bytes = response.into_body().collect().await.ok()?.to_bytes();
            Some(laws::apply_response(review, &bytes).unwrap_or_else(|e| panic!("{e}")))
        };
        if let Ok(Some(applied)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            let request = &review["request"];
            fake.lock().reviews.push(Reviewed {
                operation: request["operation"].as_str().unwrap().to_owned(),
                kind: request["kind"]["kind"].as_str().unwrap().to_owned(),
                name: request["name"].as_str().unwrap().to_owned(),
                warnings: applied.warnings,
            });
            return Some(applied.patched);
        }
    }
    None
}

fn ok(object: &Value) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(object).unwrap()))
        .unwrap()
}

fn status(code: StatusCode, reason: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "reason": reason, "message": reason, "code": code.as_u16()});
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A kubeconfig for the fake at `addr`, with `token` as the user's bearer token.
pub fn kubeconfig(addr: SocketAddr, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
         clusters: [{{name: fake, cluster: {{server: 'http://{addr}'}}}}]\n\
         users: [{{name: fake, user: {{token: {token}}}}}]\n\
         contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
    )
}
