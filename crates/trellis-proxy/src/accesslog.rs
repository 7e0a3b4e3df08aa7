//! Access logs: a line per HTTP request (and per TCP connection), in Envoy's text format
//! or as JSON, to a file or stdout, chosen by the workload's Telemetry.
//!
//! What a Telemetry's `accessLogging` selects arrives in the snapshot (`Workload.telemetry`:
//! the entries with their side, filter and providers). Each provider is a sink: the built-in
//! `envoy` (the mesh config's `accessLogFile`, `accessLogEncoding`, `accessLogFormat`) or an
//! `envoyFileAccessLog` extension provider (a path, and a text format or JSON labels).
//! Formats use Envoy's command operators (`%REQ(:METHOD)%`, `%RESPONSE_CODE%`…); an
//! operator Trellis does not know prints `-`.
//!
//! Lines are formatted on the request's task and appended to the queue of one writer
//! thread per file, written every 200 ms: a slow disk never holds a request up, and
//! queuing a line wakes nobody. A line that finds the queues full (32 MiB) is dropped and
//! counted (`trellis_proxy_access_log_dropped_total`). A file rotated away (renamed or
//! removed, as logrotate does) is reopened at its path on the next write.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, Method, Version};
use trellis_xds::snapshot as wire;

/// Istio's default text format (`accessLogFormat` unset), Envoy's operators.
pub const DEFAULT_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%";

/// Istio's default JSON keys (`accessLogEncoding: JSON`), and Trellis's additions: who
/// called whom, the trace and the policy that decided.
const DEFAULT_JSON: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("route_name", "%ROUTE_NAME%"),
    ("trace_id", "%TRACE_ID%"),
    ("source_workload", "%TRELLIS_SOURCE_WORKLOAD%"),
    ("source_principal", "%TRELLIS_SOURCE_PRINCIPAL%"),
    ("destination_workload", "%TRELLIS_DESTINATION_WORKLOAD%"),
    ("destination_principal", "%TRELLIS_DESTINATION_PRINCIPAL%"),
    ("authorization_policy", "%TRELLIS_AUTHORIZATION_POLICY%"),
];

/// One of Envoy's command operators (those Trellis knows).
#[derive(Clone, Debug, PartialEq)]
enum Op {
    StartTime,
    Method,
    Path,
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    Authority,
    UpstreamHost,
    UpstreamCluster,
    DownstreamLocalAddress,
    DownstreamRemoteAddress,
    RequestedServerName,
    RouteName,
    TraceId,
    SourceWorkload,
    SourcePrincipal,
    DestinationWorkload,
    DestinationPrincipal,
    AuthorizationPolicy,
    /// A request header (the first name present of the alternatives), at most `max` bytes.
    Req(Vec<HeaderName>, Option<usize>),
    Resp(Vec<HeaderName>, Option<usize>),
    /// Known to Envoy, with nothing to say here (or not known at all): `-`.
    Dash,
}

#[derive(Clone, Debug, PartialEq)]
enum Piece {
    Text(String),
    Op(Op),
}

/// A compiled format string.
fn parse_format(s: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        text.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(j) = after.find('%') else {
            text.push_str(&rest[i..]);
            rest = "";
            break;
        };
        let name = &after[..j];
        if name.is_empty() {
            // `%%` is a literal percent sign.
            text.push('%');
        } else {
            if !text.is_empty() {
                out.push(Piece::Text(std::mem::take(&mut text)));
            }
            out.push(Piece::Op(operator(name)));
        }
        rest = &after[j + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    out
}

fn operator(name: &str) -> Op {
    let headers = |args: &str| -> (Vec<HeaderName>, Option<usize>) {
        // `REQ(A?B):N`: header A, else B, at most N bytes.
        let (inner, max) = match args.rsplit_once("):") {
            Some((inner, n)) => (inner, n.parse().ok()),
            None => (args.strip_suffix(')').unwrap_or(args), None),
        };
        let names = inner
            .split('?')
            .filter_map(|n| {
                let n = n.to_ascii_lowercase();
                let n = match n.as_str() {
                    ":path" => "x-trellis-pseudo-path",
                    ":method" => "x-trellis-pseudo-method",
                    ":authority" => "host",
                    other => other,
                };
                HeaderName::from_bytes(n.as_bytes()).ok()
            })
            .collect();
        (names, max)
    };
    if let Some(args) = name.strip_prefix("REQ(") {
        let (names, max) = headers(args);
        return match names.first().map(HeaderName::as_str) {
            Some("x-trellis-pseudo-method") => Op::Method,
            Some("host") if names.len() == 1 => Op::Authority,
            _ if names.iter().any(|n| n == "x-trellis-pseudo-path") => Op::Path,
            _ => Op::Req(names, max),
        };
    }
    if let Some(args) = name.strip_prefix("RESP(") {
        let (names, max) = headers(args);
        return Op::Resp(names, max);
    }
    match name {
        "START_TIME" => Op::StartTime,
        "PROTOCOL" => Op::Protocol,
        "RESPONSE_CODE" => Op::ResponseCode,
        "RESPONSE_FLAGS" => Op::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Op::ResponseCodeDetails,
        "BYTES_RECEIVED" => Op::BytesReceived,
        "BYTES_SENT" => Op::BytesSent,
        "DURATION" => Op::Duration,
        "UPSTREAM_HOST" => Op::UpstreamHost,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Op::UpstreamCluster,
        "DOWNSTREAM_LOCAL_ADDRESS" => Op::DownstreamLocalAddress,
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_PEER_ADDRESS" => Op::DownstreamRemoteAddress,
        "REQUESTED_SERVER_NAME" => Op::RequestedServerName,
        "ROUTE_NAME" => Op::RouteName,
        "TRACE_ID" => Op::TraceId,
        "TRELLIS_SOURCE_WORKLOAD" => Op::SourceWorkload,
        "TRELLIS_SOURCE_PRINCIPAL" | "DOWNSTREAM_PEER_URI_SAN" => Op::SourcePrincipal,
        "TRELLIS_DESTINATION_WORKLOAD" => Op::DestinationWorkload,
        "TRELLIS_DESTINATION_PRINCIPAL" | "UPSTREAM_PEER_URI_SAN" => Op::DestinationPrincipal,
        "TRELLIS_AUTHORIZATION_POLICY" => Op::AuthorizationPolicy,
        _ => Op::Dash,
    }
}

/// Everything a line can say about a request.
#[derive(Debug)]
pub struct Record<'a> {
    pub start: SystemTime,
    /// `None` for a TCP connection (as the protocol).
    pub method: Option<&'a Method>,
    /// Path and query.
    pub path: &'a str,
    pub version: Option<Version>,
    pub authority: &'a str,
    /// The request headers the formats and filters read (see [`AccessLog::request_headers`]).
    pub request_headers: &'a Headers,
    pub response_headers: Option<&'a Headers>,
    pub code: u16,
    pub flags: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: &'a str,
    pub downstream_local: Option<SocketAddr>,
    pub downstream_remote: SocketAddr,
    pub sni: Option<&'a str>,
    pub route_name: &'a str,
    pub parties: Parties<'a>,
    pub authorization_policy: &'a str,
}

