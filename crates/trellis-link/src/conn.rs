//! One HTTP/2 connection carrying many streams, for either side of the link.
//!
//! All of a connection's state sits behind one mutex. A stream's own task encodes its
//! HEADERS and DATA frames into the connection's write buffer and awaits what it needs; a
//! driver per connection writes that buffer to the socket, reads frames, hands each to
//! its stream and wakes the task waiting on it. There is no channel, no task and no frame
//! object per request, and frames are encoded once, straight into the buffer the socket is
//! written from. The client's driver is a task of its own; the server's runs in the task
//! that accepts its streams.
//!
//! A peer cannot make the connection hold more than it should: what waits to be written
//! is bounded (reading stops above it), header blocks are bounded, and frames that cost
//! us work but carry nothing (resets of streams we serve, empty DATA, PING, SETTINGS) are
//! budgeted: a peer that keeps sending them is told ENHANCE_YOUR_CALM and disconnected.

pub mod client;
pub mod server;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, header};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::frame::{self, Head, Reason};
use crate::hpack::{self, Field, Name, NameRef};

/// How a link connection behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// Each stream's receive window (how much of a body may arrive unread).
    pub stream_window: u32,
    /// The connection's receive window, shared by its streams.
    pub conn_window: u32,
    /// The most header bytes (RFC 9113's accounting) a message may carry. A server answers
    /// a request with more with 431.
    pub max_header_list: usize,
    /// Streams a client may open at once on a server (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// A ping is sent when this long has passed since the last one was answered…
    pub keepalive_interval: Duration,
    /// …and the connection is taken for dead when it goes unanswered this long.
    pub keepalive_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stream_window: 1 << 20,
            conn_window: 4 << 20,
            max_header_list: 64 << 10,
            max_concurrent_streams: 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Why a request on the link failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The connection is gone, or going: it takes no new streams.
    Closed(Arc<str>),
    /// The peer did not process the request (REFUSED_STREAM, or a GOAWAY below its
    /// stream): it may be sent again, on another connection.
    Refused,
    /// The stream was reset.
    Reset(Reason),
    /// The connection has as many streams open as allowed (the peer's
    /// SETTINGS_MAX_CONCURRENT_STREAMS, or the caller's limit): nothing was sent.
    Busy,
    /// The peer's message breaks HTTP/2's rules for messages (RFC 9113 §8.1.1).
    Malformed(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Closed(why) => write!(f, "HTTP/2 connection closed: {why}"),
            Error::Refused => f.write_str("the peer refused the stream before processing it"),
            Error::Reset(r) => write!(f, "stream reset: {r}"),
            Error::Busy => f.write_str("no room for another stream on the connection"),
            Error::Malformed(why) => write!(f, "malformed HTTP/2 message: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// Stream ids are small odd numbers: the identity is a good enough hash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u32(&mut self, n: u32) {
        // Mixed both ways: the table indexes by the low bits, and ids that differ only in
        // their high bits must not share them.
        let x = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 32);
    }
}

type StreamMap = HashMap<u32, Stream, BuildHasherDefault<IdHasher>>;

/// The largest stream id (ids are 31 bits).
const MAX_STREAM_ID: u32 = (1 << 31) - 1;

/// A request body's queued bytes beyond which its sender is asked to wait.
const SEND_BUFFER: usize = 64 << 10;

/// A header block being received across CONTINUATION frames may not exceed this many
/// times the header list limit (a bound on what a CONTINUATION flood can make us hold).
const BLOCK_SLACK: usize = 2;

#[derive(Default)]
struct Stream {
    /// A response head (client side), until the response future takes it.
    head: Option<http::Response<()>>,
    /// The message head arrived (a server's streams begin with it).
    head_seen: bool,
    /// A server has sent its response head.
    responded: bool,
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// END_STREAM received.
    recv_end: bool,
    error: Option<Error>,
    recv_waker: Option<Waker>,
    /// What the peer may still send on this stream.
    recv_window: i64,
    /// Received bytes passed on but not yet given back to the peer's window.
    unreleased: u32,
    send_window: i64,
    pending: VecDeque<Bytes>,
    pending_len: usize,
    pending_end: bool,
    pending_trailers: Option<HeaderMap>,
    /// END_STREAM sent (or the stream reset): nothing more goes out.
    send_end: bool,
    send_waker: Option<Waker>,
    /// The handles (response/body, sender) still alive.
    handles: u8,
    /// Counted among the connection's open streams (not yet closed both ways).
    open: bool,
}

/// Which side of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

/// A server's graceful shutdown (RFC 9113 §6.8): GOAWAY with the largest id and a PING,
/// then, once the PING is answered (every stream the client had sent is known), GOAWAY
/// with the last stream that will be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shutdown {
    No,
    Pinged,
    Done(u32),
}

/// The PING payload of a graceful shutdown.
const SHUTDOWN_PING: [u8; 8] = *b"goaway\0\0";
/// How long a connection that failed keeps reading (and dropping) after its GOAWAY.
const LINGER: Duration = Duration::from_secs(1);

/// The PING payload of keepalives.
const KEEPALIVE_PING: [u8; 8] = *b"trellis\0";

/// What may wait in the write buffer before streams stop adding data and the driver
/// stops reading (a peer that does not read cannot make us buffer without bound).
const OUT_HIGH: usize = 1 << 20;

/// Frames that cost work and carry nothing (peer resets of served streams, empty DATA,
/// PING, SETTINGS): this many at once, refilled at this many per second.
const ABUSE_BURST: f64 = 2000.0;
const ABUSE_RATE: f64 = 1000.0;

