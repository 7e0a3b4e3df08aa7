//! `trellis demo-app`: Bookinfo's four services in one small program, so that the demo
//! needs nothing but `trellis`. Each instance plays one part (`--service`) at one
//! version; every answer names the version that made it.
//!
//! - `productpage`: `GET /productpage` (HTML), `GET /api/v1/products/0` (JSON); calls
//!   `details` and `reviews`;
//! - `details`: `GET /details/0`;
//! - `reviews`: `GET /reviews/0`; v2 and v3 call `ratings` (black and red stars), v1 does
//!   not;
//! - `ratings`: `GET /ratings/0`.
//!
//! Like the real Bookinfo it propagates the tracing headers (and `end-user`) from the
//! request it serves to the requests it makes: a mesh cannot do that for an app. It is a
//! plain HTTP/1.1 server and client on the standard library, a thread per connection:
//! the mesh, not the app, is what the demo shows.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Productpage,
    Details,
    Reviews,
    Ratings,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The part of Bookinfo this instance plays.
    #[arg(long, value_enum)]
    pub service: Part,
    /// Its version (`v1`, `v2`, `v3`: reviews v2 shows black stars, v3 red ones).
    #[arg(long, default_value = "v1")]
    pub version: String,
    /// Where it listens.
    #[arg(long, default_value = "0.0.0.0:9080")]
    pub listen: std::net::SocketAddr,
    /// Added to every answer.
    #[arg(long, default_value = "0ms")]
    pub delay: trellis_api::common::Duration,
    /// Percent of requests answered 503.
    #[arg(long, default_value_t = 0.0)]
    pub error_percent: f64,
    /// Where the services it calls are (Bookinfo's names and port by default: the mesh
    /// resolves and routes them).
    #[arg(long, default_value = "details:9080")]
    pub details: String,
    #[arg(long, default_value = "reviews:9080")]
    pub reviews: String,
    #[arg(long, default_value = "ratings:9080")]
    pub ratings: String,
}

/// The headers an app must copy from the request it serves to the ones it makes, for
/// traces to join up and for routing on the user.
const PROPAGATED: [&str; 11] = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "end-user",
    "user-agent",
];

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let listener = TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!(
        "demo-app: {:?} {} on {}",
        args.service, args.version, args.listen
    );
    let args = std::sync::Arc::new(args.clone());
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let args = std::sync::Arc::clone(&args);
        let _ = std::thread::Builder::new()
            .name("demo-conn".into())
            .spawn(move || serve(conn, &args));
    }
    Ok(ExitCode::SUCCESS)
}

/// Serves the requests of one connection (keep-alive) until it closes.
fn serve(conn: TcpStream, args: &Args) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    while let Some(req) = read_request(&mut reader) {
        let close = req
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let (status, ctype, body) = answer(&req, args);
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nx-bookinfo-version: {}\r\n{}\r\n",
            body.len(),
            args.version,
            if close { "connection: close\r\n" } else { "" }
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(body.as_bytes()).is_err() {
            return;
        }
        if close {
            return;
        }
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        if headers.len() > 100 {
            return None;
        }
    }
    let req = Request {
        method,
        path,
        headers,
    };
    // A body is read and ignored.
    let len: u64 = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    std::io::copy(&mut r.by_ref().take(len.min(1 << 20)), &mut std::io::sink()).ok()?;
    Some(req)
}

