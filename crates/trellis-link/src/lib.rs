//! The lean HTTP/2 link between two Trellis proxies.
//!
//! Between proxies, every request of every app travels over one multiplexed HTTP/2
//! connection per peer. This crate speaks both sides of that connection with as little
//! work per request as HTTP/2 allows: frames are encoded once, straight into the buffer the
//! socket is written from; HPACK indexes what repeats and copies the rest as plain
//! literals; a stream's own task sends and awaits, with one driver per connection for the
//! socket. It is standard HTTP/2 (RFC 9113, RFC 7541): the proxy also serves apps' HTTP/2
//! with it and sends to HTTP/2 apps with it, and the tests check it against the h2
//! crate's client and server.

mod conn;
pub mod frame;
pub mod hpack;
mod huffman;
mod tables;

pub use conn::client::{Client, Head, ResponseFuture, handshake};
pub use conn::server::{Server, serve};
pub use conn::{Config, Error, RecvStream, SendStream};
pub use frame::Reason;