struct State {
    role: Role,
    out: BytesMut,
    driver: Option<Waker>,
    enc: hpack::Encoder,
    scratch: BytesMut,
    streams: StreamMap,
    /// Streams not yet closed both ways: what the peer's concurrency limit counts.
    open: usize,
    next_id: u32,
    peer_initial_window: i64,
    peer_max_frame: usize,
    peer_max_streams: usize,
    send_window: i64,
    recv_window: i64,
    unreleased: u32,
    /// Set once the connection takes no new streams; streams see it when it ends.
    closed: Option<Error>,
    /// Handles on the connection (a client's clones, a server's one).
    clients: usize,
    config: Config,
    /// A stream's data did not all fit in the write buffer: flush it again once written.
    starved: bool,
    /// Server: the largest stream id the client opened, and requests to hand out.
    last_peer_id: u32,
    accept: VecDeque<(u32, http::Request<()>)>,
    shutdown: Shutdown,
    /// Tokens left for frames that cost work and carry nothing, and when last refilled.
    budget: f64,
    refilled: std::time::Instant,
    /// The peer has used up the budget: the connection ends (ENHANCE_YOUR_CALM).
    calm: bool,
    /// A stream waits for the connection's send window to open.
    conn_blocked: bool,
    /// The peer's SETTINGS have arrived (until then, at most 100 streams are opened, the
    /// least RFC 9113 recommends a peer allow).
    peer_settings: bool,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Wakes the driver after the state's lock is released, when frames were queued.
fn wake(w: Option<Waker>) {
    if let Some(w) = w {
        w.wake();
    }
}

impl State {
    /// Writes what a stream has queued, as far as both windows allow; trailers or the end
    /// of the stream follow its last data.
    fn flush_stream(&mut self, id: u32) {
        let max_frame = self.peer_max_frame;
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.send_end {
            return;
        }
        while let Some(front) = s.pending.front_mut() {
            if self.out.len() >= OUT_HIGH && !front.is_empty() {
                self.starved = true;
                break;
            }
            let room = s.send_window.min(self.send_window).max(0) as usize;
            let n = room.min(front.len()).min(max_frame);
            if n == 0 && !front.is_empty() {
                if self.send_window <= 0 {
                    self.conn_blocked = true;
                }
                break;
            }
            let chunk = front.split_to(n);
            let done = front.is_empty();
            if done {
                s.pending.pop_front();
            }
            s.pending_len -= n;
            let last =
                done && s.pending.is_empty() && s.pending_end && s.pending_trailers.is_none();
            frame::put_head(
                &mut self.out,
                n,
                frame::DATA,
                if last { frame::END_STREAM } else { 0 },
                id,
            );
            self.out.extend_from_slice(&chunk);
            s.send_window -= n as i64;
            self.send_window -= n as i64;
            if last {
                s.send_end = true;
                self.finish_sending(id);
                return;
            }
        }
        if s.pending.is_empty() {
            if let Some(trailers) = s.pending_trailers.take() {
                s.send_end = true;
                self.scratch.clear();
                self.enc.begin(&mut self.scratch);
                encode_fields(
                    &mut self.enc,
                    &trailers,
                    connection_specific,
                    &mut self.scratch,
                );
                frame::put_header_block(&mut self.out, id, true, &self.scratch, max_frame);
            } else if s.pending_end {
                s.send_end = true;
                frame::put_head(&mut self.out, 0, frame::DATA, frame::END_STREAM, id);
            }
        }
        if s.pending_len < SEND_BUFFER {
            if let Some(w) = s.send_waker.take() {
                w.wake();
            }
        }
        if s.send_end {
            self.finish_sending(id);
        }
    }

    /// Writes what streams have queued, as far as the windows now allow.
    fn flush_pending(&mut self) {
        let ids: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.pending.is_empty() || s.pending_trailers.is_some())
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.flush_stream(id);
        }
    }

    /// Our side of a stream has ended. A served stream whose handles are gone but whose
    /// request is still arriving is told to stop (RST_STREAM NO_ERROR, RFC 9113 §8.1).
    fn finish_sending(&mut self, id: u32) {
        if let Some(s) = self.streams.get(&id) {
            if s.handles == 0 && !s.recv_end && s.error.is_none() {
                self.reset(id, Reason::NO_ERROR);
                return;
            }
        }
        self.settle(id);
    }

    /// Takes a token for a frame that costs work and carries nothing; `false` when the
    /// peer has used them all.
    fn spend(&mut self) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f64() * ABUSE_RATE;
        self.refilled = now;
        self.budget = (self.budget + refill).min(ABUSE_BURST) - 1.0;
        self.budget >= 0.0
    }

    /// The peer made us reset a stream (a malformed message, a flow-control breach…):
    /// that costs a token too, so that provoking resets is no cheaper than sending them.
    fn fault(&mut self, id: u32, reason: Reason) {
        if !self.spend() {
            self.calm = true;
        }
        self.reset(id, reason);
    }

    /// After a stream's state changed: once closed both ways it no longer counts as
    /// open, and once nobody holds it either it is forgotten.
    fn settle(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            let recv_done = s.recv_end || s.error.is_some();
            let send_done = s.send_end || s.error.is_some();
            if recv_done && send_done {
                if s.open {
                    s.open = false;
                    self.open -= 1;
                }
                if s.handles == 0 {
                    // Data nobody will read still counts against the connection window.
                    let unread: usize = s.data.iter().map(Bytes::len).sum();
                    self.streams.remove(&id);
                    self.release(id, unread as u32);
                }
            }
        }
    }

    /// Resets a stream from our side.
    fn reset(&mut self, id: u32, reason: Reason) {
        if let Some(s) = self.streams.get_mut(&id) {
            if s.error.is_none() && !(s.recv_end && s.send_end) {
                frame::put_rst(&mut self.out, id, reason);
            }
            s.error.get_or_insert(Error::Reset(reason));
            s.send_end = true;
            s.pending.clear();
            s.pending_len = 0;
            if let Some(w) = s.recv_waker.take() {
                w.wake();
            }
            if let Some(w) = s.send_waker.take() {
                w.wake();
            }
            self.release(id, 0);
        }
        self.settle(id);
    }

    /// Gives `n` received bytes back to the peer's windows, in updates of at least half a
    /// window.
    fn release(&mut self, id: u32, n: u32) {
        self.unreleased += n;
        if let Some(s) = self.streams.get_mut(&id) {
            s.unreleased += n;
            if !s.recv_end && s.error.is_none() && s.unreleased >= self.config.stream_window / 2 {
                frame::put_window_update(&mut self.out, id, s.unreleased);
                s.recv_window += i64::from(s.unreleased);
                s.unreleased = 0;
            }
        }
        if self.unreleased >= self.config.conn_window / 2 {
            frame::put_window_update(&mut self.out, 0, self.unreleased);
            self.recv_window += i64::from(self.unreleased);
            self.unreleased = 0;
        }
    }

    /// Ends the connection: every stream fails with `why`.
    fn fail_all(&mut self, why: Error, wakers: &mut Vec<Waker>) {
        self.closed.get_or_insert(why.clone());
        for s in self.streams.values_mut() {
            s.error.get_or_insert(why.clone());
            s.send_end = true;
            wakers.extend(s.recv_waker.take());
            wakers.extend(s.send_waker.take());
        }
    }
}

