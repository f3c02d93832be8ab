//! Self-managed TLS (`serve --tls-secret`): the webhook keeps its own CA and serving certificate
//! in one Secret in its namespace and keeps its registration's caBundle current, so it installs
//! with nothing else (no cert-manager, no `certs` by hand). The decisions are
//! `core::selftls`'s.
//!
//! Network I/O, all replicas: a watch of that one Secret (each new serving certificate is handed
//! to the TLS layer, no restart), and a read of the registration until its caBundle trusts the
//! CA being served (until both, the replica is not ready). The Lease holder alone writes: it
//! creates the Secret when missing, renews the serving certificate at two thirds of its life,
//! rolls the CA in two steps (the registration trusts old and new before anything is served
//! from the new), and patches the caBundle of its registration by name. Every write carries the
//! resourceVersion read, so two writers could not both succeed. Keys stay in the Secret and in
//! memory; nothing here logs them.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use base64::Engine as _;
use futures::StreamExt as _;
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::{Value, json};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    REQUEST_TIMEOUT,
    lease::{Leadership, may_act},
    reconciler::{FIELD_MANAGER, stopped},
};
use crate::{
    core::selftls::{Cert, Held, Lifetimes, Serving, Step, ca_validity, decide, serving_validity},
    pki::{self, Ca, Validity},
};

/// The Secret's keys.
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const BUNDLE: &str = "ca-bundle.crt";
pub const NEXT_CA_CRT: &str = "next-ca.crt";
pub const NEXT_CA_KEY: &str = "next-ca.key";

/// How often the leader checks the Secret and the registration without a change.
const CHECK_EVERY: Duration = Duration::from_secs(30);
/// How often a replica reads the registration: often until it trusts the CA served (the replica is
/// not ready until then), then now and again, to notice it being replaced.
const REGISTRATION_POLL: Duration = Duration::from_secs(2);
const REGISTRATION_RECHECK: Duration = Duration::from_secs(30);

/// What `serve --tls-secret` was told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The Secret, in `namespace`.
    pub secret: String,
    /// The webhook's own namespace.
    pub namespace: String,
    /// The MutatingWebhookConfiguration whose caBundle is kept.
    pub registration: String,
    /// The webhook's Service: the certificate's DNS names.
    pub service: String,
    pub lifetimes: Lifetimes,
}

/// Hands a new serving certificate (PEM chain and key) to the TLS layer; an error says why it
/// was refused (the old one stays).
pub type Install = Box<dyn Fn(&[u8], &[u8]) -> Result<(), String> + Send + Sync>;

/// What this replica knows, for readiness and metrics.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<Inner>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    /// The CA (DER) that signed the certificate served now; `None` until one is served.
    serving_ca: Option<Vec<u8>>,
    /// The registration trusts `serving_ca`.
    trusted: bool,
    ca_not_after: Option<i64>,
    serving_not_after: Option<i64>,
}

impl Status {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why this replica cannot serve admission yet; `None` when it can.
    #[must_use]
    pub fn not_ready(&self, settings: &Settings) -> Option<String> {
        let inner = self.lock();
        if inner.serving_ca.is_none() {
            return Some(format!(
                "waiting for the TLS Secret {}/{} (the Lease holder creates it)",
                settings.namespace, settings.secret
            ));
        }
        (!inner.trusted).then(|| {
            format!(
                "waiting for MutatingWebhookConfiguration {}'s caBundle to trust the CA served",
                settings.registration
            )
        })
    }

    /// The CA's notAfter (Unix seconds), once known.
    #[must_use]
    pub fn ca_not_after(&self) -> Option<i64> {
        self.lock().ca_not_after
    }

    /// The serving certificate's notAfter (Unix seconds), once served.
    #[must_use]
    pub fn serving_not_after(&self) -> Option<i64> {
        self.lock().serving_not_after
    }
}

