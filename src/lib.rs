//! outpost-webhook: a mutating admission webhook that fixes the Services and Deployments
//! authentik's outpost controller writes.

pub mod mutate;
pub mod policy;