/// The workloads at the two ends of a request or connection, as a line names them.
#[derive(Debug, Clone, Copy)]
pub struct Parties<'a> {
    pub source_workload: &'a str,
    pub source_principal: &'a str,
    pub destination_workload: &'a str,
    pub destination_principal: &'a str,
}

impl<'a> Parties<'a> {
    /// From the metric labels of both ends. Inbound, the source principal is the one the
    /// caller's mTLS handshake proved, when there was one (the labels may not know it).
    pub fn of(
        source: &'a crate::metrics::WorkloadMeta,
        destination: &'a crate::metrics::WorkloadMeta,
        inbound: bool,
        peer_id: Option<&'a str>,
    ) -> Parties<'a> {
        Parties {
            source_workload: &source.workload,
            source_principal: match (inbound, peer_id) {
                (true, Some(id)) => id,
                _ => &source.principal,
            },
            destination_workload: &destination.workload,
            destination_principal: &destination.principal,
        }
    }
}

/// No headers: what a TCP connection's line has.
static NO_HEADERS: Headers = Vec::new();

impl<'a> Record<'a> {
    /// The line of a TCP connection, as Envoy's TCP proxy logs it: no method, path, status
    /// or headers; the bytes each way and how long it lasted.
    pub fn connection(
        start: SystemTime,
        flags: &'a str,
        (bytes_received, bytes_sent): (u64, u64),
        upstream: (SocketAddr, &'a str),
        downstream_remote: SocketAddr,
        parties: Parties<'a>,
    ) -> Record<'a> {
        Record {
            start,
            method: None,
            path: "",
            version: None,
            authority: "",
            request_headers: &NO_HEADERS,
            response_headers: None,
            code: 0,
            flags,
            bytes_received,
            bytes_sent,
            duration: start.elapsed().unwrap_or_default(),
            upstream_host: Some(upstream.0),
            upstream_cluster: upstream.1,
            downstream_local: None,
            downstream_remote,
            sni: None,
            route_name: "",
            parties,
            authorization_policy: "",
        }
    }
}

/// The few headers a line needs of a message: a list, not a map (a handful of entries,
/// found by comparing names).
pub type Headers = Vec<(HeaderName, http::HeaderValue)>;

fn find<'a>(h: &'a Headers, name: &str) -> Option<&'a http::HeaderValue> {
    h.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// The trace id of a request, from W3C `traceparent` or B3.
fn trace_id(h: &Headers) -> Option<&str> {
    let text = |n: &str| find(h, n).and_then(|v| v.to_str().ok());
    if let Some(tp) = text("traceparent") {
        return tp.split('-').nth(1);
    }
    if let Some(id) = text("x-b3-traceid") {
        return Some(id);
    }
    text("b3").and_then(|b3| b3.split('-').next())
}