/// Starts the Secret watch and the registration check on every replica, and the leader's
/// upkeep; returns the status readiness reads, and the tasks.
#[must_use]
pub fn start(
    client: &Client,
    watch_client: &Client,
    settings: Settings,
    install: Install,
    leadership: Leadership,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Arc<Status>, Vec<JoinHandle<()>>) {
    let status = Arc::new(Status::default());
    let settings = Arc::new(settings);
    let tasks = vec![
        tokio::spawn(serve_secret(
            client.clone(),
            watch_client.clone(),
            Arc::clone(&settings),
            Arc::clone(&status),
            install,
        )),
        tokio::spawn(keep(
            client.clone(),
            settings,
            Arc::clone(&status),
            leadership,
            stop,
        )),
    ];
    (status, tasks)
}

/// The data of a Secret, by key.
fn data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .as_ref()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default()
}

/// How long the registration must have trusted a new CA before a replica serves a certificate
/// it signed in place of one the registration already trusts: the apiserver reads registrations
/// through an informer, a moment behind.
const INSTALL_GRACE: Duration = Duration::from_secs(3);

/// A certificate from the Secret, signed by another CA than the one served, waiting until the
/// registration trusts that CA.
struct Pending {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
    trusted_since: Option<tokio::time::Instant>,
}

/// Every replica: serve the Secret's certificate as it changes, and follow whether the
/// registration trusts the CA served (readiness waits for it).
///
/// A certificate from the CA already served (a renewal) is served at once. One from another CA
/// (after a roll, or a Secret made anew) is served only once the registration has trusted its CA
/// for [`INSTALL_GRACE`], so a replica never swaps a certificate the apiserver accepts for one it
/// does not; the first certificate, in place of the placeholder, is served at once (the replica
/// is not ready until it is trusted). A registration that cannot be read leaves what was known.
async fn serve_secret(
    client: Client,
    watch_client: Client,
    settings: Arc<Settings>,
    status: Arc<Status>,
    install: Install,
) {
    let secrets = Api::<Secret>::namespaced(watch_client, &settings.namespace);
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={}", settings.secret))
        .timeout(super::cache::WATCH_TIMEOUT_SECONDS);
    let mut stream = watcher(secrets, config).default_backoff().boxed();
    let registrations = Api::<MutatingWebhookConfiguration>::all(client);
    let mut installed: Option<(Vec<u8>, Vec<u8>)> = None;
    let mut pending: Option<Pending> = None;
    loop {
        let settled = status.lock().trusted && pending.is_none();
        let poll = if settled {
            REGISTRATION_RECHECK
        } else {
            REGISTRATION_POLL
        };
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { return };
                if let Some(secret) = applied(&settings, event) {
                    take(&secret, &install, &status, &mut installed, &mut pending, &settings);
                }
            }
            () = tokio::time::sleep(poll) => {}
        }
        let trusted = match registrations.get_opt(&settings.registration).await {
            Ok(r) => r.as_ref().and_then(trusted_cas).unwrap_or_default(),
            Err(e) => {
                debug!(registration = %settings.registration, error = %e, "Cannot read the registration; what was known stays");
                continue;
            }
        };
        let trusts =
            |ca: &[u8]| !trusted.is_empty() && trusted.iter().all(|h| h.iter().any(|c| c == ca));
        if let Some(p) = pending.as_mut() {
            if p.ca.as_deref().is_some_and(trusts) {
                let since = *p
                    .trusted_since
                    .get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= INSTALL_GRACE
                    && let Some(p) = pending.take()
                {
                    serve(
                        &p.cert,
                        &p.key,
                        p.ca,
                        &install,
                        &status,
                        &mut installed,
                        &settings,
                    );
                }
            } else {
                p.trusted_since = None;
            }
        }
        let mut inner = status.lock();
        let now_trusted = inner.serving_ca.as_deref().is_some_and(trusts);
        if now_trusted != inner.trusted {
            inner.trusted = now_trusted;
            if now_trusted {
                info!(registration = %settings.registration, "The registration trusts the CA served");
            } else {
                warn!(registration = %settings.registration, "The registration does not trust the CA served; not ready until it does");
            }
        }
    }
}

