//! Shared by the integration tests, one module per concern. Each test binary compiles all of
//! them and uses some, hence `dead_code`; a failing helper should panic with what failed.

#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

pub mod client;
pub mod cluster;
pub mod control_plane;
pub mod fixtures;
pub mod load;
pub mod manifests;
pub mod pki;
pub mod pod;
pub mod process;
pub mod proxy;
pub mod query;
pub mod server;
pub mod tools;

pub use client::*;
pub use fixtures::*;
pub use load::*;
pub use pki::*;
pub use process::*;
pub use server::*;
