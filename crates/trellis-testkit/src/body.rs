//! A body fed from a channel: streaming gRPC messages, chunked HTTP/1.1 request bodies.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

/// An HTTP body whose frames (data, then optionally trailers) come from a channel.
///
/// It never reports a length, so an HTTP/1.1 request carrying it is sent with
/// `Transfer-Encoding: chunked`. The body ends when every sender is dropped.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
}

/// A connected pair: the sender to push frames into and the body that yields them.
pub fn channel_body(capacity: usize) -> (mpsc::Sender<Frame<Bytes>>, ChannelBody) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (tx, ChannelBody { rx })
}

/// A body that yields `chunks` as separate data frames with no declared length (chunked on
/// HTTP/1.1).
pub fn chunked_body(chunks: Vec<Bytes>) -> ChannelBody {
    let (tx, body) = channel_body(chunks.len());
    for chunk in chunks {
        // Capacity equals the number of chunks, so try_send cannot find the channel full.
        let _ = tx.try_send(Frame::data(chunk));
    }
    body
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}