/// The Secret of a watch event, when it was written.
fn applied(
    settings: &Settings,
    event: Result<watcher::Event<Secret>, watcher::Error>,
) -> Option<Secret> {
    match event {
        Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => Some(s),
        Ok(watcher::Event::Delete(_)) => {
            warn!(
                secret = %settings.secret,
                "The TLS Secret was deleted; serving the last certificate until the Lease holder \
                 makes a new one"
            );
            None
        }
        Ok(_) => None,
        Err(e) => {
            warn!(secret = %settings.secret, error = %e, "Watch of the TLS Secret failed; retrying");
            None
        }
    }
}

/// A new version of the Secret: its certificate served now, or kept pending (see
/// [`serve_secret`]).
fn take(
    secret: &Secret,
    install: &Install,
    status: &Status,
    installed: &mut Option<(Vec<u8>, Vec<u8>)>,
    pending: &mut Option<Pending>,
    settings: &Settings,
) {
    let d = data(secret);
    let (Some(cert), Some(key)) = (d.get(TLS_CRT), d.get(TLS_KEY)) else {
        return;
    };
    if installed
        .as_ref()
        .is_some_and(|(c, k)| c == cert && k == key)
    {
        *pending = None;
        return;
    }
    let ca = d.get(CA_CRT).and_then(|p| pki::x509::first_certificate(p));
    let served_ca = status.lock().serving_ca.clone();
    if served_ca.is_none() || served_ca == ca {
        *pending = None;
        serve(cert, key, ca, install, status, installed, settings);
    } else {
        info!(secret = %settings.secret, "A certificate from another CA: served once the registration trusts it");
        *pending = Some(Pending {
            cert: cert.clone(),
            key: key.clone(),
            ca,
            trusted_since: None,
        });
    }
}

/// Hands a certificate to the TLS layer and notes what is served.
fn serve(
    cert: &[u8],
    key: &[u8],
    ca: Option<Vec<u8>>,
    install: &Install,
    status: &Status,
    installed: &mut Option<(Vec<u8>, Vec<u8>)>,
    settings: &Settings,
) {
    if let Err(e) = install(cert, key) {
        warn!(secret = %settings.secret, error = %e, "Refused the TLS Secret's certificate; the old one stays");
        return;
    }
    info!(secret = %settings.secret, "Serving the TLS Secret's certificate");
    *installed = Some((cert.to_vec(), key.to_vec()));
    {
        let mut inner = status.lock();
        inner.ca_not_after = ca.as_deref().and_then(pki::not_after);
        inner.serving_not_after =
            pki::x509::first_certificate(cert).and_then(|der| pki::not_after(&der));
        if inner.serving_ca != ca {
            // Checked against the registration at the next read, within moments.
            inner.trusted = inner.trusted && ca.is_some() && inner.serving_ca.is_some();
        }
        inner.serving_ca = ca;
    }
    status.changed.notify_waiters();
}

/// The CA certificates (DER) of every webhook's caBundle in the registration, or `None` when a
/// webhook has none.
fn trusted_cas(registration: &MutatingWebhookConfiguration) -> Option<Vec<Vec<Vec<u8>>>> {
    registration
        .webhooks
        .iter()
        .flatten()
        .map(|w| {
            let bundle = w.client_config.ca_bundle.as_ref()?;
            pki::x509::ca_bundle(&bundle.0).ok()
        })
        .collect()
}