/// Releases one handle on a stream; the last one resets a stream still open.
fn drop_handle(shared: &Shared, id: u32) {
    let mut st = shared.lock();
    let server = st.role == Role::Server;
    let Some(s) = st.streams.get_mut(&id) else {
        return;
    };
    s.handles -= 1;
    if s.handles == 0 {
        let open = s.error.is_none() && !(s.recv_end && s.send_end);
        if !open {
            st.settle(id);
        } else if server && (s.pending_end || s.send_end) {
            // The response is whole, if not yet all sent: it goes out, and what is left
            // of the request is refused once it has (`finish_sending`).
            let data: usize = s.data.drain(..).map(|d| d.len()).sum();
            st.release(id, data as u32);
            if st.streams.get(&id).is_some_and(|s| s.send_end) {
                st.finish_sending(id);
            }
        } else {
            st.reset(id, Reason::CANCEL);
        }
        let w = st.driver.take();
        drop(st);
        wake(w);
    }
}

/// A response body, as it arrives. Each chunk passed on is given back to the peer's
/// flow-control window; a Content-Length is checked against what arrives.
pub struct RecvStream {
    shared: Arc<Shared>,
    id: u32,
    remaining: Option<u64>,
    done: bool,
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvStream").field("id", &self.id).finish()
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        drop_handle(&self.shared, self.id);
    }
}

