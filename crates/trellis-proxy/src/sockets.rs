//! Socket options: the original destination of an intercepted connection and the mark on
//! proxy-originated sockets. (Safe wrappers from `nix` and `socket2`; no unsafe code.)

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

/// Mark on every socket the proxy opens, so interception rules let it through (Istio's
/// 0x539, 1337).
pub const PROXY_MARK: u32 = 0x539;

/// Finds where an intercepted connection was going. A seam: in-process tests use a fake.
pub trait OriginalDst: Send + Sync + 'static {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// The real lookup: `SO_ORIGINAL_DST` (IPv4) / `IP6T_SO_ORIGINAL_DST` (IPv6), set by
/// iptables REDIRECT.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoOriginalDst;

impl OriginalDst for SoOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        use nix::sys::socket::{getsockopt, sockopt};
        let local = stream.local_addr()?;
        // An IPv4 connection accepted on a dual-stack (`[::]`) listener has a v4-mapped
        // address and an IPv4 conntrack entry: it is asked with the IPv4 option.
        let v4 = match local {
            SocketAddr::V4(_) => true,
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
        };
        if v4 {
            let sa = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
            let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sa.sin_port),
            )))
        } else {
            let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sa.sin6_port),
                0,
                0,
            )))
        }
    }
}

/// A lookup that answers with the socket's own local address (what a connection that was
/// not redirected reports).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalAddrAsOriginal;

impl OriginalDst for LocalAddrAsOriginal {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        stream.local_addr()
    }
}

/// A lookup that answers every connection with one fixed address, as iptables REDIRECT
/// would report it for traffic to that address: for tests and for listeners that forward
/// everything to one place.
#[derive(Debug, Clone, Copy)]
pub struct FixedOriginalDst(pub SocketAddr);

impl OriginalDst for FixedOriginalDst {
    fn original_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}

static MARK_WARNED: AtomicBool = AtomicBool::new(false);

/// TCP keepalive on upstream sockets (a DestinationRule's `tcpKeepalive`); unset
/// fields keep the OS's values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
    pub probes: Option<u32>,
}

/// How to open an upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dial {
    pub timeout: Duration,
    pub keepalive: Option<Keepalive>,
}

impl From<Duration> for Dial {
    fn from(timeout: Duration) -> Dial {
        Dial {
            timeout,
            keepalive: None,
        }
    }
}

/// Connects to `addr` with the proxy mark, TCP_NODELAY and a timeout.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    connect_with(addr, timeout.into()).await
}

/// Connects as [`connect`] does, with keepalive when `dial` asks for it.
pub async fn connect_with(addr: SocketAddr, dial: Dial) -> io::Result<TcpStream> {
    let timeout = dial.timeout;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Err(e) = socket2::SockRef::from(&socket).set_mark(PROXY_MARK) {
        // Needs CAP_NET_ADMIN; without it interception rules must match the proxy's uid.
        if !MARK_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!("cannot set socket mark {PROXY_MARK:#x} on upstream sockets: {e}");
        }
    }
    socket.set_nodelay(true)?;
    if let Some(k) = dial.keepalive {
        let mut ka = socket2::TcpKeepalive::new();
        if let Some(t) = k.time {
            ka = ka.with_time(t);
        }
        if let Some(i) = k.interval {
            ka = ka.with_interval(i);
        }
        if let Some(p) = k.probes {
            ka = ka.with_retries(p);
        }
        socket2::SockRef::from(&socket).set_tcp_keepalive(&ka)?;
    }
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upstream_sockets_carry_the_proxy_mark() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let s = connect(l.local_addr().expect("addr"), Duration::from_secs(5))
            .await
            .expect("connect");
        let probe = tokio::net::TcpSocket::new_v4().expect("socket");
        if socket2::SockRef::from(&probe).set_mark(1).is_err() {
            eprintln!("no CAP_NET_ADMIN here: the mark cannot be set; skipping");
            return;
        }
        assert_eq!(
            socket2::SockRef::from(&s).mark().expect("SO_MARK"),
            PROXY_MARK
        );
        assert!(s.nodelay().expect("nodelay"));
    }

    #[tokio::test]
    async fn keepalive_is_set_when_asked() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let plain = connect(addr, Duration::from_secs(5))
            .await
            .expect("connect");
        assert!(
            !socket2::SockRef::from(&plain)
                .keepalive()
                .expect("SO_KEEPALIVE")
        );
        let dial = Dial {
            timeout: Duration::from_secs(5),
            keepalive: Some(Keepalive {
                time: Some(Duration::from_secs(600)),
                interval: Some(Duration::from_secs(30)),
                probes: Some(4),
            }),
        };
        let s = connect_with(addr, dial).await.expect("connect");
        let r = socket2::SockRef::from(&s);
        assert!(r.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            r.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            Duration::from_secs(600)
        );
        assert_eq!(
            r.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            Duration::from_secs(30)
        );
        assert_eq!(r.tcp_keepalive_retries().expect("TCP_KEEPCNT"), 4);
    }
}