/// The Lease holder: keep the Secret and the registration's caBundle current.
async fn keep(
    client: Client,
    settings: Arc<Settings>,
    status: Arc<Status>,
    mut leadership: Leadership,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let secrets = Api::<Secret>::namespaced(client.clone(), &settings.namespace);
    let registrations = Api::<MutatingWebhookConfiguration>::all(client);
    let mut trusted = Trusted::default();
    loop {
        let mut wait = CHECK_EVERY;
        if may_act(&leadership, REQUEST_TIMEOUT) {
            match upkeep(
                &secrets,
                &registrations,
                &settings,
                &leadership,
                &mut trusted,
            )
            .await
            {
                // A step was written, or the registration patched: the next follows at once.
                Ok(Pass::Wrote) => wait = Duration::from_secs(1),
                Ok(Pass::Wait { next_check }) => {
                    let until = u64::try_from(next_check.saturating_sub(now())).unwrap_or(0);
                    wait = wait.min(Duration::from_secs(until.max(1)));
                }
                Err(e) => warn!(
                    secret = %settings.secret,
                    registration = %settings.registration,
                    error = %e,
                    "Self-managed TLS: a step failed; tried again"
                ),
            }
        } else {
            // A new leader starts its own count of how long the registration trusted the bundle.
            trusted = Trusted::default();
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = status.changed.notified() => {}
            _ = leadership.changed() => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Since when (Unix seconds) the registration has trusted exactly this bundle.
#[derive(Debug, Default)]
struct Trusted(Option<(Vec<Vec<u8>>, i64)>);

impl Trusted {
    /// Notes whether the registration trusts `bundle` at `now`; since when it has.
    fn note(&mut self, bundle: &[Vec<u8>], trusted: bool, now: i64) -> Option<i64> {
        if !trusted {
            self.0 = None;
            return None;
        }
        match &self.0 {
            Some((b, since)) if b.as_slice() == bundle => Some(*since),
            _ => {
                self.0 = Some((bundle.to_vec(), now));
                Some(now)
            }
        }
    }
}

/// What a pass did.
enum Pass {
    Wrote,
    Wait { next_check: i64 },
}

/// Why an upkeep step failed.
#[derive(Debug, thiserror::Error)]
pub enum UpkeepError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("the clock is out of range")]
    Clock,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn validity((from, to): (i64, i64)) -> Result<Validity, UpkeepError> {
    let at = |t| time::OffsetDateTime::from_unix_timestamp(t).map_err(|_| UpkeepError::Clock);
    Ok(Validity {
        not_before: at(from)?,
        not_after: at(to)?,
    })
}

/// One pass: read, decide, write at most one step, then make the registration trust the bundle.
async fn upkeep(
    secrets: &Api<Secret>,
    registrations: &Api<MutatingWebhookConfiguration>,
    settings: &Settings,
    leadership: &Leadership,
    since: &mut Trusted,
) -> Result<Pass, UpkeepError> {
    let current = secrets.get_opt(&settings.secret).await?;
    let d = current.as_ref().map(data).unwrap_or_default();
    let names = pki::service_dns_names(&settings.service, &settings.namespace);
    let held = parse(&d, &names);
    let registration = registrations.get_opt(&settings.registration).await?;
    let bundle: Vec<Vec<u8>> = held.bundle.iter().map(|c| c.der.clone()).collect();
    let trusted = registration
        .as_ref()
        .and_then(trusted_cas)
        .is_some_and(|hooks| {
            !hooks.is_empty() && hooks.iter().all(|h| bundle.iter().all(|c| h.contains(c)))
        });
    let now = now();
    let trusted_since = since.note(&bundle, trusted, now);
    let step = decide(&held, now, settings.lifetimes, trusted_since);
    let write: Option<BTreeMap<&str, Option<String>>> = match &step {
        Step::Wait { .. } => None,
        Step::Create => {
            let ca = Ca::new_valid(
                "outpost-webhook CA",
                validity(ca_validity(now, settings.lifetimes.ca_seconds))?,
            )?;
            Some(issue(&ca, &names, now, settings, &[ca.pem()], None)?)
        }
        Step::StartCaRoll => {
            let next = Ca::new_valid(
                "outpost-webhook CA",
                validity(ca_validity(now, settings.lifetimes.ca_seconds))?,
            )?;
            let mut bundle = pem_of(&held.bundle);
            bundle.push(next.pem());
            Some(BTreeMap::from([
                (BUNDLE, Some(bundle.concat())),
                (NEXT_CA_CRT, Some(next.pem())),
                (NEXT_CA_KEY, Some(next.key_pem())),
            ]))
        }
        Step::FinishCaRoll => {
            let next = ca_from(&d, NEXT_CA_CRT, NEXT_CA_KEY)?;
            let mut bundle = vec![next.pem()];
            bundle.extend(
                pem_of(&held.bundle)
                    .into_iter()
                    .filter(|p| *p != next.pem()),
            );
            let mut w = issue(&next, &names, now, settings, &bundle, None)?;
            w.insert(NEXT_CA_CRT, None);
            w.insert(NEXT_CA_KEY, None);
            Some(w)
        }
        Step::RenewServing => {
            let ca = ca_from(&d, CA_CRT, CA_KEY)?;
            let bundle = pem_of(&held.bundle);
            Some(issue(&ca, &names, now, settings, &bundle, Some(()))?)
        }
        Step::PruneBundle => {
            let ca = ca_from(&d, CA_CRT, CA_KEY)?;
            let mut bundle = vec![ca.pem()];
            bundle.extend(
                held.bundle
                    .iter()
                    .filter(|c| c.not_after > now)
                    .map(|c| pki::pem_certificate(&c.der))
                    .filter(|p| *p != ca.pem()),
            );
            Some(BTreeMap::from([(BUNDLE, Some(bundle.concat()))]))
        }
    };
    if let Some(write) = write {
        // The lease may have run short while certificates were made.
        if !may_act(leadership, REQUEST_TIMEOUT) {
            return Ok(Pass::Wait { next_check: now });
        }
        store(secrets, settings, current.as_ref(), &write).await?;
        info!(secret = %settings.secret, step = ?step, "Self-managed TLS: wrote the Secret");
        // The registration is brought in line on the next pass, from what was stored.
        return Ok(Pass::Wrote);
    }
    if let Some(registration) = registration
        && !trusted_exactly(&registration, &d)
    {
        if !may_act(leadership, REQUEST_TIMEOUT) {
            return Ok(Pass::Wait { next_check: now });
        }
        patch_registration(registrations, &registration, &d).await?;
        info!(registration = %settings.registration, "Self-managed TLS: set the registration's caBundle");
        return Ok(Pass::Wrote);
    }
    Ok(Pass::Wait {
        next_check: match step {
            Step::Wait { next_check } => next_check,
            _ => now,
        },
    })
}

/// The data a new serving certificate writes: it, its key, the CA's certificate and key, and
/// the bundle. `renew_only`: the CA is unchanged, so only the serving pair is written.
fn issue(
    ca: &Ca,
    names: &[String],
    now: i64,
    settings: &Settings,
    bundle: &[String],
    renew_only: Option<()>,
) -> Result<BTreeMap<&'static str, Option<String>>, UpkeepError> {
    let ca_not_after = ca.not_after().unix_timestamp();
    let serving = ca.serving_valid(
        names,
        validity(serving_validity(
            now,
            settings.lifetimes.serving_seconds,
            ca_not_after,
        ))?,
    )?;
    let mut out = BTreeMap::from([
        (TLS_CRT, Some(serving.cert_pem)),
        (TLS_KEY, Some(serving.key_pem)),
    ]);
    if renew_only.is_none() {
        out.insert(CA_CRT, Some(ca.pem()));
        out.insert(CA_KEY, Some(ca.key_pem()));
        out.insert(BUNDLE, Some(bundle.concat()));
    }
    Ok(out)
}

fn pem_of(certs: &[Cert]) -> Vec<String> {
    certs.iter().map(|c| pki::pem_certificate(&c.der)).collect()
}

fn ca_from(d: &BTreeMap<String, Vec<u8>>, crt: &str, key: &str) -> Result<Ca, UpkeepError> {
    let text =
        |k: &str| String::from_utf8_lossy(d.get(k).map_or(&[][..], Vec::as_slice)).into_owned();
    Ok(Ca::from_pem(&text(crt), &text(key))?)
}

/// The Secret's data, parsed for the decision.
#[must_use]
pub fn parse(d: &BTreeMap<String, Vec<u8>>, names: &[String]) -> Held {
    let cert = |key: &str| -> Option<Cert> {
        let der = pki::x509::first_certificate(d.get(key)?)?;
        Some(Cert {
            not_before: pki::x509::not_before(&der)?,
            not_after: pki::not_after(&der)?,
            der,
        })
    };
    let text =
        |k: &str| String::from_utf8_lossy(d.get(k).map_or(&[][..], Vec::as_slice)).into_owned();
    // A CA is usable only with its key.
    let ca = cert(CA_CRT).filter(|_| Ca::from_pem(&text(CA_CRT), &text(CA_KEY)).is_ok());
    let next_ca =
        cert(NEXT_CA_CRT).filter(|_| Ca::from_pem(&text(NEXT_CA_CRT), &text(NEXT_CA_KEY)).is_ok());
    let serving = cert(TLS_CRT).map(|c| {
        let (signed_by_ca, names_match) =
            pki::x509::serving_facts(&c.der, ca.as_ref().map(|a| a.der.as_slice()), names);
        let key_ok = pki::x509::key_matches(&c.der, d.get(TLS_KEY).map_or(&[][..], Vec::as_slice));
        Serving {
            cert: c,
            signed_by_ca: signed_by_ca && key_ok,
            names_match,
        }
    });
    let bundle = d
        .get(BUNDLE)
        .and_then(|b| pki::x509::ca_bundle(b).ok())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|der| {
            Some(Cert {
                not_before: pki::x509::not_before(&der)?,
                not_after: pki::not_after(&der)?,
                der,
            })
        })
        .collect();
    Held {
        ca,
        serving,
        next_ca,
        bundle,
    }
}

