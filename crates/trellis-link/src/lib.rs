//! The lean HTTP/2 link between two Trellis proxies.
//!
//! Between proxies, every request of every app travels over one multiplexed HTTP/2
//! connection per peer. This crate speaks that connection's client side with as little
//! work per request as HTTP/2 allows: frames are encoded once, straight into the buffer the
//! socket is written from; HPACK indexes what repeats and copies the rest as plain
//! literals; a request's own task sends and awaits, with one driver task per connection
//! for the socket. It is standard HTTP/2 (RFC 9113, RFC 7541): any HTTP/2 server can
//! answer it, and the tests check it against the h2 crate's server.

mod client;
pub mod frame;
pub mod hpack;
mod huffman;
mod tables;

pub use client::{Client, Config, Error, RecvStream, ResponseFuture, SendStream, handshake};
pub use frame::Reason;
