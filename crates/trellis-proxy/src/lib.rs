//! The Trellis data plane: a sidecar proxy that takes over a workload's traffic.
//!
//! Connections arrive on listeners (intercepted outbound on 15001, inbound on 15006, or
//! explicit bindings), are classified by protocol (declared by the port, else detected),
//! and forwarded: HTTP request by request over pooled upstream connections, anything else
//! as opaque TCP. Configuration is a snapshot swapped atomically; see [`config`].

pub mod accesslog;
pub mod admin;
pub mod authn;
pub mod body;
pub mod cli;
pub mod config;
pub mod fasthash;
pub mod h1;
pub mod h1_server;
pub mod http;
pub mod identity;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod ratelimit;
pub mod sniff;
pub mod sockets;
pub mod stats;
pub mod tags;
pub mod tcp;
pub mod trace;
pub mod xds;

pub use config::{Config, LoadEnv};
pub use proxy::{ProxyHandle, ProxyOptions, Shared, start};
