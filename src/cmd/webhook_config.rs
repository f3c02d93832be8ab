//! `outpost-webhook webhook-config`: the MutatingWebhookConfiguration of
//! `deploy/base/webhook.yaml` (compiled in, so the binary and `deploy/` cannot drift), with a CA
//! bundle and a client config filled in.
//!
//! [`execute`] reads the CA files and prints; [`ca_bundle`], [`render`] and
//! [`misplaced_service`] are pure.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::Args;
use serde_json::{Map, Value, json};

use super::Error;
use crate::{
    core::admission::MUTATE_PATH,
    k8s::{valid_label_value, valid_qualified_name},
    pki::{self, x509::BundleError},
};

/// Flags of `webhook-config`.
#[derive(Debug, Args)]
pub struct WebhookConfigArgs {
    /// A CA bundle (PEM CA certificates only) the apiserver verifies the webhook with, e.g.
    /// `certs`' ca.crt. Repeatable: give the old CA and the new one to rotate without a gap;
    /// the certificates go into caBundle in the order given.
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Vec<PathBuf>,
    /// The webhook's Service.
    #[arg(long, default_value = "outpost-webhook", conflicts_with = "url")]
    pub service: String,
    /// The namespace of the webhook's Service: where the webhook runs, not the outposts.
    #[arg(long, default_value = "outpost-webhook", conflicts_with = "url")]
    pub namespace: String,
    /// Call the webhook at this `https://` URL instead of a Service (for a local apiserver:
    /// `https://127.0.0.1:8443/mutate`).
    #[arg(long)]
    pub url: Option<String>,
    /// The labels of the namespaces whose outposts are fixed: key=value[,key=value...].
    /// Default: kubernetes.io/metadata.name=authentik.
    #[arg(long, value_name = "SELECTOR")]
    pub namespace_selector: Option<String>,
    /// Fail (default: a write that skipped the webhook would store the broken selector) or
    /// Ignore.
    #[arg(long, value_parser = ["Fail", "Ignore"])]
    pub failure_policy: Option<String>,
}

/// Runs `webhook-config`: prints the registration.
///
/// # Errors
/// When a CA bundle cannot be read or holds anything but CA certificates, or a flag is
/// malformed.
pub fn execute(args: WebhookConfigArgs) -> Result<(), Error> {
    let mut files = Vec::with_capacity(args.ca_bundle.len());
    for p in &args.ca_bundle {
        let bytes = std::fs::read(p)
            .map_err(|source| Error::io(format!("cannot read {}", p.display()), source))?;
        files.push((p.as_path(), bytes));
    }
    let ca_bundle = if files.is_empty() {
        None
    } else {
        Some(ca_bundle(&files)?.into_bytes())
    };
    let target = match args.url {
        Some(url) => Target::Url(url),
        None => Target::Service {
            name: args.service,
            namespace: args.namespace,
        },
    };
    let options = Options {
        ca_bundle,
        target,
        namespace_selector: args.namespace_selector,
        failure_policy: args.failure_policy,
    };
    let rendered = render(&options)?;
    if let Some(warning) = misplaced_service(&options) {
        eprintln!("warning: {warning}");
    }
    print!("{rendered}");
    Ok(())
}

