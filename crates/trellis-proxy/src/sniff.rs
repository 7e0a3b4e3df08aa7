//! Protocol detection from a client's first bytes, with a bounded wait. Bytes are only
//! peeked, never consumed, so whatever handles the connection next sees all of them. A
//! silent client (server-first protocols: MySQL, SMTP) is treated as TCP when the wait
//! ends; detection never hangs.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tls,
    /// Anything else, a client that said nothing within the wait, or one that closed.
    Tcp,
}

/// The outcome of detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    pub protocol: Detected,
    /// The client sent too little to decide before the wait ended.
    pub timed_out: bool,
}

/// Classifies a prefix: `None` when more bytes are needed to decide.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => None,
            Some(3) => Some(Detected::Tls),
            Some(_) => Some(Detected::Tcp),
        };
    }
    // An HTTP/1 request line starts with a method token (uppercase letters) and a space.
    let token = buf.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if token == buf.len() {
        return if token < 16 {
            None
        } else {
            Some(Detected::Tcp)
        };
    }
    Some(if token > 0 && buf[token] == b' ' {
        Detected::Http1
    } else {
        Detected::Tcp
    })
}

/// Peeks at a connection until its protocol is known or `wait` has passed.
pub async fn detect(stream: &TcpStream, wait: Duration) -> io::Result<Detection> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => {
                return Ok(Detection {
                    protocol: Detected::Tcp,
                    timed_out: true,
                });
            }
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok(Detection {
                protocol: Detected::Tcp,
                timed_out: false,
            });
        }
        if let Some(protocol) = classify(&buf[..n]) {
            return Ok(Detection {
                protocol,
                timed_out: false,
            });
        }
        // A partial prefix: peek returns at once while the bytes sit unread, so wait a
        // little for more instead of spinning.
        if Instant::now() >= deadline {
            return Ok(Detection {
                protocol: Detected::Tcp,
                timed_out: true,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Detected::Http2)
        );
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"PRI /x HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Detected::Tls));
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(b"\x00\x01binary"), Some(Detected::Tcp));
        assert_eq!(classify(b"hello"), Some(Detected::Tcp));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRS"), Some(Detected::Tcp));
    }

    #[tokio::test]
    async fn silent_clients_time_out_as_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let start = Instant::now();
        let d = detect(&server, Duration::from_millis(50))
            .await
            .expect("detect");
        assert_eq!(
            d,
            Detection {
                protocol: Detected::Tcp,
                timed_out: true
            }
        );
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}

/// What a TLS ClientHello says about where the client wants to go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name (SNI), lowercased.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