fn header<'a>(h: Option<&'a Headers>, names: &[HeaderName], max: Option<usize>) -> Option<&'a str> {
    let h = h?;
    let v = names
        .iter()
        .find_map(|n| find(h, n.as_str()))?
        .to_str()
        .ok()?;
    Some(match max {
        Some(m) if v.len() > m => &v[..floor_char(v, m)],
        _ => v,
    })
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// An RFC 3339 UTC time with milliseconds, as Envoy prints `%START_TIME%`.
fn rfc3339(t: SystemTime, out: &mut String) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    // Lines of the same second share their first twenty bytes: made once a second.
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 20])> = const { std::cell::Cell::new((u64::MAX, [0; 20])) };
    }
    let (cached, prefix) = SECOND.get();
    if cached == secs {
        if let Ok(p) = std::str::from_utf8(&prefix) {
            out.push_str(p);
            push_millis(out, d.subsec_millis());
            return;
        }
    }
    let from = out.len();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = crate::h1_server::date::civil(days);
    // Fixed-width fields, without `fmt` (every line has one).
    let mut field = |n: u64, width: usize, sep: Option<char>| {
        let mut buf = [b'0'; 4];
        let mut n = n;
        for i in (0..width).rev() {
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out.push_str(std::str::from_utf8(&buf[..width]).unwrap_or("0"));
        if let Some(c) = sep {
            out.push(c);
        }
    };
    field(u64::try_from(year).unwrap_or(0), 4, Some('-'));
    field(u64::try_from(month).unwrap_or(0), 2, Some('-'));
    field(u64::try_from(day).unwrap_or(0), 2, Some('T'));
    field(rem / 3600, 2, Some(':'));
    field(rem % 3600 / 60, 2, Some(':'));
    field(rem % 60, 2, Some('.'));
    if let Ok(p) = <[u8; 20]>::try_from(&out.as_bytes()[from..]) {
        SECOND.set((secs, p));
    }
    push_millis(out, d.subsec_millis());
}

/// `mmmZ`: the milliseconds of a time, three digits.
fn push_millis(out: &mut String, ms: u32) {
    let digits = [
        b'0' + (ms / 100 % 10) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ];
    out.push_str(std::str::from_utf8(&digits).unwrap_or("000Z"));
}

/// Appends a number (without `fmt`'s machinery: lines have several).
fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

fn push_addr(out: &mut String, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            for (i, o) in v4.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, u64::from(*o));
            }
            out.push(':');
            push_u64(out, u64::from(v4.port()));
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// What an operator says about a record; `None` prints `-` (text) or `null` (JSON).
fn value(op: &Op, r: &Record<'_>, out: &mut String) -> bool {
    let s: Option<&str> = match op {
        Op::StartTime => {
            rfc3339(r.start, out);
            return true;
        }
        Op::ResponseCode => {
            push_u64(out, u64::from(r.code));
            return true;
        }
        Op::BytesReceived => {
            push_u64(out, r.bytes_received);
            return true;
        }
        Op::BytesSent => {
            push_u64(out, r.bytes_sent);
            return true;
        }
        Op::Duration => {
            push_u64(
                out,
                u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX),
            );
            return true;
        }
        Op::UpstreamHost => {
            let Some(a) = r.upstream_host else {
                return false;
            };
            push_addr(out, a);
            return true;
        }
        Op::DownstreamLocalAddress => {
            let Some(a) = r.downstream_local else {
                return false;
            };
            push_addr(out, a);
            return true;
        }
        Op::DownstreamRemoteAddress => {
            push_addr(out, r.downstream_remote);
            return true;
        }
        Op::Method => r.method.map(Method::as_str),
        Op::Path => Some(r.path),
        Op::Protocol => r.version.map(protocol),
        Op::ResponseFlags => Some(r.flags),
        Op::ResponseCodeDetails if !r.authorization_policy.is_empty() => {
            // Envoy's words for a denial by a named policy.
            let _ = write!(
                out,
                "rbac_access_denied_matched_policy[{}]",
                r.authorization_policy
            );
            return true;
        }
        Op::ResponseCodeDetails => Some(match r.flags {
            "-" => "via_upstream",
            "FI" => "fault_filter_abort",
            "UF" => "upstream_reset_before_response_started{connection_failure}",
            "UT" => "response_timeout",
            "NR" => "route_not_found",
            "RL" => "local_rate_limited",
            "UO" => "upstream_overflow",
            "UH" => "no_healthy_upstream",
            _ => "-",
        }),
        Op::Authority => Some(r.authority),
        Op::UpstreamCluster => Some(r.upstream_cluster),
        Op::RequestedServerName => r.sni,
        Op::RouteName => Some(r.route_name),
        Op::TraceId => trace_id(r.request_headers),
        Op::SourceWorkload => Some(r.parties.source_workload),
        Op::SourcePrincipal => Some(r.parties.source_principal),
        Op::DestinationWorkload => Some(r.parties.destination_workload),
        Op::DestinationPrincipal => Some(r.parties.destination_principal),
        Op::AuthorizationPolicy => Some(r.authorization_policy),
        Op::Req(names, max) => header(Some(r.request_headers), names, *max),
        Op::Resp(names, max) => header(r.response_headers, names, *max),
        Op::Dash => None,
    };
    match s.filter(|s| !s.is_empty() && *s != "unknown") {
        Some(s) => {
            out.push_str(s);
            true
        }
        None => false,
    }
}

/// Envoy's name of an HTTP version.
pub fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/0.9",
    }
}

/// Numbers are JSON numbers; everything else a string.
fn numeric(op: &Op) -> bool {
    matches!(
        op,
        Op::ResponseCode | Op::BytesReceived | Op::BytesSent | Op::Duration
    )
}

/// Appends `s` as the inside of a JSON string: runs that need no escaping (nearly all
/// of it) are copied whole.
fn json_escape(s: &str, out: &mut String) {
    let mut run = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            b if b < 0x20 => "",
            _ => continue,
        };
        out.push_str(&s[run..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        run = i + 1;
    }
    out.push_str(&s[run..]);
}