fn answer(req: &Request, args: &Args) -> (&'static str, &'static str, String) {
    if !args.delay.0.is_zero() {
        std::thread::sleep(args.delay.0);
    }
    let path = req.path.split('?').next().unwrap_or("");
    if path == "/health" || path == "/healthz" {
        return ("200 OK", "text/plain", "ok\n".into());
    }
    if args.error_percent > 0.0 && (rand() % 10_000) as f64 / 100.0 < args.error_percent {
        return (
            "503 Service Unavailable",
            "text/plain",
            format!("{:?} {}: injected error\n", args.service, args.version),
        );
    }
    if req.method != "GET" && req.method != "HEAD" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    let v = &args.version;
    match (args.service, path) {
        (Part::Details, p) if p.starts_with("/details/") => (
            "200 OK",
            "application/json",
            format!(
                r#"{{"id":0,"author":"William Shakespeare","year":1595,"type":"paperback","pages":200,"publisher":"PublisherA","language":"English","ISBN-10":"1234567890","ISBN-13":"123-1234567890","version":"{v}"}}"#
            ),
        ),
        (Part::Ratings, p) if p.starts_with("/ratings/") => (
            "200 OK",
            "application/json",
            format!(r#"{{"id":0,"ratings":{{"Reviewer1":5,"Reviewer2":4}},"version":"{v}"}}"#),
        ),
        (Part::Reviews, p) if p.starts_with("/reviews/") => {
            let color = match v.as_str() {
                "v2" => Some("black"),
                "v3" => Some("red"),
                _ => None,
            };
            let stars = color.map(|c| match get(&args.ratings, "/ratings/0", req) {
                Ok(body) => {
                    let n = |who: &str| {
                        body.split(&format!("\"{who}\":"))
                            .nth(1)
                            .and_then(|r| r.get(..1))
                            .unwrap_or("0")
                            .to_string()
                    };
                    (
                        format!(r#","rating":{{"stars":{},"color":"{c}"}}"#, n("Reviewer1")),
                        format!(r#","rating":{{"stars":{},"color":"{c}"}}"#, n("Reviewer2")),
                    )
                }
                Err(e) => {
                    let err = format!(
                        r#","rating":{{"error":"Ratings service is currently unavailable ({})"}}"#,
                        json_text(&e)
                    );
                    (err.clone(), err)
                }
            });
            let (r1, r2) = stars.unwrap_or_default();
            (
                "200 OK",
                "application/json",
                format!(
                    r#"{{"id":"0","reviews":[{{"reviewer":"Reviewer1","text":"An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"{r1}}},{{"reviewer":"Reviewer2","text":"Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare."{r2}}}],"version":"{v}"}}"#
                ),
            )
        }
        (Part::Productpage, "/api/v1/products/0") | (Part::Productpage, "/productpage") => {
            let details = get(&args.details, "/details/0", req);
            let reviews = get(&args.reviews, "/reviews/0", req);
            let field = |body: &Result<String, String>, key: &str| -> String {
                body.as_ref()
                    .ok()
                    .and_then(|b| b.split(&format!("\"{key}\":\"")).nth(1))
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("-")
                    .to_string()
            };
            if path.starts_with("/api/") {
                let part = |b: &Result<String, String>| match b {
                    Ok(b) => b.clone(),
                    Err(e) => format!(r#"{{"error":"{}"}}"#, json_text(e)),
                };
                return (
                    "200 OK",
                    "application/json",
                    format!(
                        r#"{{"productpage":"{v}","details":{},"reviews":{}}}"#,
                        part(&details),
                        part(&reviews)
                    ),
                );
            }
            let user = req.header("end-user").unwrap_or("anonymous");
            let reviews_html = match &reviews {
                Ok(b) => {
                    let stars = if b.contains("\"color\":\"red\"") {
                        "<span style=\"color:red\">★★★★★</span> (red stars)"
                    } else if b.contains("\"color\":\"black\"") {
                        "<span>★★★★★</span> (black stars)"
                    } else if b.contains("currently unavailable") {
                        "Ratings service is currently unavailable"
                    } else {
                        "(no ratings)"
                    };
                    format!(
                        "<p>Reviews served by <b>reviews-{}</b>: {stars}</p>",
                        field(&reviews, "version")
                    )
                }
                Err(e) => format!(
                    "<p>Sorry, product reviews are currently unavailable for this book. ({e})</p>"
                ),
            };
            let details_html = match &details {
                Ok(_) => format!(
                    "<p>Details served by <b>details-{}</b>: {} by {}</p>",
                    field(&details, "version"),
                    field(&details, "type"),
                    field(&details, "author")
                ),
                Err(e) => format!(
                    "<p>Sorry, product details are currently unavailable for this book. ({e})</p>"
                ),
            };
            (
                "200 OK",
                "text/html; charset=utf-8",
                format!(
                    "<!DOCTYPE html>\n<html><head><title>Bookinfo</title></head><body>\n<h1>The Comedy of Errors</h1>\n<p>Signed in as <b>{}</b>; page served by <b>productpage-{v}</b>.</p>\n{details_html}\n{reviews_html}\n</body></html>\n",
                    html_text(user)
                ),
            )
        }
        _ => (
            "404 Not Found",
            "text/plain",
            format!("{:?} {v}: no {path}\n", args.service),
        ),
    }
}

/// `GET path` from `host:port` with the propagated headers of `req`: the body, or why
/// not.
fn get(authority: &str, path: &str, req: &Request) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("{authority}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let host = authority.split(':').next().unwrap_or(authority);
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for name in PROPAGATED {
        if let Some(v) = req.header(name) {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .map_err(|e| format!("{authority}: {e}"))?;
    let mut resp = Vec::new();
    s.take(4 << 20)
        .read_to_end(&mut resp)
        .map_err(|e| format!("{authority}: {e}"))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("{host} answered {status}"));
    }
    Ok(body.to_string())
}

fn json_text(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn html_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Good enough for error injection (not for anything secret).
fn rand() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}