/// The ClientHello at the start of `buf`, if `buf` holds the whole first record. Parsing is
/// bounds-checked throughout: malformed input gives `None`.
pub fn client_hello(buf: &[u8]) -> Option<ClientHello> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }
    fn u16_at(b: &mut &[u8]) -> Option<usize> {
        take(b, 2).map(|x| usize::from(x[0]) << 8 | usize::from(x[1]))
    }
    let mut b = buf;
    let rec = take(&mut b, 5)?;
    if rec[0] != 0x16 {
        return None;
    }
    let rec_len = usize::from(rec[3]) << 8 | usize::from(rec[4]);
    let mut hs = take(&mut b, rec_len)?;
    let head = take(&mut hs, 4)?;
    if head[0] != 1 {
        return None; // not a ClientHello
    }
    take(&mut hs, 2 + 32)?; // version, random
    let sid = usize::from(*take(&mut hs, 1)?.first()?);
    take(&mut hs, sid)?;
    let suites = u16_at(&mut hs)?;
    take(&mut hs, suites)?;
    let comp = usize::from(*take(&mut hs, 1)?.first()?);
    take(&mut hs, comp)?;
    let mut hello = ClientHello::default();
    if hs.is_empty() {
        return Some(hello); // no extensions at all
    }
    let ext_len = u16_at(&mut hs)?;
    let mut exts = take(&mut hs, ext_len)?;
    while !exts.is_empty() {
        let ty = u16_at(&mut exts)?;
        let len = u16_at(&mut exts)?;
        let mut data = take(&mut exts, len)?;
        match ty {
            0 => {
                let _list = u16_at(&mut data)?;
                while !data.is_empty() {
                    let name_type = *take(&mut data, 1)?.first()?;
                    let n = u16_at(&mut data)?;
                    let name = take(&mut data, n)?;
                    if name_type == 0 && hello.sni.is_none() {
                        hello.sni = std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
                    }
                }
            }
            16 => {
                let list = u16_at(&mut data)?;
                let mut list = take(&mut data, list)?;
                while !list.is_empty() {
                    let n = usize::from(*take(&mut list, 1)?.first()?);
                    hello.alpn.push(take(&mut list, n)?.to_vec());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

/// The server name (SNI) of a TLS ClientHello at the start of `buf` (see [`client_hello`]).
pub fn sni(buf: &[u8]) -> Option<String> {
    client_hello(buf)?.sni
}

/// Peeks at a TLS client's first record (at most 16 KiB, for at most `wait`) and parses
/// its ClientHello, leaving every byte unread.
pub async fn peek_client_hello(stream: &TcpStream, wait: Duration) -> Option<ClientHello> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 16 * 1024 + 5];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || buf[0] != 0x16 {
            return None; // closed, or not TLS at all
        }
        if n >= 5 {
            let need = 5 + (usize::from(buf[3]) << 8 | usize::from(buf[4]));
            if n >= need || n == buf.len() {
                return client_hello(&buf[..n]);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Peeks at a TLS client's first record and returns its SNI.
pub async fn peek_sni(stream: &TcpStream, wait: Duration) -> Option<String> {
    peek_client_hello(stream, wait).await?.sni
}

#[cfg(test)]
mod sni_tests {
    use super::*;

    /// A minimal ClientHello with one SNI extension (and one other extension before it).
    pub(crate) fn client_hello(host: &str) -> Vec<u8> {
        let name = host.as_bytes();
        let mut sni_ext = vec![0x00, 0x00];
        let list_len = 3 + name.len();
        let ext_len = 2 + list_len;
        sni_ext.extend_from_slice(&(ext_len as u16).to_be_bytes());
        sni_ext.extend_from_slice(&(list_len as u16).to_be_bytes());
        sni_ext.push(0);
        sni_ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni_ext.extend_from_slice(name);
        let mut exts = vec![0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]; // ec_point_formats
        exts.extend_from_slice(&sni_ext);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn reads_a_real_client_hello() {
        // rustls's own first flight, with SNI and two ALPN protocols.
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        config.alpn_protocols = vec![b"trellis-h2".to_vec(), b"h2".to_vec()];
        let name = rustls::pki_types::ServerName::try_from("DB.example.com").expect("name");
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
        let mut buf = Vec::new();
        conn.write_tls(&mut buf).expect("hello");
        let hello = super::client_hello(&buf).expect("parses");
        assert_eq!(hello.sni.as_deref(), Some("db.example.com"));
        assert_eq!(hello.alpn, vec![b"trellis-h2".to_vec(), b"h2".to_vec()]);
        for cut in 0..buf.len() {
            assert_eq!(super::client_hello(&buf[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn finds_the_server_name() {
        assert_eq!(
            sni(&client_hello("DB.Example.com")).as_deref(),
            Some("db.example.com")
        );
    }

    #[test]
    fn truncated_or_garbage_input_is_none_not_a_panic() {
        let full = client_hello("db.example.com");
        for cut in 0..full.len() {
            assert_eq!(sni(&full[..cut]), None, "cut at {cut}");
        }
        let mut x = 0x9e37_79b9_u32;
        for _ in 0..2000 {
            let garbage: Vec<u8> = (0..300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x & 0xff) as u8
                })
                .collect();
            let mut g = vec![0x16, 0x03, 0x01, 0x01, 0x20, 0x01];
            g.extend_from_slice(&garbage);
            let _ = sni(&g);
        }
    }
}