/// Writes `write` into the Secret (`None`: remove the key), creating it when `current` is
/// `None`. An update carries the resourceVersion read: a Secret changed since is refused (409),
/// and the next pass reads it again.
async fn store(
    secrets: &Api<Secret>,
    settings: &Settings,
    current: Option<&Secret>,
    write: &BTreeMap<&str, Option<String>>,
) -> Result<(), kube::Error> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    match current {
        None => {
            let data: BTreeMap<String, ByteString> = write
                .iter()
                .filter_map(|(k, v)| Some(((*k).to_owned(), ByteString(v.clone()?.into_bytes()))))
                .collect();
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(settings.secret.clone()),
                    namespace: Some(settings.namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "outpost-webhook".to_owned(),
                    )])),
                    ..kube::api::ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(data),
                ..Secret::default()
            };
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PostParams::default()
            };
            match secrets.create(&params, &secret).await {
                Ok(_) => Ok(()),
                // Another writer made it first: the next pass reads it.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                Err(e) => Err(e),
            }
        }
        Some(current) => {
            let data: serde_json::Map<String, Value> = write
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        v.as_deref().map_or(Value::Null, |s| json!(b64(s))),
                    )
                })
                .collect();
            let patch = json!({
                "metadata": {"resourceVersion": current.metadata.resource_version},
                "data": data,
            });
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            secrets
                .patch(&settings.secret, &params, &Patch::Merge(&patch))
                .await
                .map(drop)
        }
    }
}

