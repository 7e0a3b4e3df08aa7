//! The client side: requests out, responses in.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, Request, Response, StatusCode, header};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Config, Driver, Error, MAX_STREAM_ID, RecvStream, Role, SendStream, Shared, State, Stream,
    connection_specific, drop_handle, start, trailers, wake,
};
use crate::frame::{self, Reason};
use crate::hpack::{Field, Name, NameRef, Pseudo};

/// A handle on a link connection; clones share it. The connection closes when the last
/// handle and the last stream are gone.
/// A request head, borrowed: what [`Client::send_head`] encodes.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub headers: &'a HeaderMap,
}

impl<'a> From<&'a http::request::Parts> for Head<'a> {
    fn from(p: &'a http::request::Parts) -> Head<'a> {
        Head {
            method: &p.method,
            uri: &p.uri,
            headers: &p.headers,
        }
    }
}

pub struct Client {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Clone for Client {
    fn clone(&self) -> Self {
        self.shared.lock().clients += 1;
        Client {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.clients -= 1;
        let w = if st.clients == 0 {
            st.driver.take()
        } else {
            None
        };
        drop(st);
        wake(w);
    }
}

/// Starts a connection on `io` (already connected, TLS done): queues the preface and
/// settings and spawns the task that drives the connection.
pub fn handshake<T>(io: T, config: Config) -> Client
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (shared, driver) = start(io, config, Role::Client);
    tokio::spawn(driver);
    Client { shared }
}

/// Pseudo and connection-specific fields that never travel as regular HTTP/2 headers.
fn skip_request_header(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::HOST
            | header::CONNECTION
            | header::TRANSFER_ENCODING
            | header::UPGRADE
            | header::TE
    ) || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Whether the connection takes one more stream: open, with stream ids left, and fewer
/// than `max` (and the peer's limit) open.
fn room(st: &State, max: Option<usize>) -> Result<(), Error> {
    if let Some(e) = &st.closed {
        return Err(e.clone());
    }
    if st.next_id > MAX_STREAM_ID {
        return Err(Error::Closed("out of stream ids".into()));
    }
    if st.open >= st.peer_max_streams.min(max.unwrap_or(usize::MAX)) {
        return Err(Error::Busy);
    }
    Ok(())
}

impl Client {
    /// The connection takes no new streams (closed, closing, or out of stream ids).
    pub fn is_closed(&self) -> bool {
        let st = self.shared.lock();
        st.closed.is_some() || st.next_id > MAX_STREAM_ID
    }

    /// Streams open now (not yet closed both ways).
    pub fn streams(&self) -> usize {
        self.shared.lock().open
    }

    /// Whether one more stream fits: the peer's SETTINGS_MAX_CONCURRENT_STREAMS and
    /// `max` (a DestinationRule's limit), if any.
    pub fn has_room(&self, max: Option<usize>) -> bool {
        room(&self.shared.lock(), max).is_ok()
    }

    /// Sends a request's head; the body, unless `end_of_stream`, follows on the returned
    /// sender. Fails at once, having sent nothing, when the connection takes no new
    /// streams ([`Error::Closed`]) or has `max_streams` (or the peer's limit) open
    /// ([`Error::Busy`]).
    pub fn send_request(
        &self,
        head: &Request<()>,
        end_of_stream: bool,
        max_streams: Option<usize>,
    ) -> Result<(ResponseFuture, SendStream), Error> {
        self.send_head(
            Head {
                method: head.method(),
                uri: head.uri(),
                headers: head.headers(),
            },
            end_of_stream,
            max_streams,
        )
    }