/// Whether `b` holds a byte JSON escapes (`"`, `\\`, a control character): eight bytes
/// at a time (values are mostly plain text, and every line checks hundreds of bytes).
fn needs_escape(b: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero, or under `n`: the classic bit tricks (exact for ASCII
    // bytes; a byte ≥ 0x80 may only make the answer `true`, which the slow path settles).
    let under = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let x = u64::from_le_bytes(w);
        if under(x, 0x20) | under(x ^ (ONES * 0x22), 1) | under(x ^ (ONES * 0x5c), 1) != 0
            && c.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20)
        {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b == b'"' || b == b'\\' || b < 0x20)
}

/// Escapes, in place, what was appended to `out` since `from`.
fn escape_tail(out: &mut String, from: usize) {
    if needs_escape(&out.as_bytes()[from..]) {
        let tail = out.split_off(from);
        json_escape(&tail, out);
    }
}

#[derive(Debug)]
enum Format {
    Text(Vec<Piece>),
    /// Keys, each with its format.
    Json(Vec<(String, Vec<Piece>)>),
}

impl Format {
    /// Every operator the format uses.
    fn ops(&self) -> Vec<&Op> {
        let pieces: Vec<&Piece> = match self {
            Format::Text(p) => p.iter().collect(),
            Format::Json(fields) => fields.iter().flat_map(|(_, p)| p.iter()).collect(),
        };
        pieces
            .into_iter()
            .filter_map(|p| match p {
                Piece::Op(op) => Some(op),
                Piece::Text(_) => None,
            })
            .collect()
    }
}

fn write_text(pieces: &[Piece], r: &Record<'_>, out: &mut String) {
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Op(op) => {
                if !value(op, r, out) {
                    out.push('-');
                }
            }
        }
    }
}

impl Format {
    fn write(&self, r: &Record<'_>, out: &mut String) {
        match self {
            Format::Text(pieces) => write_text(pieces, r, out),
            Format::Json(fields) => {
                out.push('{');
                for (i, (key, pieces)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    // Keys were escaped when the format was compiled.
                    out.push_str(key);
                    // A lone operator keeps its type; anything else is a string.
                    let start = out.len();
                    if let [Piece::Op(op)] = pieces.as_slice() {
                        if numeric(op) {
                            if !value(op, r, out) {
                                out.push_str("null");
                            }
                            continue;
                        }
                        out.push('"');
                        if !value(op, r, out) {
                            out.truncate(start);
                            out.push_str("null");
                            continue;
                        }
                    } else {
                        out.push('"');
                        write_text(pieces, r, out);
                    }
                    escape_tail(out, start + 1);
                    out.push('"');
                }
                out.push('}');
            }
        }
        out.push('\n');
    }
}

/// A filter expression: the common forms of Istio's CEL filters, `&&` binding tighter
/// than `||`.
#[derive(Debug, PartialEq)]
enum Filter {
    Or(Vec<Filter>),
    And(Vec<Filter>),
    Code(Cmp, u16),
    Header(String, bool, String),
    Method(bool, String),
    Flags(bool, String),
}

#[derive(Debug, PartialEq, Clone, Copy)]
enum Cmp {
    Eq,
    Ne,
    Ge,
    Gt,
    Le,
    Lt,
}

/// A token of a filter expression.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(u64),
    Op(Cmp),
    And,
    Or,
    Open,
    Close,
    LBracket,
    RBracket,
}

fn tokens(expr: &str) -> Result<Vec<Tok>, String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let two = b.get(i..i + 2);
        let (tok, len) = match (b[i], two) {
            (c, _) if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            (_, Some(b"&&")) => (Tok::And, 2),
            (_, Some(b"||")) => (Tok::Or, 2),
            (_, Some(b"==")) => (Tok::Op(Cmp::Eq), 2),
            (_, Some(b"!=")) => (Tok::Op(Cmp::Ne), 2),
            (_, Some(b">=")) => (Tok::Op(Cmp::Ge), 2),
            (_, Some(b"<=")) => (Tok::Op(Cmp::Le), 2),
            (b'>', _) => (Tok::Op(Cmp::Gt), 1),
            (b'<', _) => (Tok::Op(Cmp::Lt), 1),
            (b'(', _) => (Tok::Open, 1),
            (b')', _) => (Tok::Close, 1),
            (b'[', _) => (Tok::LBracket, 1),
            (b']', _) => (Tok::RBracket, 1),
            (q @ (b'\'' | b'"'), _) => {
                let end = b[i + 1..]
                    .iter()
                    .position(|&c| c == q)
                    .ok_or("a string is not closed")?;
                let text = &expr[i + 1..i + 1 + end];
                (Tok::Str(text.to_string()), end + 2)
            }
            (c, _) if c.is_ascii_digit() => {
                let end = b[i..]
                    .iter()
                    .position(|c| !c.is_ascii_digit())
                    .unwrap_or(b.len() - i);
                let n = expr[i..i + end]
                    .parse()
                    .map_err(|_| "a number is too large")?;
                (Tok::Num(n), end)
            }
            (c, _) if c.is_ascii_alphabetic() || c == b'_' => {
                let end = b[i..]
                    .iter()
                    .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'.'))
                    .unwrap_or(b.len() - i);
                (Tok::Ident(expr[i..i + end].to_string()), end)
            }
            (c, _) => return Err(format!("unexpected {:?}", char::from(c))),
        };
        out.push(tok);
        i += len;
    }
    Ok(out)
}

