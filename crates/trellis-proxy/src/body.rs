//! The body of responses the proxy sends downstream: streamed from upstream, or generated
//! by the proxy itself (errors, admin).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::h1::H1Body;
use crate::pool::{BoxError, PooledBody};

#[derive(Debug)]
pub enum ProxyBody {
    /// A body the proxy made (one chunk, possibly empty).
    Full(Option<Bytes>),
    /// Streamed from an HTTP/2 upstream (or an upgrade response).
    Upstream(Incoming),
    /// Streamed from a pooled HTTP/1.1 upstream connection (hyper's client).
    Pooled(PooledBody),
    /// Streamed from a pooled HTTP/1.1 upstream connection (the lean client).
    Fast(H1Body),
    /// Streamed from an HTTP/2 upstream connection.
    H2(trellis_link::RecvStream),
    /// A response whose metrics and access log line wait for its last byte.
    Observed(Box<Observed>),
}

/// A response body watched to its end: its bytes are counted, a gRPC status in its
/// trailers is noted, and when it ends (or is dropped, the client having gone) the
/// request is recorded.
#[derive(Debug)]
pub struct Observed {
    pub inner: ProxyBody,
    pub completion: Option<crate::http::Completion>,
    pub sent: u64,
}

/// How a watched response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Sent whole.
    Complete,
    /// The client went away first (Envoy's DC).
    Downstream,
    /// The upstream failed in the middle of the body (Envoy's UC).
    Upstream,
}

impl Observed {
    fn finish(&mut self, how: Ended) {
        if let Some(c) = self.completion.take() {
            c.finish(self.sent, how);
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let how = if self.inner.is_end_stream() {
            Ended::Complete
        } else {
            Ended::Downstream
        };
        self.finish(how);
    }
}

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }

    pub fn text(s: impl Into<Bytes>) -> ProxyBody {
        let b = s.into();
        ProxyBody::Full((!b.is_empty()).then_some(b))
    }
}

fn boxed<E: Into<BoxError>>(
    p: Poll<Option<Result<Frame<Bytes>, E>>>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    p.map(|o| o.map(|r| r.map_err(Into::into)))
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::Pooled(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::Fast(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::H2(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::Observed(o) => {
                let polled = Pin::new(&mut o.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            o.sent += d.len() as u64;
                        } else if let (Some(t), Some(c)) = (frame.trailers_ref(), &mut o.completion)
                        {
                            c.trailers(t);
                        }
                        if o.inner.is_end_stream() {
                            o.finish(Ended::Complete);
                        }
                    }
                    Poll::Ready(None) => o.finish(Ended::Complete),
                    Poll::Ready(Some(Err(_))) => o.finish(Ended::Upstream),
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Pooled(b) => b.is_end_stream(),
            ProxyBody::Fast(b) => b.is_end_stream(),
            ProxyBody::H2(b) => b.is_end_stream(),
            ProxyBody::Observed(o) => o.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Pooled(b) => b.size_hint(),
            ProxyBody::Fast(b) => b.size_hint(),
            ProxyBody::H2(b) => b.size_hint(),
            ProxyBody::Observed(o) => o.inner.size_hint(),
        }
    }
}

/// The body of requests the proxy sends upstream: streamed from the client, or buffered
/// (so that a retry can send it again).
#[derive(Debug)]
pub enum ReqBody {
    Streaming(Streaming),
    Buffered(Option<Bytes>),
}

/// A request body as it arrives from the client: from hyper's HTTP/1 server, or from an
/// HTTP/2 stream.
#[derive(Debug)]
pub enum Streaming {
    Hyper(Incoming),
    H2(trellis_link::RecvStream),
}

impl Body for Streaming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Streaming::Hyper(b) => boxed(Pin::new(b).poll_frame(cx)),
            Streaming::H2(b) => boxed(Pin::new(b).poll_frame(cx)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Streaming::Hyper(b) => b.is_end_stream(),
            Streaming::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Streaming::Hyper(b) => b.size_hint(),
            Streaming::H2(b) => b.size_hint(),
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Streaming(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Buffered(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Streaming(b) => b.is_end_stream(),
            ReqBody::Buffered(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Streaming(b) => b.size_hint(),
            ReqBody::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
