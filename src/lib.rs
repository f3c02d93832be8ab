//! outpost-webhook: a mutating admission webhook that fixes the Services and Deployments
//! authentik's outpost controller writes.
//!
//! Layers run one way: [`cmd`] and [`serve`] use [`core`]; [`core`] is pure (a
//! [`core::policy::Policy`] and an object in, RFC 6902 operations out) and uses neither.
//!
//! ```
//! use outpost_webhook::core::{mutate::{mutate_object, ObjectKind, Verdict}, policy::Policy};
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

pub mod cluster;
pub mod cmd;
pub mod core;
pub mod duration;
pub mod k8s;
pub mod logging;
pub mod pki;
pub mod serve;