/// Parses the common forms of Istio's CEL filters: comparisons of `response.code`,
/// `response.flags`, `request.method` and `request.headers['name']`, with `&&`, `||`
/// and parentheses. Anything else is an error (never a guess).
fn parse_filter(expr: &str) -> Result<Filter, String> {
    let toks = tokens(expr)?;
    let mut pos = 0;
    let f = or_expr(&toks, &mut pos)?;
    if pos != toks.len() {
        return Err(format!("{expr:?}: unexpected {:?}", toks[pos]));
    }
    Ok(f)
}

fn or_expr(t: &[Tok], pos: &mut usize) -> Result<Filter, String> {
    let mut v = vec![and_expr(t, pos)?];
    while t.get(*pos) == Some(&Tok::Or) {
        *pos += 1;
        v.push(and_expr(t, pos)?);
    }
    Ok(if v.len() == 1 {
        v.remove(0)
    } else {
        Filter::Or(v)
    })
}

fn and_expr(t: &[Tok], pos: &mut usize) -> Result<Filter, String> {
    let mut v = vec![atom(t, pos)?];
    while t.get(*pos) == Some(&Tok::And) {
        *pos += 1;
        v.push(atom(t, pos)?);
    }
    Ok(if v.len() == 1 {
        v.remove(0)
    } else {
        Filter::And(v)
    })
}

fn atom(t: &[Tok], pos: &mut usize) -> Result<Filter, String> {
    let next = |pos: &mut usize| {
        let tok = t.get(*pos).cloned();
        *pos += 1;
        tok.ok_or_else(|| "the expression ends too soon".to_string())
    };
    let subject = match next(pos)? {
        Tok::Open => {
            let f = or_expr(t, pos)?;
            return match next(pos)? {
                Tok::Close => Ok(f),
                other => Err(format!("expected ')', found {other:?}")),
            };
        }
        Tok::Ident(name) if name == "request.headers" => {
            let (Tok::LBracket, Tok::Str(h), Tok::RBracket) = (next(pos)?, next(pos)?, next(pos)?)
            else {
                return Err("request.headers takes a quoted name: request.headers['x']".into());
            };
            Subject::Header(h.to_ascii_lowercase())
        }
        Tok::Ident(name) => match name.as_str() {
            "response.code" => Subject::Code,
            "response.flags" => Subject::Flags,
            "request.method" => Subject::Method,
            _ => {
                return Err(format!(
                    "{name:?} is not supported (response.code, response.flags, request.method and request.headers['…'] are)"
                ));
            }
        },
        other => return Err(format!("expected a comparison, found {other:?}")),
    };
    let Tok::Op(cmp) = next(pos)? else {
        return Err("expected a comparison operator".into());
    };
    let eq = match cmp {
        Cmp::Eq => Some(true),
        Cmp::Ne => Some(false),
        _ => None,
    };
    match (subject, next(pos)?, eq) {
        (Subject::Code, Tok::Num(n), _) => u16::try_from(n)
            .map(|n| Filter::Code(cmp, n))
            .map_err(|_| format!("{n} is not a status code")),
        (Subject::Flags, Tok::Str(v), Some(eq)) => Ok(Filter::Flags(eq, v)),
        (Subject::Method, Tok::Str(v), Some(eq)) => Ok(Filter::Method(eq, v)),
        (Subject::Header(h), Tok::Str(v), Some(eq)) => Ok(Filter::Header(h, eq, v)),
        (Subject::Code, other, _) => Err(format!(
            "response.code compares with a number, not {other:?}"
        )),
        (_, other, _) => Err(format!(
            "compare strings with == or != and a quoted string, not {other:?}"
        )),
    }
}

/// What a comparison looks at.
enum Subject {
    Code,
    Flags,
    Method,
    Header(String),
}

impl Filter {
    /// The request headers the filter reads.
    fn headers(&self, add: &mut dyn FnMut(&HeaderName)) {
        match self {
            Filter::Or(v) | Filter::And(v) => v.iter().for_each(|f| f.headers(add)),
            Filter::Header(name, ..) => {
                if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                    add(&n);
                }
            }
            _ => {}
        }
    }

    fn matches(&self, r: &Record<'_>) -> bool {
        match self {
            Filter::Or(v) => v.iter().any(|f| f.matches(r)),
            Filter::And(v) => v.iter().all(|f| f.matches(r)),
            Filter::Code(cmp, n) => {
                let c = r.code;
                match cmp {
                    Cmp::Eq => c == *n,
                    Cmp::Ne => c != *n,
                    Cmp::Ge => c >= *n,
                    Cmp::Gt => c > *n,
                    Cmp::Le => c <= *n,
                    Cmp::Lt => c < *n,
                }
            }
            Filter::Header(name, eq, v) => {
                let got = find(r.request_headers, name).map(|h| h.as_bytes());
                (got == Some(v.as_bytes())) == *eq
            }
            Filter::Method(eq, m) => (r.method.map_or("", Method::as_str) == m) == *eq,
            Filter::Flags(eq, f) => (r.flags == f) == *eq,
        }
    }
}