/// A warning when the webhook's Service would be looked for in a namespace the registration's
/// `namespaceSelector` picks by name (`kubernetes.io/metadata.name`), where the outposts run:
/// `--namespace` names where the webhook itself runs, and the outposts' namespace there is almost
/// certainly a slip. The apiserver would call a Service that is not there and refuse every
/// outpost write (failurePolicy Fail).
#[must_use]
pub fn misplaced_service(options: &Options) -> Option<String> {
    let Target::Service { name, namespace } = &options.target else {
        return None;
    };
    let selector = match &options.namespace_selector {
        Some(s) => json!({"matchLabels": parse_selector(s).ok()?}),
        None => serde_saphyr::from_str::<Value>(WEBHOOK_YAML)
            .ok()?
            .pointer("/webhooks/0/namespaceSelector")?
            .clone(),
    };
    let by_name = selector
        .pointer(&format!(
            "/matchLabels/{}",
            NAMESPACE_NAME.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        .into_iter()
        .chain(
            selector
                .get("matchExpressions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|e| {
                    e.get("key").and_then(Value::as_str) == Some(NAMESPACE_NAME)
                        && e.get("operator").and_then(Value::as_str) == Some("In")
                })
                .filter_map(|e| e.get("values").and_then(Value::as_array))
                .flatten()
                .filter_map(Value::as_str),
        );
    by_name.into_iter().any(|n| n == namespace).then(|| {
        format!(
            "--namespace {namespace} is a namespace whose outposts the registration selects: the \
             apiserver will call Service {name} in {namespace}. --namespace is where the \
             webhook's own Service runs (outpost-webhook unless you moved it)"
        )
    })
}

/// The label the apiserver sets on every namespace, to its name.
const NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

/// The registration as `deploy/base` ships it.
pub const WEBHOOK_YAML: &str = include_str!("../../deploy/base/webhook.yaml");

/// Where the apiserver sends reviews.
#[derive(Debug, Clone)]
pub enum Target {
    /// The in-cluster Service, on port 443 at [`MUTATE_PATH`].
    Service { name: String, namespace: String },
    /// A URL, e.g. `https://127.0.0.1:8443/mutate` for a local apiserver.
    Url(String),
}

/// The certificates of every file, in order, as one PEM bundle.
///
/// # Errors
/// When a file holds no certificate, a block that is not a certificate (a private key, say),
/// or a certificate that is not a CA (the serving certificate instead of its CA).
pub fn ca_bundle(files: &[(&Path, Vec<u8>)]) -> Result<String, WebhookConfigError> {
    let mut out = String::new();
    for (path, bytes) in files {
        let ders = pki::x509::ca_bundle(bytes).map_err(|source| WebhookConfigError::CaBundle {
            path: path.display().to_string(),
            source,
        })?;
        for der in ders {
            out.push_str(&pki::pem_certificate(&der));
        }
    }
    Ok(out)
}

/// Why the registration could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum WebhookConfigError {
    #[error("--ca-bundle {path}")]
    CaBundle {
        path: String,
        #[source]
        source: BundleError,
    },
    #[error("the built-in registration does not parse: {0}")]
    Builtin(String),
    #[error("--namespace-selector {0:?}: expected key=value[,key=value...]")]
    Selector(String),
    #[error("--url {0:?}: must be an https:// URL")]
    Url(String),
    #[error("cannot write YAML: {0}")]
    Write(String),
}

/// The choices `webhook-config` exposes.
#[derive(Debug, Clone)]
pub struct Options {
    pub ca_bundle: Option<Vec<u8>>,
    pub target: Target,
    /// `key=value[,key=value]`: the labels of the namespaces whose outposts are fixed.
    pub namespace_selector: Option<String>,
    /// `Fail` (the default, and why is in the YAML) or `Ignore`.
    pub failure_policy: Option<String>,
}

impl Options {
    /// The registration as `deploy/` installs it: the `outpost-webhook` Service in namespace
    /// `outpost-webhook`, the shipped selectors and failure policy.
    #[must_use]
    pub fn shipped(ca_bundle: Option<Vec<u8>>) -> Self {
        Self {
            ca_bundle,
            target: Target::Service {
                name: "outpost-webhook".into(),
                namespace: "outpost-webhook".into(),
            },
            namespace_selector: None,
            failure_policy: None,
        }
    }
}

/// Renders the registration as YAML.
///
/// # Errors
/// When the selector or URL is malformed.
pub fn render(options: &Options) -> Result<String, WebhookConfigError> {
    let mut doc: Value = serde_saphyr::from_str(WEBHOOK_YAML)
        .map_err(|e| WebhookConfigError::Builtin(e.to_string()))?;
    let selector = options
        .namespace_selector
        .as_deref()
        .map(parse_selector)
        .transpose()?;
    let client_config = match &options.target {
        Target::Service { name, namespace } => json!({"service": {
            "name": name, "namespace": namespace,
            "path": MUTATE_PATH, "port": 443}}),
        Target::Url(url) if url.starts_with("https://") => json!({"url": url}),
        Target::Url(url) => return Err(WebhookConfigError::Url(url.clone())),
    };
    let webhooks = doc
        .get_mut("webhooks")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| WebhookConfigError::Builtin("no webhooks".into()))?;
    for webhook in webhooks {
        let Some(w) = webhook.as_object_mut() else {
            continue;
        };
        let mut cc = client_config.clone();
        if let (Some(ca), Some(cc)) = (&options.ca_bundle, cc.as_object_mut()) {
            cc.insert(
                "caBundle".into(),
                base64::engine::general_purpose::STANDARD.encode(ca).into(),
            );
        }
        w.insert("clientConfig".into(), cc);
        if let Some(labels) = &selector {
            w.insert("namespaceSelector".into(), json!({"matchLabels": labels}));
        }
        if let Some(policy) = &options.failure_policy {
            w.insert("failurePolicy".into(), policy.clone().into());
        }
    }
    serde_saphyr::to_string(&doc).map_err(|e| WebhookConfigError::Write(e.to_string()))
}

