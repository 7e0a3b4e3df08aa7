//! The one error type of the fixtures' clients and constructors.

use std::time::Duration;

/// What went wrong while starting a fixture or talking to one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding, connecting, reading or writing a socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// hyper failed (handshake, request, body).
    #[error("http: {0}")]
    Hyper(#[from] hyper::Error),
    /// A request could not be built (bad URI or header).
    #[error("building request: {0}")]
    Http(#[from] http::Error),
    /// The WebSocket handshake or a frame failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// The peer broke the protocol (bad gRPC framing, a missing echo, an early close).
    #[error("protocol: {0}")]
    Protocol(String),
    /// A bounded wait inside a client helper ran out.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Error::WebSocket(Box::new(e))
    }
}