/// Lines dropped because a writer's queue was full.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// A file (or stdout) and the thread that writes it: lines are appended to `pending`,
/// which the thread takes whole every [`FLUSH_EVERY`].
#[derive(Debug, Default)]
struct Writer {
    pending: Mutex<Vec<u8>>,
}

/// The bytes all writers may hold together before new lines are dropped (lines carry
/// request headers, up to the header limit each).
const QUEUE_BYTES: usize = 32 << 20;
static QUEUED_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Writer {
    /// Queues a line (a copy: `line` is the caller's scratch), or drops and counts it when
    /// the queues are full.
    fn push(&self, line: &[u8]) {
        let n = line.len();
        if QUEUED_BYTES.fetch_add(n, Ordering::Relaxed) + n > QUEUE_BYTES {
            QUEUED_BYTES.fetch_sub(n, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(line);
    }
}

/// Where a writer's lines go.
enum Sink {
    Stdout,
    Stderr,
    /// A file, opened for appending; reopened when the path names another file (it was
    /// rotated away, as logrotate's `create` does) or none.
    File {
        path: String,
        file: std::fs::File,
    },
}

fn open(path: &str) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl Sink {
    fn of(path: &str) -> Result<Sink, String> {
        Ok(match path {
            "/dev/stdout" | "" => Sink::Stdout,
            "/dev/stderr" => Sink::Stderr,
            p => Sink::File {
                path: p.to_string(),
                file: open(p).map_err(|e| format!("access log {p}: {e}"))?,
            },
        })
    }

    /// Follows a rotation: when the path is gone or is another file than the one open,
    /// the path is opened (created) anew.
    fn follow(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let Sink::File { path, file } = self else {
            return Ok(());
        };
        let open_one = file.metadata()?;
        let same = std::fs::metadata(&*path)
            .is_ok_and(|m| m.dev() == open_one.dev() && m.ino() == open_one.ino());
        if !same {
            *file = open(path)?;
        }
        Ok(())
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::Stderr => std::io::stderr().lock().write_all(bytes),
            Sink::File { file, .. } => file.write_all(bytes),
        }
    }
}

fn writer(path: &str) -> Result<Arc<Writer>, String> {
    static WRITERS: OnceLock<Mutex<HashMap<String, Arc<Writer>>>> = OnceLock::new();
    let mut map = WRITERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(w) = map.get(path) {
        return Ok(Arc::clone(w));
    }
    let sink = Sink::of(path)?;
    let w = Arc::new(Writer::default());
    let (thread_w, name) = (Arc::clone(&w), path.to_string());
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_lines(&thread_w, sink, &name))
        .map_err(|e| format!("access log {path}: {e}"))?;
    map.insert(path.to_string(), Arc::clone(&w));
    Ok(w)
}

/// How often a writer wakes to write what has queued (Envoy flushes its access logs every
/// second). Between wakes, queuing a line wakes nobody: at thousands of lines a second, a
/// wake per line would cost every request a context switch.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Waits (at most `timeout`) until the writers have written every line queued: for a
/// proxy about to exit.
pub fn drain(timeout: Duration) {
    let until = std::time::Instant::now() + timeout;
    while QUEUED_BYTES.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes what has queued every `FLUSH_EVERY`, following the file if it is rotated.
/// Lines that cannot be written are counted as dropped (and the error reported once a
/// minute at most).
fn write_lines(w: &Writer, mut sink: Sink, path: &str) {
    let mut taken = Vec::new();
    let mut warned: Option<std::time::Instant> = None;
    loop {
        std::thread::sleep(FLUSH_EVERY);
        std::mem::swap(
            &mut taken,
            &mut *w.pending.lock().unwrap_or_else(PoisonError::into_inner),
        );
        if taken.is_empty() {
            continue;
        }
        if let Err(e) = sink.follow().and_then(|()| sink.write_all(&taken)) {
            let lines = taken.iter().filter(|&&b| b == b'\n').count();
            DROPPED.fetch_add(lines as u64, Ordering::Relaxed);
            if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                warned = Some(std::time::Instant::now());
                tracing::warn!("access log {path}: {e} (lines are dropped and counted)");
            }
        }
        // Counted until written: `drain` waits for this.
        QUEUED_BYTES.fetch_sub(taken.len(), Ordering::Relaxed);
        taken.clear();
        // A burst's buffer is not kept for ever.
        taken.shrink_to(1 << 20);
    }
}

/// Which side's requests an entry logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
    Both,
}

#[derive(Debug)]
struct Entry {
    side: Side,
    filter: Option<Filter>,
    sinks: Vec<(Arc<Format>, Arc<Writer>)>,
}

/// A workload's access logging, compiled from its Telemetry.
#[derive(Debug)]
pub struct AccessLog {
    entries: Vec<Entry>,
    /// The request and response headers the formats and filters read: all a line keeps
    /// of a request's headers.
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
}

