//! Test fixtures for Trellis: the upstream apps and clients that the proxy's in-process tests
//! and benchmarks talk to.
//!
//! Every server binds `127.0.0.1:0` (or an address it is given), runs as a tokio task and
//! returns a handle with its `addr`. Dropping the handle stops the server and closes its open
//! connections; `shutdown()` does the same and waits until the task is gone. Handles expose
//! counters (connections accepted, requests served, HTTP versions seen, EOFs seen) so tests can
//! check what actually reached the upstream.
//!
//! | server | protocol |
//! | --- | --- |
//! | [`HttpServer`] | HTTP/1.1 and h2c (prior knowledge) on one port, or HTTP/1.1 only |
//! | [`GrpcServer`] | gRPC over h2c, hand-written framing (no tonic) |
//! | [`WsEchoServer`] | WebSocket echo over the HTTP/1.1 Upgrade |
//! | [`TcpEchoServer`] | raw TCP echo that honours half-close |
//! | [`BannerServer`] | server-first TCP (writes a banner on accept, then echoes lines) |
//!
//! Clients: [`http_client`], [`grpc_call`], [`grpc_call_pingpong`], [`ws_echo`],
//! [`tcp_echo_half_close`].

#![forbid(unsafe_code)]

mod body;
mod error;
pub mod grpc;
pub mod http_client;
pub mod http_server;
mod server;
pub mod tcp;
pub mod tls;
pub mod ws;

pub use body::{ChannelBody, channel_body, chunked_body};
pub use error::Error;
pub use grpc::{
    GrpcResponse, GrpcServer, GrpcStats, grpc_call, grpc_call_pingpong, grpc_call_pingpong_with,
    grpc_call_with_authority,
};
pub use http_server::{HttpServer, HttpStats};
pub use tcp::{BannerServer, RefusedPort, TcpEchoServer, TcpStats, tcp_echo_half_close};
pub use ws::{WsEchoServer, WsStats, ws_echo};

/// Re-exported so callers of [`ws_echo`] need not depend on tungstenite themselves.
pub use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The result type of every fallible fixture call.
pub type Result<T, E = Error> = std::result::Result<T, E>;
