//! The server side: requests in, responses out.
//!
//! The connection is driven by the task that accepts its streams (as with the h2 crate's
//! server): each accepted request goes to a task of its own, whose response is encoded
//! into the connection's write buffer, and the accepting task writes it.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Config, Driver, Error, MAX_STREAM_ID, RecvStream, Role, SHUTDOWN_PING, SendStream, Shared,
    Shutdown, State, Stream, connection_specific, encode_fields, start, trailers, wake,
};
use crate::frame::{self, Reason};
use crate::hpack::{Field, Name, NameRef, Pseudo};

/// A server connection: accepts the requests its client sends.
pub struct Server<T> {
    driver: Driver<T>,
    shared: Arc<Shared>,
    finished: bool,
}

impl<T> std::fmt::Debug for Server<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

/// Serves HTTP/2 on `io` (the client's preface not yet read; TLS, if any, done). Nothing
/// happens until [`Server::accept`] is polled: it drives the connection.
pub fn serve<T>(io: T, config: Config) -> Server<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (shared, driver) = start(io, config, Role::Server);
    Server {
        driver,
        shared,
        finished: false,
    }
}

impl<T> Server<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// The next request and the sender for its response; `None` once the connection has
    /// ended (closed by the client, drained after a graceful shutdown, or failed).
    pub async fn accept(&mut self) -> Option<(Request<RecvStream>, SendStream)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    pub fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(Request<RecvStream>, SendStream)>> {
        loop {
            if let Some((id, req)) = self.shared.lock().accept.pop_front() {
                return Poll::Ready(Some(self.handles(id, req)));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            match self.driver.run(cx) {
                Poll::Ready(why) => {
                    self.driver.finish(why);
                    self.finished = true;
                    // Requests not yet handed out have failed with the connection.
                    self.shared.lock().accept.clear();
                }
                Poll::Pending => {
                    if self.shared.lock().accept.is_empty() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    fn handles(&self, id: u32, req: Request<()>) -> (Request<RecvStream>, SendStream) {
        let remaining = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = RecvStream {
            shared: Arc::clone(&self.shared),
            id,
            remaining,
            done: false,
        };
        let (parts, ()) = req.into_parts();
        (
            Request::from_parts(parts, body),
            SendStream {
                shared: Arc::clone(&self.shared),
                id,
            },
        )
    }

    /// Starts a graceful shutdown: the client is told to open no more streams, the
    /// streams it had opened are served, and then [`Server::accept`] returns `None`.
    pub fn graceful_shutdown(&mut self) {
        let mut st = self.shared.lock();
        if st.shutdown == Shutdown::No {
            frame::put_goaway(&mut st.out, MAX_STREAM_ID, Reason::NO_ERROR);
            frame::put_ping(&mut st.out, false, SHUTDOWN_PING);
            st.shutdown = Shutdown::Pinged;
        }
        let w = st.driver.take();
        drop(st);
        wake(w);
    }
}

impl<T> Drop for Server<T> {
    fn drop(&mut self) {
        if !self.finished {
            // Whatever is still being served fails: there is no connection to answer on.
            let mut st = self.shared.lock();
            let mut wakers = Vec::new();
            st.fail_all(Error::Closed("the server stopped".into()), &mut wakers);
            drop(st);
            for w in wakers {
                w.wake();
            }
        }
    }
}

impl SendStream {
    /// Sends the response head (a server's stream); the body, unless `end_of_stream`,
    /// follows with [`SendStream::send_data`] and [`SendStream::send_trailers`].
    pub fn send_response(&mut self, resp: Response<()>, end_of_stream: bool) -> Result<(), Error> {
        let id = self.id;
        let mut st = self.shared.lock();
        let s = st
            .streams
            .get_mut(&id)
            .ok_or(Error::Reset(Reason::CANCEL))?;
        if let Some(e) = &s.error {
            return Err(e.clone());
        }
        if s.responded || s.send_end {
            return Err(Error::Reset(Reason::STREAM_CLOSED));
        }
        s.responded = true;
        if end_of_stream {
            s.send_end = true;
        }
        let max_frame = st.peer_max_frame;
        let State {
            enc, scratch, out, ..
        } = &mut *st;
        scratch.clear();
        enc.begin(scratch);
        enc.encode(
            NameRef::Pseudo(Pseudo::Status),
            resp.status().as_str().as_bytes(),
            false,
            scratch,
        );
        encode_fields(enc, resp.headers(), connection_specific, scratch);
        frame::put_header_block(out, id, end_of_stream, scratch, max_frame);
        if end_of_stream {
            st.settle(id);
        }
        let w = st.driver.take();
        drop(st);
        wake(w);
        Ok(())
    }
}

impl<T> Driver<T> {
    /// A whole header block on a server: a new request, or a request's trailers.
    pub(super) fn request_block(
        &mut self,
        st: &mut State,
        id: u32,
        end_stream: bool,
        fields: &mut Vec<Field>,
        too_large: bool,
    ) {
        if let Some(s) = st.streams.get_mut(&id) {
            if s.error.is_some() || s.recv_end {
                return;
            }
            let outcome = if too_large {
                Err(Error::Malformed("trailers larger than allowed"))
            } else if !end_stream {
                Err(Error::Malformed("trailers without END_STREAM"))
            } else {
                trailers(fields)
            };
            match outcome {
                Ok(t) => {
                    s.trailers = Some(t);
                    s.recv_end = true;
                    self.wakers.extend(s.recv_waker.take());
                    st.settle(id);
                }
                Err(e) => {
                    self.wakers.extend(s.recv_waker.take());
                    self.wakers.extend(s.send_waker.take());
                    st.fault(id, Reason::PROTOCOL_ERROR);
                    if let Some(s) = st.streams.get_mut(&id) {
                        s.error = Some(e);
                    }
                }
            }
            return;
        }
        if id <= st.last_peer_id {
            // A stream already closed or reset here: what follows is ignored.
            return;
        }
        st.last_peer_id = id;
        let refuse = match st.shutdown {
            Shutdown::Done(last) => id > last,
            _ => false,
        } || st.open >= st.config.max_concurrent_streams as usize;
        if refuse {
            frame::put_rst(&mut st.out, id, Reason::REFUSED_STREAM);
            return;
        }
        if too_large {
            // 431 Request Header Fields Too Large (RFC 6585), as an HTTP/1.1 server would.
            let max_frame = st.peer_max_frame;
            let State {
                enc, scratch, out, ..
            } = &mut *st;
            scratch.clear();
            enc.begin(scratch);
            enc.encode(NameRef::Pseudo(Pseudo::Status), b"431", false, scratch);
            frame::put_header_block(out, id, true, scratch, max_frame);
            if !end_stream {
                frame::put_rst(out, id, Reason::NO_ERROR);
            }
            return;
        }
        let req = match request_head(fields) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("HTTP/2 request refused: {e}");
                frame::put_rst(&mut st.out, id, Reason::PROTOCOL_ERROR);
                if !st.spend() {
                    st.calm = true;
                }
                return;
            }
        };
        let stream = Stream {
            head_seen: true,
            recv_end: end_stream,
            recv_window: i64::from(st.config.stream_window),
            send_window: st.peer_initial_window,
            handles: 2,
            open: true,
            ..Stream::default()
        };
        st.streams.insert(id, stream);
        st.open += 1;
        st.accept.push_back((id, req));
    }
}

fn value_bytes(v: &HeaderValue) -> Bytes {
    Bytes::copy_from_slice(v.as_bytes())
}

/// A request head from its fields (RFC 9113 §8.3.1): pseudo-headers first, each once;
/// `:method`, `:scheme` and `:path` (only `:authority` for CONNECT); no
/// connection-specific fields; `te` only `trailers`.
fn request_head(fields: &mut Vec<Field>) -> Result<Request<()>, Error> {
    let mut method = None;
    let mut scheme = None;
    let mut authority = None;
    let mut path = None;
    let mut headers = HeaderMap::with_capacity(fields.len());
    let mut regular = false;
    for f in fields.drain(..) {
        let slot = match f.name {
            Name::Header(name) => {
                if connection_specific(&name) {
                    return Err(Error::Malformed("connection-specific header field"));
                }
                if name == header::TE && f.value != "trailers" {
                    return Err(Error::Malformed("te other than trailers"));
                }
                regular = true;
                headers.append(name, f.value);
                continue;
            }
            Name::Pseudo(Pseudo::Method) => &mut method,
            Name::Pseudo(Pseudo::Scheme) => &mut scheme,
            Name::Pseudo(Pseudo::Authority) => &mut authority,
            Name::Pseudo(Pseudo::Path) => &mut path,
            Name::Pseudo(Pseudo::Status) => {
                return Err(Error::Malformed(":status in a request"));
            }
            Name::Pseudo(Pseudo::Protocol) => {
                return Err(Error::Malformed(":protocol without extended CONNECT"));
            }
        };
        if regular || slot.is_some() {
            return Err(Error::Malformed("misplaced or repeated pseudo-header"));
        }
        *slot = Some(f.value);
    }
    let method = method.ok_or(Error::Malformed("no :method"))?;
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| Error::Malformed("invalid :method"))?;
    let authority = match authority {
        Some(a) => Some(a),
        None => headers.get(header::HOST).cloned(),
    };
    let mut parts = http::uri::Parts::default();
    if method == Method::CONNECT {
        if scheme.is_some() || path.is_some() {
            return Err(Error::Malformed(":scheme or :path in CONNECT"));
        }
        let a = authority.ok_or(Error::Malformed("CONNECT without :authority"))?;
        parts.authority = Some(
            Authority::from_maybe_shared(value_bytes(&a))
                .map_err(|_| Error::Malformed("invalid :authority"))?,
        );
    } else {
        let scheme = scheme.ok_or(Error::Malformed("no :scheme"))?;
        let path = path.ok_or(Error::Malformed("no :path"))?;
        if path.is_empty() {
            return Err(Error::Malformed("empty :path"));
        }
        parts.path_and_query = Some(
            PathAndQuery::from_maybe_shared(value_bytes(&path))
                .map_err(|_| Error::Malformed("invalid :path"))?,
        );
        if let Some(a) = authority {
            parts.scheme = Some(
                Scheme::try_from(scheme.as_bytes())
                    .map_err(|_| Error::Malformed("invalid :scheme"))?,
            );
            parts.authority = Some(
                Authority::from_maybe_shared(value_bytes(&a))
                    .map_err(|_| Error::Malformed("invalid :authority"))?,
            );
        }
    }
    let uri = Uri::from_parts(parts).map_err(|_| Error::Malformed("invalid request target"))?;
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_2;
    *req.headers_mut() = headers;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    fn field(name: &str, value: &str) -> Field {
        let name = match name {
            ":method" => Name::Pseudo(Pseudo::Method),
            ":scheme" => Name::Pseudo(Pseudo::Scheme),
            ":authority" => Name::Pseudo(Pseudo::Authority),
            ":path" => Name::Pseudo(Pseudo::Path),
            ":status" => Name::Pseudo(Pseudo::Status),
            n => Name::Header(HeaderName::from_bytes(n.as_bytes()).expect("name")),
        };
        Field {
            name,
            value: HeaderValue::from_str(value).expect("value"),
        }
    }

    #[test]
    fn request_heads_follow_rfc_9113() {
        let ok = request_head(&mut vec![
            field(":method", "GET"),
            field(":scheme", "http"),
            field(":authority", "reviews:9080"),
            field(":path", "/r?x=1"),
            field("te", "trailers"),
        ])
        .expect("valid");
        assert_eq!(ok.uri(), "http://reviews:9080/r?x=1");
        assert_eq!(ok.version(), http::Version::HTTP_2);
        let connect = request_head(&mut vec![
            field(":method", "CONNECT"),
            field(":authority", "db:5432"),
        ])
        .expect("valid CONNECT");
        assert_eq!(
            connect.uri().authority().map(|a| a.as_str()),
            Some("db:5432")
        );
        // Host stands in for a missing :authority.
        let host = request_head(&mut vec![
            field(":method", "GET"),
            field(":scheme", "http"),
            field(":path", "/"),
            field("host", "h:1"),
        ])
        .expect("valid");
        assert_eq!(host.uri(), "http://h:1/");
        for bad in [
            vec![field(":scheme", "http"), field(":path", "/")],
            vec![field(":method", "GET"), field(":path", "/")],
            vec![field(":method", "GET"), field(":scheme", "http")],
            vec![
                field(":method", "GET"),
                field(":scheme", "http"),
                field(":path", "/"),
                field(":path", "/again"),
            ],
            vec![
                field(":method", "GET"),
                field("x-a", "1"),
                field(":scheme", "http"),
                field(":path", "/"),
            ],
            vec![
                field(":method", "GET"),
                field(":scheme", "http"),
                field(":path", "/"),
                field("connection", "close"),
            ],
            vec![
                field(":method", "GET"),
                field(":scheme", "http"),
                field(":path", "/"),
                field("te", "gzip"),
            ],
            vec![
                field(":method", "GET"),
                field(":scheme", "http"),
                field(":path", "/"),
                field(":status", "200"),
            ],
            vec![field(":method", "CONNECT"), field(":path", "/")],
        ] {
            assert!(request_head(&mut bad.clone()).is_err(), "{bad:?}");
        }
    }
}