impl AccessLog {
    /// From the snapshot's telemetry: `None` when nothing is logged. Problems (an
    /// unknown provider, a filter outside the supported forms, a file that cannot be
    /// opened) are reported, and the rest applies: an unsupported filter logs everything
    /// rather than nothing.
    pub fn compile(t: &wire::Telemetry) -> Option<AccessLog> {
        let mut entries = Vec::new();
        for a in &t.access_logging {
            if a.disabled == Some(true) {
                continue;
            }
            let side = match a.mode.as_str() {
                "CLIENT" => Side::Client,
                "SERVER" => Side::Server,
                _ => Side::Both,
            };
            let filter = match a.filter.as_deref().map(parse_filter) {
                None => None,
                Some(Ok(f)) => Some(f),
                Some(Err(e)) => {
                    tracing::warn!("access log filter ignored (everything is logged): {e}");
                    None
                }
            };
            let mut sinks = Vec::new();
            for name in &a.providers {
                let Some(p) = t.providers.iter().find(|p| &p.name == name) else {
                    tracing::warn!("access log provider {name:?} is not defined");
                    continue;
                };
                let format = match p.kind.as_str() {
                    "envoyJson" => json_format(&p.log_labels),
                    "envoy" | "envoyFileAccessLog" => {
                        if !p.log_labels.is_empty() {
                            json_format(&p.log_labels)
                        } else {
                            let text = p.log_format.as_deref().unwrap_or(DEFAULT_TEXT);
                            let text = text.strip_suffix('\n').unwrap_or(text);
                            Format::Text(parse_format(text))
                        }
                    }
                    _ => continue, // tracing and metrics providers
                };
                match writer(p.path.as_deref().unwrap_or("/dev/stdout")) {
                    Ok(w) => sinks.push((Arc::new(format), w)),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            if !sinks.is_empty() {
                entries.push(Entry {
                    side,
                    filter,
                    sinks,
                });
            }
        }
        if entries.is_empty() {
            return None;
        }
        let (mut request_headers, mut response_headers) = (Vec::new(), Vec::new());
        let add = |list: &mut Vec<HeaderName>, n: &HeaderName| {
            if !list.contains(n) {
                list.push(n.clone());
            }
        };
        for e in &entries {
            if let Some(f) = &e.filter {
                f.headers(&mut |n| add(&mut request_headers, n));
            }
            for (format, _) in &e.sinks {
                for op in format.ops() {
                    match op {
                        Op::Req(names, _) => {
                            names.iter().for_each(|n| add(&mut request_headers, n))
                        }
                        Op::Resp(names, _) => {
                            names.iter().for_each(|n| add(&mut response_headers, n))
                        }
                        Op::TraceId => {
                            for n in ["traceparent", "x-b3-traceid", "b3"] {
                                add(&mut request_headers, &HeaderName::from_static(n));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Some(AccessLog {
            entries,
            request_headers,
            response_headers,
        })
    }

    /// The request headers a line may need, copied.
    pub fn request_headers(&self, h: &HeaderMap) -> Headers {
        keep(&self.request_headers, h)
    }

    /// The response headers a line may need, copied.
    pub fn response_headers(&self, h: &HeaderMap) -> Headers {
        keep(&self.response_headers, h)
    }

    /// Whether anything logs this side's requests (inbound is the server side).
    pub fn logs(&self, inbound: bool) -> bool {
        self.entries.iter().any(|e| e.side.covers(inbound))
    }

    /// Writes the record's line to each sink whose entry covers it.
    pub fn log(&self, inbound: bool, r: &Record<'_>) {
        for e in &self.entries {
            if !e.side.covers(inbound) || e.filter.as_ref().is_some_and(|f| !f.matches(r)) {
                continue;
            }
            for (format, w) in &e.sinks {
                // Formatted in this thread's scratch line, then copied to the writer's
                // queue: no allocation per line.
                thread_local! {
                    static LINE: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(1024));
                }
                LINE.with(|line| {
                    let Ok(mut line) = line.try_borrow_mut() else {
                        return;
                    };
                    line.clear();
                    format.write(r, &mut line);
                    w.push(line.as_bytes());
                    if line.capacity() > 64 << 10 {
                        line.shrink_to(1024);
                    }
                });
            }
        }
    }
}

fn keep(names: &[HeaderName], h: &HeaderMap) -> Headers {
    let mut out = Vec::new();
    if names.is_empty() {
        return out;
    }
    for (n, v) in h {
        if names.contains(n) {
            out.push((n.clone(), v.clone()));
        }
    }
    out
}

impl Side {
    fn covers(self, inbound: bool) -> bool {
        match self {
            Side::Both => true,
            Side::Server => inbound,
            Side::Client => !inbound,
        }
    }
}

fn json_format(labels: &std::collections::BTreeMap<String, String>) -> Format {
    // Each key as it is written: quoted, escaped, with its colon.
    let key = |k: &str| {
        let mut out = String::from("\"");
        json_escape(k, &mut out);
        out.push_str("\":");
        out
    };
    if labels.is_empty() {
        return Format::Json(
            DEFAULT_JSON
                .iter()
                .map(|(k, v)| (key(k), parse_format(v)))
                .collect(),
        );
    }
    Format::Json(
        labels
            .iter()
            .map(|(k, v)| (key(k), parse_format(v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until the file at `path` holds `want`.
    fn holds(path: &std::path::Path, want: &str) -> String {
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(path).unwrap_or_default();
            if text == want {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        text
    }

    #[test]
    fn the_word_at_a_time_escape_check_agrees_with_the_plain_one() {
        let plain = |b: &[u8]| b.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20);
        for byte in 0..=255u8 {
            for at in 0..20 {
                let mut v = b"abcdefghijklmnopqrst".to_vec();
                v[at] = byte;
                assert_eq!(needs_escape(&v), plain(&v), "{byte:#x} at {at}");
                assert_eq!(needs_escape(&v[at..]), plain(&v[at..]));
            }
        }
        assert!(!needs_escape(
            "ünïcödé text, 'quotes' and /paths?a=b".as_bytes()
        ));
        let mut t = String::from("2026");
        rfc3339(
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123),
            &mut t,
        );
        rfc3339(
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_987),
            &mut t,
        );
        assert_eq!(t, "20262025-11-24T16:00:00.123Z2025-11-24T16:00:00.987Z");
    }

    #[test]
    fn a_rotated_file_is_reopened_at_its_path() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("access.log");
        let w = writer(path.to_str().expect("utf-8")).expect("writer");
        w.push(b"one\n");
        assert_eq!(holds(&path, "one\n"), "one\n");
        // logrotate's default: rename, then the writer creates the path again.
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        w.push(b"two\n");
        assert_eq!(holds(&path, "two\n"), "two\n");
        assert_eq!(std::fs::read_to_string(&rotated).expect("rotated"), "one\n");
        // Removed outright: created again.
        std::fs::remove_file(&path).expect("remove");
        w.push(b"three\n");
        assert_eq!(holds(&path, "three\n"), "three\n");
    }

    fn list(h: HeaderMap) -> Headers {
        h.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
    }

    fn record<'a>(h: &'a Headers, m: &'a Method) -> Record<'a> {
        Record {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123),
            method: Some(m),
            path: "/reviews/1?x=1",
            version: Some(Version::HTTP_11),
            authority: "reviews:9080",
            request_headers: h,
            response_headers: None,
            code: 503,
            flags: "UF",
            bytes_received: 10,
            bytes_sent: 91,
            duration: Duration::from_millis(12),
            upstream_host: "10.0.0.7:9080".parse().ok(),
            upstream_cluster: "outbound|9080||reviews.default.svc.cluster.local",
            downstream_local: None,
            downstream_remote: "127.0.0.1:5555".parse().expect("addr"),
            sni: None,
            route_name: "default",
            parties: Parties {
                source_workload: "productpage-v1",
                source_principal: "spiffe://cluster.local/ns/default/sa/productpage",
                destination_workload: "unknown",
                destination_principal: "",
            },
            authorization_policy: "",
        }
    }

    #[test]
    fn istio_s_default_text_format_prints_like_envoy() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc".parse().expect("v"));
        h.insert("user-agent", "curl/8".parse().expect("v"));
        let h = list(h);
        let m = Method::GET;
        let mut line = String::new();
        Format::Text(parse_format(DEFAULT_TEXT)).write(&record(&h, &m), &mut line);
        assert_eq!(
            line,
            "[2025-11-24T16:00:00.123Z] \"GET /reviews/1?x=1 HTTP/1.1\" 503 UF upstream_reset_before_response_started{connection_failure} - \"-\" 10 91 12 - \"-\" \"curl/8\" \"abc\" \"reviews:9080\" \"10.0.0.7:9080\" outbound|9080||reviews.default.svc.cluster.local - - 127.0.0.1:5555 - default\n"
        );
    }

    #[test]
    fn json_lines_keep_numbers_and_escape_strings() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .expect("v"),
        );
        h.insert("x-note", "say \"hi\"".parse().expect("v"));
        let h = list(h);
        let m = Method::POST;
        let mut line = String::new();
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("code".to_string(), "%RESPONSE_CODE%".to_string());
        labels.insert("note".to_string(), "%REQ(X-NOTE)%".to_string());
        labels.insert("both".to_string(), "%REQ(:METHOD)% %TRACE_ID%".to_string());
        labels.insert("missing".to_string(), "%REQ(X-NONE)%".to_string());
        json_format(&labels).write(&record(&h, &m), &mut line);
        assert_eq!(
            line,
            "{\"both\":\"POST 4bf92f3577b34da6a3ce929d0e0e4736\",\"code\":503,\"missing\":null,\"note\":\"say \\\"hi\\\"\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("JSON");
        assert_eq!(v["code"], 503);
        // The default JSON has Istio's keys and Trellis's.
        let mut line = String::new();
        json_format(&Default::default()).write(&record(&h, &m), &mut line);
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("JSON");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/reviews/1?x=1");
        assert_eq!(v["response_flags"], "UF");
        assert_eq!(v["duration"], 12);
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["source_workload"], "productpage-v1");
        assert_eq!(v["destination_workload"], serde_json::Value::Null);
    }

    #[test]
    fn filters_take_istio_s_common_cel_forms() {
        let mut h = HeaderMap::new();
        h.insert("x-debug", "1".parse().expect("v"));
        let h = list(h);
        let m = Method::GET;
        let r = record(&h, &m);
        for (expr, want) in [
            ("response.code >= 400", true),
            ("response.code >= 500 && response.code < 600", true),
            ("response.code == 0", false),
            (
                "response.code < 400 || request.headers['x-debug'] == '1'",
                true,
            ),
            ("request.headers[\"x-debug\"] != \"1\"", false),
            ("request.method == 'GET' && response.flags == 'UF'", true),
            ("response.flags != 'UF'", false),
        ] {
            let f = parse_filter(expr).expect(expr);
            assert_eq!(f.matches(&r), want, "{expr}");
        }
        for bad in [
            "response.duration > 5",
            "response.code >= x",
            "request.headers[x] == '1'",
            "true",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }
}
