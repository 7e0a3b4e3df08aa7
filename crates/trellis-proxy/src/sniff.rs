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
