//! The Trellis control plane library.
//!
//! Configuration travels from sources (a directory of YAML today, Kubernetes later) into the
//! [`ConfigStore`], which holds the last good version of every object and tells consumers
//! when something changed. See `DESIGN.md`, "How config travels".

#![forbid(unsafe_code)]

pub mod ads;
pub mod clusters;
pub mod debug;
pub mod dirsource;
pub mod mesh;
pub mod peerauth;
pub mod registry;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod translate;

pub use dirsource::{DirSourceError, DirectorySource, DirectorySourceHandle, ReloadSummary};
pub use store::{Applied, Change, ChangeOp, ConfigStore, ObjectKey, Snapshot};