impl Body for RecvStream {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        let mut st = this.shared.lock();
        let Some(s) = st.streams.get_mut(&this.id) else {
            this.done = true;
            return Poll::Ready(Some(Err(Error::Closed("stream gone".into()))));
        };
        if let Some(data) = s.data.pop_front() {
            let n = data.len();
            if let Some(r) = &mut this.remaining {
                if n as u64 > *r {
                    this.done = true;
                    st.release(this.id, n as u32);
                    st.reset(this.id, Reason::PROTOCOL_ERROR);
                    let w = st.driver.take();
                    drop(st);
                    wake(w);
                    return Poll::Ready(Some(Err(Error::Malformed(
                        "more data than its content-length",
                    ))));
                }
                *r -= n as u64;
            }
            st.release(this.id, n as u32);
            let w = if st.out.is_empty() {
                None
            } else {
                st.driver.take()
            };
            drop(st);
            wake(w);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(e) = &s.error {
            this.done = true;
            return Poll::Ready(Some(Err(e.clone())));
        }
        if s.recv_end {
            this.done = true;
            if this.remaining.is_some_and(|r| r > 0) {
                return Poll::Ready(Some(Err(Error::Malformed(
                    "less data than its content-length",
                ))));
            }
            return Poll::Ready(s.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        s.recv_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        let st = self.shared.lock();
        st.streams.get(&self.id).is_some_and(|s| {
            s.recv_end && s.data.is_empty() && s.trailers.is_none() && s.error.is_none()
        })
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Sends a request's body: data as the peer's flow control allows, then trailers or the
/// end of the stream.
pub struct SendStream {
    shared: Arc<Shared>,
    id: u32,
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendStream").field("id", &self.id).finish()
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        drop_handle(&self.shared, self.id);
    }
}

impl SendStream {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> Result<R, Error>) -> Result<R, Error> {
        let mut st = self.shared.lock();
        let r = f(&mut st);
        let w = if st.out.is_empty() {
            None
        } else {
            st.driver.take()
        };
        drop(st);
        wake(w);
        r
    }

    /// Queues `data` (sent as windows allow); `end` ends the stream after it.
    pub fn send_data(&mut self, data: Bytes, end: bool) -> Result<(), Error> {
        let id = self.id;
        self.with(|st| {
            let s = st
                .streams
                .get_mut(&id)
                .ok_or(Error::Reset(Reason::CANCEL))?;
            if let Some(e) = &s.error {
                return Err(e.clone());
            }
            if s.send_end || s.pending_end {
                return Err(Error::Reset(Reason::STREAM_CLOSED));
            }
            s.pending_len += data.len();
            if !data.is_empty() {
                s.pending.push_back(data);
            }
            s.pending_end = end;
            st.flush_stream(id);
            Ok(())
        })
    }

    /// Ends the stream with trailers, after the data queued.
    pub fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), Error> {
        let id = self.id;
        self.with(|st| {
            let s = st
                .streams
                .get_mut(&id)
                .ok_or(Error::Reset(Reason::CANCEL))?;
            if let Some(e) = &s.error {
                return Err(e.clone());
            }
            if s.send_end || s.pending_end {
                return Err(Error::Reset(Reason::STREAM_CLOSED));
            }
            s.pending_trailers = Some(trailers);
            s.pending_end = true;
            st.flush_stream(id);
            Ok(())
        })
    }

    /// Resets the stream.
    pub fn send_reset(&mut self, reason: Reason) {
        let id = self.id;
        let _ = self.with(|st| {
            st.reset(id, reason);
            Ok(())
        });
    }

    /// Ready when little enough of the body is queued to queue more; an error when the
    /// stream or the connection has failed.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(Error::Reset(Reason::CANCEL)));
        };
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        if s.pending_len < SEND_BUFFER {
            return Poll::Ready(Ok(()));
        }
        s.send_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ready with the reason when the peer resets the stream (or the connection fails).
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Reason> {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Reason::CANCEL);
        };
        match &s.error {
            Some(Error::Reset(r)) => Poll::Ready(*r),
            Some(Error::Refused) => Poll::Ready(Reason::REFUSED_STREAM),
            Some(_) => Poll::Ready(Reason::CANCEL),
            None => {
                s.send_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// A new connection's shared state and its driver, with what opens the connection (the
/// client's preface, then each side's SETTINGS and connection window) queued.
fn start<T>(io: T, config: Config, role: Role) -> (Arc<Shared>, Driver<T>) {
    let mut out = BytesMut::with_capacity(16 << 10);
    let mut settings = vec![
        (frame::SETTINGS_INITIAL_WINDOW_SIZE, config.stream_window),
        (
            frame::SETTINGS_MAX_HEADER_LIST_SIZE,
            config.max_header_list as u32,
        ),
    ];
    match role {
        Role::Client => {
            out.extend_from_slice(frame::PREFACE);
            settings.push((frame::SETTINGS_ENABLE_PUSH, 0));
        }
        Role::Server => {
            settings.push((
                frame::SETTINGS_MAX_CONCURRENT_STREAMS,
                config.max_concurrent_streams,
            ));
        }
    }
    frame::put_settings(&mut out, &settings);
    let default_window = 65_535u32;
    if config.conn_window > default_window {
        frame::put_window_update(&mut out, 0, config.conn_window - default_window);
    }
    let state = State {
        role,
        out,
        driver: None,
        enc: hpack::Encoder::default(),
        scratch: BytesMut::new(),
        streams: StreamMap::default(),
        open: 0,
        next_id: 1,
        peer_initial_window: 65_535,
        peer_max_frame: frame::DEFAULT_MAX_FRAME,
        peer_max_streams: 100,
        send_window: 65_535,
        recv_window: i64::from(config.conn_window.max(default_window)),
        unreleased: 0,
        closed: None,
        clients: 1,
        config: config.clone(),
        starved: false,
        last_peer_id: 0,
        accept: VecDeque::new(),
        shutdown: Shutdown::No,
        budget: ABUSE_BURST,
        refilled: std::time::Instant::now(),
        calm: false,
        conn_blocked: false,
        peer_settings: false,
    };
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
    });
    let driver = Driver {
        io,
        shared: Arc::clone(&shared),
        rbuf: BytesMut::with_capacity(16 << 10),
        wbuf: Bytes::new(),
        dec: hpack::Decoder::default(),
        fields: Vec::with_capacity(16),
        block: None,
        wakers: Vec::new(),
        keepalive: Box::pin(tokio::time::sleep(config.keepalive_interval)),
        ping_out: false,
        heard: false,
        role_client: role == Role::Client,
        unflushed: false,
        config,
        preface: role == Role::Server,
        closing: None,
    };
    (shared, driver)
}

/// Encodes a header map's fields into `dst` (trailers, or a head's regular fields).
fn encode_fields(
    enc: &mut hpack::Encoder,
    headers: &HeaderMap,
    skip: fn(&HeaderName) -> bool,
    dst: &mut BytesMut,
) {
    for (name, value) in headers {
        if !skip(name) {
            enc.encode(
                NameRef::Header(name),
                value.as_bytes(),
                value.is_sensitive(),
                dst,
            );
        }
    }
}

/// Header fields that are connection-specific, which HTTP/2 forbids (RFC 9113 §8.2.2).
fn connection_specific(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::CONNECTION | header::TRANSFER_ENCODING | header::UPGRADE
    ) || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// A header block being received: HEADERS then CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    bytes: BytesMut,
}

/// What owns the socket: the client's connection task, or the server's accepting task.
struct Driver<T> {
    io: T,
    shared: Arc<Shared>,
    rbuf: BytesMut,
    wbuf: Bytes,
    dec: hpack::Decoder,
    /// The fields of the header block being decoded, kept between blocks: room for a
    /// usual head (16 fields, 1.3 KiB) is then allocated once per connection, not per
    /// request (glibc's malloc is slow for blocks above 1 KiB).
    fields: Vec<hpack::Field>,
    block: Option<Block>,
    wakers: Vec<Waker>,
    keepalive: Pin<Box<tokio::time::Sleep>>,
    ping_out: bool,
    /// Frames arrived since the last ping went out.
    heard: bool,
    /// Only a client pings (servers answer; the h2 crate's server did not ping either).
    role_client: bool,
    /// Bytes were written since the last flush that completed.
    unflushed: bool,
    config: Config,
    /// A server has yet to read the client's preface.
    preface: bool,
    /// After a connection error: why, and whether our side is shut down yet. The GOAWAY
    /// that says why is written, then what the peer still sends is read and dropped for a
    /// moment, so that closing does not reset the connection before the peer reads it.
    closing: Option<(String, bool)>,
}