    /// [`Client::send_request`] from a borrowed head (a proxy sends the head it holds,
    /// without copying it into a `Request` first).
    pub fn send_head(
        &self,
        head: Head<'_>,
        end_of_stream: bool,
        max_streams: Option<usize>,
    ) -> Result<(ResponseFuture, SendStream), Error> {
        let uri = head.uri;
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| head.headers.get(header::HOST).and_then(|h| h.to_str().ok()));
        let scheme = uri.scheme_str().unwrap_or("http");
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut st = self.shared.lock();
        room(&st, max_streams)?;
        let id = st.next_id;
        st.next_id += 2;
        let State { enc, scratch, .. } = &mut *st;
        scratch.clear();
        enc.begin(scratch);
        enc.encode(
            NameRef::Pseudo(Pseudo::Method),
            head.method.as_str().as_bytes(),
            false,
            scratch,
        );
        enc.encode(
            NameRef::Pseudo(Pseudo::Scheme),
            scheme.as_bytes(),
            false,
            scratch,
        );
        if let Some(a) = authority {
            enc.encode(
                NameRef::Pseudo(Pseudo::Authority),
                a.as_bytes(),
                false,
                scratch,
            );
        }
        enc.encode(
            NameRef::Pseudo(Pseudo::Path),
            path.as_bytes(),
            false,
            scratch,
        );
        for (name, value) in head.headers {
            if skip_request_header(name) {
                if name == header::TE && value.as_bytes().eq_ignore_ascii_case(b"trailers") {
                    enc.encode(NameRef::Header(name), b"trailers", false, scratch);
                }
                continue;
            }
            enc.encode(
                NameRef::Header(name),
                value.as_bytes(),
                value.is_sensitive(),
                scratch,
            );
        }
        let max_frame = st.peer_max_frame;
        let State { out, scratch, .. } = &mut *st;
        frame::put_header_block(out, id, end_of_stream, scratch, max_frame);
        let stream = Stream {
            recv_window: i64::from(st.config.stream_window),
            send_window: st.peer_initial_window,
            send_end: end_of_stream,
            handles: 2,
            open: true,
            ..Stream::default()
        };
        st.streams.insert(id, stream);
        st.open += 1;
        let w = st.driver.take();
        drop(st);
        wake(w);
        Ok((
            ResponseFuture {
                shared: Arc::clone(&self.shared),
                id,
                done: false,
                head_request: head.method == http::Method::HEAD,
            },
            SendStream {
                shared: Arc::clone(&self.shared),
                id,
            },
        ))
    }
}

/// The response to a request.
pub struct ResponseFuture {
    shared: Arc<Shared>,
    id: u32,
    done: bool,
    /// The request was HEAD: a Content-Length describes a body that is not sent.
    head_request: bool,
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("id", &self.id)
            .finish()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<RecvStream>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(Error::Closed("stream gone".into())));
        };
        if let Some(head) = s.head.take() {
            drop(st);
            // HEAD, 204 and 304 responses have no body, whatever their Content-Length says.
            let bodiless = self.head_request
                || matches!(
                    head.status(),
                    StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
                );
            let remaining = head
                .headers()
                .get(header::CONTENT_LENGTH)
                .filter(|_| !bodiless)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            self.done = true;
            let (parts, ()) = head.into_parts();
            return Poll::Ready(Ok(Response::from_parts(
                parts,
                RecvStream {
                    shared: Arc::clone(&self.shared),
                    id: self.id,
                    remaining,
                    done: false,
                },
            )));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        s.recv_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        // Once the response is out, its body holds the handle instead.
        if !self.done {
            drop_handle(&self.shared, self.id);
        }
    }
}

/// A response head from its fields; `None` for an informational (1xx) response, which is
/// skipped.
fn response_head(fields: &mut Vec<Field>) -> Result<Option<Response<()>>, Error> {
    let mut status: Option<StatusCode> = None;
    let mut headers = HeaderMap::with_capacity(fields.len());
    let mut regular = false;
    for f in fields.drain(..) {
        match f.name {
            Name::Pseudo(Pseudo::Status) => {
                if regular || status.is_some() {
                    return Err(Error::Malformed("misplaced or repeated :status"));
                }
                status = Some(
                    StatusCode::from_bytes(f.value.as_bytes())
                        .map_err(|_| Error::Malformed("invalid :status"))?,
                );
            }
            Name::Pseudo(_) => return Err(Error::Malformed("request pseudo-header in a response")),
            Name::Header(name) => {
                if connection_specific(&name) {
                    return Err(Error::Malformed("connection-specific header field"));
                }
                regular = true;
                headers.append(name, f.value);
            }
        }
    }
    let status = status.ok_or(Error::Malformed("no :status"))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::Malformed("101 is not allowed in HTTP/2"));
        }
        return Ok(None);
    }
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = http::Version::HTTP_2;
    *resp.headers_mut() = headers;
    Ok(Some(resp))
}

impl<T> Driver<T> {
    /// A whole header block on a client stream: the response head, or trailers.
    pub(super) fn response_block(
        &mut self,
        st: &mut State,
        id: u32,
        end_stream: bool,
        fields: &mut Vec<Field>,
        too_large: bool,
    ) {
        let Some(s) = st.streams.get_mut(&id) else {
            return;
        };
        if s.error.is_some() || s.recv_end {
            return;
        }
        let outcome = if too_large {
            Err(Error::Malformed("response headers larger than allowed"))
        } else if !s.head_seen {
            response_head(fields).map(|head| {
                if let Some(head) = head {
                    s.head_seen = true;
                    s.head = Some(head);
                }
            })
        } else if !end_stream {
            Err(Error::Malformed("trailers without END_STREAM"))
        } else {
            trailers(fields).map(|t| s.trailers = Some(t))
        };
        match outcome {
            Ok(()) => {
                if end_stream {
                    if !s.head_seen {
                        s.error = Some(Error::Malformed("END_STREAM on an informational response"));
                    }
                    s.recv_end = true;
                }
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
    }
}