fn parse_selector(s: &str) -> Result<Map<String, Value>, WebhookConfigError> {
    let bad = || WebhookConfigError::Selector(s.to_owned());
    s.split(',')
        .map(|pair| {
            let (k, v) = pair.split_once('=').ok_or_else(bad)?;
            let (k, v) = (k.trim(), v.trim());
            if valid_qualified_name(k) && valid_label_value(v) {
                Ok((k.to_owned(), Value::from(v)))
            } else {
                Err(bad())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_value(options: &Options) -> Value {
        serde_saphyr::from_str(&render(options).unwrap()).unwrap()
    }

    #[test]
    fn fills_ca_bundle_service_selector_and_failure_policy() {
        let v = render_value(&Options {
            ca_bundle: Some(b"PEM".to_vec()),
            target: Target::Service {
                name: "wh".into(),
                namespace: "ns".into(),
            },
            namespace_selector: Some("team=identity, env=prod".into()),
            failure_policy: Some("Ignore".into()),
        });
        let w = &v["webhooks"][0];
        assert_eq!(
            w["clientConfig"],
            json!({"caBundle": "UEVN", "service": {
            "name": "wh", "namespace": "ns", "path": "/mutate", "port": 443}})
        );
        assert_eq!(
            w["namespaceSelector"],
            json!({"matchLabels": {"team": "identity", "env": "prod"}})
        );
        assert_eq!(w["failurePolicy"], "Ignore");
    }

    #[test]
    fn a_url_target_for_a_local_apiserver() {
        let v = render_value(&Options {
            ca_bundle: None,
            target: Target::Url("https://127.0.0.1:8443/mutate".into()),
            namespace_selector: None,
            failure_policy: None,
        });
        assert_eq!(
            v["webhooks"][0]["clientConfig"],
            json!({"url": "https://127.0.0.1:8443/mutate"})
        );
        assert_eq!(v["webhooks"][0]["failurePolicy"], "Fail");
    }

    #[test]
    fn ca_bundles_are_concatenated_in_order_and_name_the_bad_file() {
        let (old, new) = (
            pki::Ca::new("old", 10).unwrap(),
            pki::Ca::new("new", 10).unwrap(),
        );
        let leaf = old.serving(&["a".into()], 5).unwrap();
        let bundle = ca_bundle(&[
            (Path::new("old.crt"), old.pem().into_bytes()),
            (Path::new("new.crt"), new.pem().into_bytes()),
        ])
        .unwrap();
        assert_eq!(bundle, format!("{}{}", old.pem(), new.pem()));
        let e = ca_bundle(&[
            (Path::new("old.crt"), old.pem().into_bytes()),
            (Path::new("tls.crt"), leaf.cert_pem.into_bytes()),
        ])
        .unwrap_err();
        assert_eq!(e.to_string(), "--ca-bundle tls.crt");
        assert!(matches!(
            e,
            WebhookConfigError::CaBundle {
                source: BundleError::NotCa { index: 1, .. },
                ..
            }
        ));
    }

    #[test]
    fn a_service_namespace_the_selector_picks_for_outposts_is_a_warning() {
        let options = |namespace: &str, selector: Option<&str>| Options {
            ca_bundle: None,
            target: Target::Service {
                name: "outpost-webhook".into(),
                namespace: namespace.into(),
            },
            namespace_selector: selector.map(str::to_owned),
            failure_policy: None,
        };
        // The shipped selector picks authentik.
        let warning = misplaced_service(&options("authentik", None)).unwrap();
        assert!(warning.contains("--namespace authentik"), "{warning}");
        assert!(
            misplaced_service(&options(
                "identity",
                Some("team=x,kubernetes.io/metadata.name=identity")
            ))
            .is_some()
        );
        assert_eq!(misplaced_service(&options("outpost-webhook", None)), None);
        assert_eq!(
            misplaced_service(&options(
                "authentik",
                Some("kubernetes.io/metadata.name=identity")
            )),
            None
        );
        let url = Options {
            target: Target::Url("https://127.0.0.1:8443/mutate".into()),
            ..options("authentik", None)
        };
        assert_eq!(misplaced_service(&url), None);
    }

    #[test]
    fn bad_selectors_and_urls_are_refused() {
        let mut o = Options {
            ca_bundle: None,
            target: Target::Url("http://x".into()),
            namespace_selector: None,
            failure_policy: None,
        };
        assert!(render(&o).is_err());
        o.target = Target::Service {
            name: "a".into(),
            namespace: "b".into(),
        };
        o.namespace_selector = Some("novalue".into());
        assert_eq!(
            render(&o).unwrap_err().to_string(),
            "--namespace-selector \"novalue\": expected key=value[,key=value...]"
        );
    }
}