/// A connection error: the connection ends with GOAWAY(reason).
struct ConnError(Reason, &'static str);

impl<T> Future for Driver<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.run(cx).map(|why| this.finish(why))
    }
}

impl<T> Driver<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// The connection has ended: every stream fails.
    fn finish(&mut self, why: String) {
        tracing::debug!("HTTP/2 connection ended: {why}");
        let mut st = self.shared.lock();
        st.fail_all(Error::Closed(why.into()), &mut self.wakers);
        drop(st);
        for w in self.wakers.drain(..) {
            w.wake();
        }
    }

    /// After a connection error: writes what is queued (the GOAWAY last), shuts our side
    /// down, and drops what arrives until the peer closes or `LINGER` has passed.
    fn linger(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        let failed = |d: &mut Self| {
            Poll::Ready(
                d.closing
                    .as_mut()
                    .map(|c| std::mem::take(&mut c.0))
                    .unwrap_or_default(),
            )
        };
        loop {
            let shut = self.closing.as_ref().is_none_or(|c| c.1);
            loop {
                if self.wbuf.is_empty() {
                    let mut st = self.shared.lock();
                    if st.out.is_empty() {
                        break;
                    }
                    self.wbuf = st.out.split().freeze();
                }
                match Pin::new(&mut self.io).poll_write(cx, &self.wbuf) {
                    Poll::Ready(Ok(n)) if n > 0 => self.wbuf.advance(n),
                    Poll::Pending => break,
                    Poll::Ready(_) => return failed(self),
                }
            }
            if self.wbuf.is_empty() && !shut {
                if Pin::new(&mut self.io).poll_shutdown(cx).is_ready() {
                    if let Some(c) = &mut self.closing {
                        c.1 = true;
                    }
                }
            }
            self.rbuf.clear();
            self.rbuf.reserve(16 << 10);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Ready(Ok(n)) if n > 0 => continue,
                Poll::Ready(_) => return failed(self),
                Poll::Pending => {}
            }
            if self.keepalive.as_mut().poll(cx).is_ready() {
                return failed(self);
            }
            return Poll::Pending;
        }
    }

    /// Ends the connection in order: what is queued is written, our side shut down, and
    /// what still arrives read and dropped for a moment (see `linger`).
    fn close(&mut self, cx: &mut Context<'_>, why: String) -> Poll<String> {
        self.closing = Some((why, false));
        let at = tokio::time::Instant::now() + LINGER;
        self.keepalive.as_mut().reset(at);
        self.linger(cx)
    }

    /// The keepalive timer fired (a client's connection): a ping goes out, or, when the
    /// last one is unanswered and nothing else came either, the connection is dead.
    fn keepalive_fired(&mut self) -> Result<(), String> {
        if self.ping_out && !self.heard {
            return Err(format!(
                "no answer to a ping within {:?}",
                self.config.keepalive_timeout
            ));
        }
        let at = if self.ping_out {
            // Frames arrived meanwhile: the peer is alive, if slow to answer behind them.
            self.ping_out = false;
            tokio::time::Instant::now() + self.config.keepalive_interval
        } else {
            self.ping_out = true;
            self.heard = false;
            frame::put_ping(&mut self.shared.lock().out, false, KEEPALIVE_PING);
            tokio::time::Instant::now() + self.config.keepalive_timeout
        };
        self.keepalive.as_mut().reset(at);
        Ok(())
    }

    /// Runs until the connection ends; the reason it ended.
    fn run(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        if self.closing.is_some() {
            return self.linger(cx);
        }
        loop {
            // Write what is queued.
            loop {
                if self.wbuf.is_empty() {
                    let mut st = self.shared.lock();
                    if st.out.is_empty() {
                        break;
                    }
                    self.wbuf = st.out.split().freeze();
                }
                match Pin::new(&mut self.io).poll_write(cx, &self.wbuf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready("the socket took no bytes".into()),
                    Poll::Ready(Ok(n)) => {
                        self.wbuf.advance(n);
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(format!("write failed: {e}")),
                    Poll::Pending => break,
                }
            }
            // Flushed until done: a TLS stream may take bytes it has not sent yet.
            if self.unflushed {
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(format!("write failed: {e}")),
                    Poll::Pending => {}
                }
                let mut st = self.shared.lock();
                if st.starved && st.out.len() < OUT_HIGH {
                    st.starved = false;
                    st.flush_pending();
                }
            }
            // Keepalive (checked even while the socket is backed up: a peer that stops
            // reading is found dead all the same).
            if self.role_client && self.keepalive.as_mut().poll(cx).is_ready() {
                if let Err(why) = self.keepalive_fired() {
                    return Poll::Ready(why);
                }
                continue;
            }
            // The socket is backed up and plenty waits: read nothing more until it drains
            // (what the peer sends may only add to what waits).
            if !self.wbuf.is_empty() && self.shared.lock().out.len() >= OUT_HIGH {
                return Poll::Pending;
            }
            // Read what has arrived.
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(16 << 10);
            }
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf);
            match read {
                Poll::Ready(Ok(0)) => return Poll::Ready("closed by the peer".into()),
                Poll::Ready(Ok(_)) => {
                    if let Err(ConnError(reason, why)) = self.frames() {
                        let why = format!("{why} ({reason})");
                        let mut st = self.shared.lock();
                        let last = st.last_peer_id;
                        frame::put_goaway(&mut st.out, last, reason);
                        st.fail_all(Error::Closed(why.clone().into()), &mut self.wakers);
                        drop(st);
                        for w in self.wakers.drain(..) {
                            w.wake();
                        }
                        return self.close(cx, why);
                    }
                    for w in self.wakers.drain(..) {
                        w.wake();
                    }
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(format!("read failed: {e}")),
                Poll::Pending => {}
            }
            let mut st = self.shared.lock();
            if !st.out.is_empty() && self.wbuf.is_empty() {
                continue;
            }
            let done = match st.role {
                Role::Client if st.clients == 0 && st.streams.is_empty() => {
                    frame::put_goaway(&mut st.out, 0, Reason::NO_ERROR);
                    Some("no longer used")
                }
                Role::Client if st.closed.is_some() && st.streams.is_empty() => {
                    Some("drained after GOAWAY")
                }
                Role::Server if st.clients == 0 => Some("no longer served"),
                Role::Server if matches!(st.shutdown, Shutdown::Done(_)) && st.open == 0 => {
                    Some("drained after GOAWAY")
                }
                _ => None,
            };
            if let Some(why) = done {
                drop(st);
                return self.close(cx, why.into());
            }
            st.driver = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }

    /// Handles every whole frame in the read buffer.
    fn frames(&mut self) -> Result<(), ConnError> {
        let shared = Arc::clone(&self.shared);
        let mut st = shared.lock();
        if self.preface {
            if self.rbuf.len() < frame::PREFACE.len() {
                return Ok(());
            }
            if &self.rbuf[..frame::PREFACE.len()] != frame::PREFACE {
                return Err(ConnError(Reason::PROTOCOL_ERROR, "not an HTTP/2 preface"));
            }
            self.rbuf.advance(frame::PREFACE.len());
            self.preface = false;
        }
        while self.rbuf.len() >= 9 {
            let head = Head::parse(&self.rbuf);
            if head.len > frame::DEFAULT_MAX_FRAME {
                return Err(ConnError(
                    Reason::FRAME_SIZE_ERROR,
                    "frame larger than allowed",
                ));
            }
            if self.rbuf.len() < 9 + head.len {
                self.rbuf.reserve(9 + head.len - self.rbuf.len());
                break;
            }
            let mut payload = self.rbuf.split_to(9 + head.len).freeze();
            payload.advance(9);
            self.heard = true;
            self.frame(&mut st, head, payload)?;
            if st.calm {
                return Err(ConnError(
                    Reason::ENHANCE_YOUR_CALM,
                    "too many streams reset for errors",
                ));
            }
        }
        Ok(())
    }

    fn frame(&mut self, st: &mut State, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if let Some(b) = &self.block {
            if head.kind != frame::CONTINUATION || head.stream != b.stream {
                return Err(ConnError(
                    Reason::PROTOCOL_ERROR,
                    "a header block was interrupted",
                ));
            }
        }
        match head.kind {
            frame::DATA => self.data(st, head, payload),
            frame::HEADERS => {
                // Streams are the client's, with odd ids.
                if head.stream.is_multiple_of(2) {
                    return Err(ConnError(
                        Reason::PROTOCOL_ERROR,
                        "HEADERS on an even stream id",
                    ));
                }
                let mut p = payload;
                let pad = strip_padding(head.flags, &mut p)?;
                if head.flags & frame::PRIORITY_FLAG != 0 {
                    if p.len() < 5 {
                        return Err(ConnError(
                            Reason::FRAME_SIZE_ERROR,
                            "short HEADERS priority",
                        ));
                    }
                    p.advance(5);
                }
                let _ = pad;
                let end_stream = head.flags & frame::END_STREAM != 0;
                if head.flags & frame::END_HEADERS != 0 {
                    // The whole block in one frame (the usual case): decoded in place.
                    return self.header_block(st, head.stream, end_stream, &p);
                }
                self.block = Some(Block {
                    stream: head.stream,
                    end_stream,
                    bytes: BytesMut::from(&p[..]),
                });
                Ok(())
            }
            frame::CONTINUATION => {
                let Some(b) = &mut self.block else {
                    return Err(ConnError(
                        Reason::PROTOCOL_ERROR,
                        "CONTINUATION without HEADERS",
                    ));
                };
                b.bytes.extend_from_slice(&payload);
                if b.bytes.len()
                    > self.config.max_header_list * BLOCK_SLACK + frame::DEFAULT_MAX_FRAME
                {
                    return Err(ConnError(
                        Reason::ENHANCE_YOUR_CALM,
                        "header block too large",
                    ));
                }
                if head.flags & frame::END_HEADERS != 0 {
                    if let Some(b) = self.block.take() {
                        return self.header_block(st, b.stream, b.end_stream, &b.bytes.freeze());
                    }
                }
                Ok(())
            }
            frame::RST_STREAM => {
                if payload.len() != 4 {
                    return Err(ConnError(
                        Reason::FRAME_SIZE_ERROR,
                        "RST_STREAM of the wrong size",
                    ));
                }
                let reason = Reason(u32::from_be_bytes([
                    payload[0], payload[1], payload[2], payload[3],
                ]));
                if head.stream == 0 {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
                }
                let costly = st.role == Role::Server
                    && st.streams.get(&head.stream).is_some_and(|s| !s.responded);
                if costly && !st.spend() {
                    return Err(ConnError(
                        Reason::ENHANCE_YOUR_CALM,
                        "too many streams reset",
                    ));
                }
                if let Some(s) = st.streams.get_mut(&head.stream) {
                    let e = if reason == Reason::REFUSED_STREAM {
                        Error::Refused
                    } else {
                        Error::Reset(reason)
                    };
                    // A reset after the whole response arrived (NO_ERROR: "stop sending
                    // the request body") only ends our sending.
                    if !(s.recv_end && reason == Reason::NO_ERROR) {
                        s.error.get_or_insert(e);
                    }
                    s.send_end = true;
                    s.pending.clear();
                    s.pending_len = 0;
                    self.wakers.extend(s.recv_waker.take());
                    self.wakers.extend(s.send_waker.take());
                    st.settle(head.stream);
                }
                Ok(())
            }
            frame::SETTINGS => self.settings(st, head, &payload),
            frame::PING => {
                if payload.len() != 8 || head.stream != 0 {
                    return Err(ConnError(Reason::FRAME_SIZE_ERROR, "bad PING"));
                }
                if head.flags & frame::ACK != 0 {
                    if payload[..] == SHUTDOWN_PING && st.shutdown == Shutdown::Pinged {
                        // Every stream the client sent before our first GOAWAY has arrived.
                        st.shutdown = Shutdown::Done(st.last_peer_id);
                        frame::put_goaway(&mut st.out, st.last_peer_id, Reason::NO_ERROR);
                        st.closed
                            .get_or_insert_with(|| Error::Closed("shutting down".into()));
                    }
                    self.ping_out = false;
                    let at = tokio::time::Instant::now() + self.config.keepalive_interval;
                    self.keepalive.as_mut().reset(at);
                } else {
                    if !st.spend() {
                        return Err(ConnError(Reason::ENHANCE_YOUR_CALM, "too many PINGs"));
                    }
                    let mut p = [0u8; 8];
                    p.copy_from_slice(&payload);
                    frame::put_ping(&mut st.out, true, p);
                }
                Ok(())
            }
            frame::GOAWAY => {
                if payload.len() < 8 {
                    return Err(ConnError(Reason::FRAME_SIZE_ERROR, "short GOAWAY"));
                }
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff;
                let reason = Reason(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
                if st.role == Role::Server {
                    // A client's GOAWAY only says it opens no more streams: ours to answer
                    // go on.
                    return Ok(());
                }
                st.closed.get_or_insert_with(|| {
                    Error::Closed(format!("GOAWAY ({reason}) from the peer").into())
                });
                let ids: Vec<u32> = st.streams.keys().copied().filter(|&id| id > last).collect();
                for id in ids {
                    if let Some(s) = st.streams.get_mut(&id) {
                        s.error.get_or_insert(Error::Refused);
                        s.send_end = true;
                        self.wakers.extend(s.recv_waker.take());
                        self.wakers.extend(s.send_waker.take());
                    }
                    st.settle(id);
                }
                Ok(())
            }
            frame::WINDOW_UPDATE => {
                if payload.len() != 4 {
                    return Err(ConnError(
                        Reason::FRAME_SIZE_ERROR,
                        "WINDOW_UPDATE of the wrong size",
                    ));
                }
                let inc = i64::from(
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & 0x7fff_ffff,
                );
                if head.stream == 0 {
                    if inc == 0 {
                        return Err(ConnError(Reason::PROTOCOL_ERROR, "zero window increment"));
                    }
                    st.send_window += inc;
                    if st.send_window > frame::MAX_WINDOW {
                        return Err(ConnError(Reason::FLOW_CONTROL_ERROR, "window above 2^31-1"));
                    }
                    // Only when a stream waits for it (no scan per update otherwise).
                    if st.conn_blocked {
                        st.conn_blocked = false;
                        st.flush_pending();
                    }
                } else if let Some(s) = st.streams.get_mut(&head.stream) {
                    if inc == 0 || s.send_window + inc > frame::MAX_WINDOW {
                        let reason = if inc == 0 {
                            Reason::PROTOCOL_ERROR
                        } else {
                            Reason::FLOW_CONTROL_ERROR
                        };
                        st.fault(head.stream, reason);
                        return Ok(());
                    }
                    s.send_window += inc;
                    st.flush_stream(head.stream);
                }
                Ok(())
            }
            frame::PUSH_PROMISE => Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "PUSH_PROMISE with push disabled",
            )),
            // PRIORITY and unknown types are ignored (RFC 9113 §5.5).
            _ => Ok(()),
        }
    }

    fn data(&mut self, st: &mut State, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let flow = payload.len() as i64;
        st.recv_window -= flow;
        if st.recv_window < 0 {
            return Err(ConnError(
                Reason::FLOW_CONTROL_ERROR,
                "peer overran the connection window",
            ));
        }
        if flow == 0 && head.flags & frame::END_STREAM == 0 && !st.spend() {
            return Err(ConnError(
                Reason::ENHANCE_YOUR_CALM,
                "too many empty DATA frames",
            ));
        }
        let mut p = payload;
        strip_padding(head.flags, &mut p)?;
        let id = head.stream;
        let padding = flow as u32 - p.len() as u32;
        let Some(s) = st.streams.get_mut(&id) else {
            // A stream we no longer track: its bytes still count against the connection.
            st.release(id, flow as u32);
            return Ok(());
        };
        if s.recv_end || s.error.is_some() || !s.head_seen {
            let unexpected = !s.head_seen && s.error.is_none();
            st.release(id, flow as u32);
            if unexpected {
                st.fault(id, Reason::PROTOCOL_ERROR);
                if let Some(s) = st.streams.get_mut(&id) {
                    s.error = Some(Error::Malformed("DATA before the response head"));
                }
            }
            return Ok(());
        }
        s.recv_window -= flow;
        if s.recv_window < 0 {
            // The peer overran the stream's window: what it sent is dropped, and given back
            // to the connection's window.
            st.release(id, flow as u32);
            st.fault(id, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        if s.handles == 0 {
            // Nobody reads this stream any more.
            let n = p.len() as u32;
            if head.flags & frame::END_STREAM != 0 {
                s.recv_end = true;
            }
            st.release(id, n + padding);
            st.settle(id);
            return Ok(());
        }
        if !p.is_empty() {
            s.data.push_back(p);
        }
        if head.flags & frame::END_STREAM != 0 {
            s.recv_end = true;
        }
        self.wakers.extend(s.recv_waker.take());
        if padding > 0 || flow == 0 {
            // Padding and empty frames are nobody's data: given back at once.
            st.release(id, padding);
        }
        st.settle(id);
        Ok(())
    }

    fn settings(&mut self, st: &mut State, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.flags & frame::ACK != 0 {
            return if payload.is_empty() {
                Ok(())
            } else {
                Err(ConnError(
                    Reason::FRAME_SIZE_ERROR,
                    "SETTINGS ACK with a payload",
                ))
            };
        }
        if !payload.len().is_multiple_of(6) {
            return Err(ConnError(
                Reason::FRAME_SIZE_ERROR,
                "SETTINGS of the wrong size",
            ));
        }
        if !st.spend() {
            return Err(ConnError(Reason::ENHANCE_YOUR_CALM, "too many SETTINGS"));
        }
        // Each setting's last value in the frame is what counts: applied once each, however
        // many entries the frame repeats.
        let (mut table, mut streams, mut window, mut max_frame) = (None, None, None, None);
        for s in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match id {
                frame::SETTINGS_HEADER_TABLE_SIZE => table = Some(v),
                frame::SETTINGS_ENABLE_PUSH if v > 1 => {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "ENABLE_PUSH above 1"));
                }
                frame::SETTINGS_MAX_CONCURRENT_STREAMS => streams = Some(v),
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    if i64::from(v) > frame::MAX_WINDOW {
                        return Err(ConnError(
                            Reason::FLOW_CONTROL_ERROR,
                            "initial window above 2^31-1",
                        ));
                    }
                    window = Some(v);
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(16_384..=16_777_215).contains(&v) {
                        return Err(ConnError(
                            Reason::PROTOCOL_ERROR,
                            "MAX_FRAME_SIZE out of range",
                        ));
                    }
                    max_frame = Some(v);
                }
                _ => {}
            }
        }
        if let Some(v) = table {
            let size = (v as usize).min(hpack::DEFAULT_TABLE_SIZE);
            st.enc.set_max_size(size);
        }
        match streams {
            Some(v) => st.peer_max_streams = v as usize,
            // The first SETTINGS without a limit: there is none.
            None if !st.peer_settings => st.peer_max_streams = usize::MAX,
            None => {}
        }
        st.peer_settings = true;
        if let Some(v) = max_frame {
            st.peer_max_frame = v as usize;
        }
        if let Some(v) = window {
            let delta = i64::from(v) - st.peer_initial_window;
            st.peer_initial_window = i64::from(v);
            for s in st.streams.values_mut() {
                s.send_window += delta;
                if s.send_window > frame::MAX_WINDOW {
                    return Err(ConnError(
                        Reason::FLOW_CONTROL_ERROR,
                        "a stream window above 2^31-1",
                    ));
                }
            }
            if delta > 0 {
                st.flush_pending();
            }
        }
        frame::put_head(&mut st.out, 0, frame::SETTINGS, frame::ACK, 0);
        Ok(())
    }

    /// A whole header block: the response head, or trailers.
    fn header_block(
        &mut self,
        st: &mut State,
        id: u32,
        end_stream: bool,
        bytes: &Bytes,
    ) -> Result<(), ConnError> {
        // Decoded whatever happens to the stream: the table must stay in step.
        let mut fields = std::mem::take(&mut self.fields);
        fields.clear();
        let mut size = 0usize;
        let limit = self.config.max_header_list;
        self.dec
            .decode(bytes, |f| {
                size += f.size();
                if size <= limit {
                    fields.push(f);
                }
                Ok(())
            })
            .map_err(|_| ConnError(Reason::COMPRESSION_ERROR, "header block did not decode"))?;
        match st.role {
            Role::Client => self.response_block(st, id, end_stream, &mut fields, size > limit),
            Role::Server => self.request_block(st, id, end_stream, &mut fields, size > limit),
        }
        fields.clear();
        // A peer's huge block does not stay allocated for the connection's life.
        if fields.capacity() <= 64 {
            self.fields = fields;
        }
        Ok(())
    }
}

/// Removes a PADDED frame's padding.
fn strip_padding(flags: u8, p: &mut Bytes) -> Result<usize, ConnError> {
    if flags & frame::PADDED == 0 {
        return Ok(0);
    }
    let Some(&pad) = p.first() else {
        return Err(ConnError(
            Reason::PROTOCOL_ERROR,
            "PADDED frame without a length",
        ));
    };
    let pad = usize::from(pad);
    if pad + 1 > p.len() {
        return Err(ConnError(
            Reason::PROTOCOL_ERROR,
            "padding longer than the frame",
        ));
    }
    p.advance(1);
    p.truncate(p.len() - pad);
    Ok(pad)
}

fn trailers(fields: &mut Vec<Field>) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields.drain(..) {
        match f.name {
            Name::Pseudo(_) => return Err(Error::Malformed("pseudo-header in trailers")),
            Name::Header(name) => {
                map.append(name, f.value);
            }
        }
    }
    Ok(map)
}
