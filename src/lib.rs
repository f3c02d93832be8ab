//! outpost-webhook: a mutating admission webhook that fixes the Services and Deployments
//! authentik's outpost controller writes.
//!
//! Layers run one way: [`cmd`] and [`serve`] use [`core`]; [`core`] is pure (a
//! [`core::policy::Policy`] and an object in, RFC 6902 operations out) and uses neither.
//!
//! ```
//! use outpost_webhook::core::{
//!     cluster::{Off, Snapshot},
//!     mutate::{mutate_in, ObjectKind, Verdict},
//!     policy::Policy,
//! };
//! use serde_json::json;
//!
//! let policy = Policy::builtin()?;
//! let labels = json!({
//!     "app.kubernetes.io/managed-by": "goauthentik.io",
//!     "goauthentik.io/outpost-name": "embedded",
//!     "goauthentik.io/outpost-type": "proxy",
//!     "goauthentik.io/outpost-uuid": "0eecac0797c7443c892505f2f4fe3e47"});
//! let service = json!({
//!     "apiVersion": "v1", "kind": "Service",
//!     "metadata": {"name": "ak-outpost-embedded", "namespace": "authentik", "labels": labels},
//!     "spec": {"selector": {"app.kubernetes.io/name": "authentik",
//!                           "app.kubernetes.io/component": "server"}}
//! });
//! // Seeing nothing of the cluster, `selector: auto` keeps the controller's selector.
//! let kept = mutate_in(&policy, &Off, "authentik", ObjectKind::Service, &service);
//! assert!(kept.ops.is_empty() && !kept.warnings.is_empty());
//!
//! // A standalone Deployment runs the outpost: the Service is pointed at its pods.
//! let mut pods = labels.clone();
//! pods["app.kubernetes.io/name"] = json!("authentik-outpost-proxy");
//! let deployment = json!({
//!     "apiVersion": "apps/v1", "kind": "Deployment",
//!     "metadata": {"name": "ak-outpost-embedded", "namespace": "authentik", "labels": labels},
//!     "spec": {"selector": {"matchLabels": pods}}
//! });
//! let cluster = Snapshot::of([&deployment], "authentik");
//! let outcome = mutate_in(&policy, &cluster, "authentik", ObjectKind::Service, &service);
//! assert_eq!(outcome.verdict, Verdict::Patched);
//!
//! let mut fixed = service.clone();
//! json_patch::patch(&mut fixed, &outcome.ops)?;
//! assert_eq!(fixed["spec"]["selector"]["app.kubernetes.io/name"], "authentik-outpost-proxy");
//! assert!(mutate_in(&policy, &cluster, "authentik", ObjectKind::Service, &fixed).ops.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

/// mimalloc (feature `mimalloc`, on by default): a review parses, builds and frees hundreds of
/// small strings and maps, and glibc's malloc and free took 16 % of the server's CPU at 5k
/// reviews a second. Set here rather than in `main.rs` so that the floor server, the benches and
/// the tests run with the allocator the binary ships with. docs/performance.md has the figures.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod cluster;
pub mod cmd;
pub mod core;
pub mod duration;
pub mod k8s;
pub mod logging;
pub mod pki;
pub mod serve;