/// Whether every webhook's caBundle is exactly the Secret's bundle.
fn trusted_exactly(
    registration: &MutatingWebhookConfiguration,
    d: &BTreeMap<String, Vec<u8>>,
) -> bool {
    let Some(bundle) = d.get(BUNDLE).filter(|b| !b.is_empty()) else {
        // Nothing to trust yet.
        return true;
    };
    registration.webhooks.iter().flatten().all(|w| {
        w.client_config
            .ca_bundle
            .as_ref()
            .is_some_and(|b| &b.0 == bundle)
    })
}

/// Sets every webhook's caBundle to the Secret's bundle: a JSON patch that tests each webhook's
/// name at its index (and the resourceVersion read), so it never lands on another webhook.
async fn patch_registration(
    registrations: &Api<MutatingWebhookConfiguration>,
    registration: &MutatingWebhookConfiguration,
    d: &BTreeMap<String, Vec<u8>>,
) -> Result<(), kube::Error> {
    let Some(bundle) = d.get(BUNDLE) else {
        return Ok(());
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(bundle);
    let mut ops = vec![json!({"op": "test", "path": "/metadata/resourceVersion",
                              "value": registration.metadata.resource_version})];
    for (i, w) in registration.webhooks.iter().flatten().enumerate() {
        ops.push(json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": w.name}));
        ops.push(
            json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                        "value": encoded}),
        );
    }
    let patch: json_patch::Patch =
        serde_json::from_value(Value::Array(ops)).map_err(kube::Error::SerdeError)?;
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let name = registration.metadata.name.clone().unwrap_or_default();
    registrations
        .patch(&name, &params, &Patch::<()>::Json(patch))
        .await
        .map(drop)
}
