//! outpost-webhook: a mutating admission webhook that fixes the Services and Deployments
//! authentik's outpost controller writes.
//!
//! The core is pure: a [`policy::Policy`] and an object in, RFC 6902 operations out.
//!
//! ```
//! use outpost_webhook::{mutate::{mutate_object, ObjectKind, Verdict}, policy::Policy};
//! use serde_json::json;
//!
//! let policy = Policy::builtin()?;
//! let service = json!({
//!     "apiVersion": "v1", "kind": "Service",
//!     "metadata": {"name": "ak-outpost-embedded", "labels": {
//!         "app.kubernetes.io/managed-by": "goauthentik.io",
//!         "goauthentik.io/outpost-name": "embedded",
//!         "goauthentik.io/outpost-type": "proxy",
//!         "goauthentik.io/outpost-uuid": "0eecac0797c7443c892505f2f4fe3e47"}},
//!     "spec": {"selector": {"app.kubernetes.io/name": "authentik",
//!                           "app.kubernetes.io/component": "server"}}
//! });
//! let outcome = mutate_object(&policy, ObjectKind::Service, &service);
//! assert_eq!(outcome.verdict, Verdict::Patched);
//!
//! let mut fixed = service.clone();
//! json_patch::patch(&mut fixed, &outcome.ops)?;
//! assert_eq!(fixed["spec"]["selector"]["app.kubernetes.io/name"], "authentik-outpost-proxy");
//! assert!(mutate_object(&policy, ObjectKind::Service, &fixed).ops.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod admission;
pub mod certs;
pub mod cli;
pub mod import;
pub mod logging;
pub mod metrics;
pub mod mutate;
pub mod offline;
pub mod policy;
pub mod server;
pub mod state;
pub mod tls;
pub mod webhook_config;
