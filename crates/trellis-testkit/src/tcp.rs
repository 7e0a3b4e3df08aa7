//! Raw TCP upstreams: an echo server that honours half-close, and a server-first banner server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::Result;
use crate::server::{ServerTask, loopback_any, spawn_server};

/// Counters of a TCP fixture; read them through its handle.
#[derive(Debug, Default)]
pub struct TcpStats {
    connections: AtomicU64,
    eofs: AtomicU64,
    bytes: AtomicU64,
}

impl TcpStats {
    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    /// Connections on which the server read EOF (the client half-closed or closed).
    pub fn eofs_seen(&self) -> u64 {
        self.eofs.load(Ordering::Relaxed)
    }
    /// Bytes echoed back (banners not counted).
    pub fn bytes_echoed(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// A running TCP echo fixture. On read EOF it finishes echoing, shuts down its write side
/// (half-close) and records the EOF. Dropping the handle stops it.
#[derive(Debug)]
pub struct TcpEchoServer {
    /// Where the server listens.
    pub addr: SocketAddr,
    stats: Arc<TcpStats>,
    task: ServerTask,
}

impl TcpEchoServer {
    /// Serves on `127.0.0.1:0`.
    pub async fn start() -> Result<Self> {
        Self::start_on(loopback_any()).await
    }

    /// Serves on `addr`.
    pub async fn start_on(addr: SocketAddr) -> Result<Self> {
        let stats = Arc::new(TcpStats::default());
        let conn_stats = stats.clone();
        let (addr, task) = spawn_server(addr, move |mut stream, _peer| {
            conn_stats.connections.fetch_add(1, Ordering::Relaxed);
            let stats = conn_stats.clone();
            async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => {
                            stats.eofs.fetch_add(1, Ordering::Relaxed);
                            let _ = stream.shutdown().await;
                            return;
                        }
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => return,
                    }
                }
            }
        })
        .await?;
        Ok(Self { addr, stats, task })
    }

    /// The server's counters.
    pub fn stats(&self) -> &TcpStats {
        &self.stats
    }

    /// Stops the server and waits until it and its connections are gone.
    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

/// Connects to `addr`, writes `data` while reading, half-closes its write side, and reads until
/// the server's EOF. Returns everything read. Bound it with a timeout: a peer that never
/// half-closes back makes it wait forever.
pub async fn tcp_echo_half_close(addr: SocketAddr, data: &[u8]) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = stream.split();
    let write = async {
        wr.write_all(data).await?;
        wr.shutdown().await
    };
    let mut out = Vec::with_capacity(data.len());
    let read = rd.read_to_end(&mut out);
    let (w, r) = tokio::join!(write, read);
    w?;
    r?;
    Ok(out)
}

/// A running server-first fixture (like SMTP or MySQL): on accept it writes its banner at once,
/// then echoes each line it reads (newline included) until EOF, when it closes. Dropping the
/// handle stops it.
#[derive(Debug)]
pub struct BannerServer {
    /// Where the server listens.
    pub addr: SocketAddr,
    stats: Arc<TcpStats>,
    task: ServerTask,
}

impl BannerServer {
    /// Serves `banner` on `127.0.0.1:0`.
    pub async fn start(banner: impl Into<Bytes>) -> Result<Self> {
        Self::start_on(loopback_any(), banner).await
    }

    /// Serves `banner` on `addr`.
    pub async fn start_on(addr: SocketAddr, banner: impl Into<Bytes>) -> Result<Self> {
        let banner: Bytes = banner.into();
        let stats = Arc::new(TcpStats::default());
        let conn_stats = stats.clone();
        let (addr, task) = spawn_server(addr, move |mut stream, _peer| {
            conn_stats.connections.fetch_add(1, Ordering::Relaxed);
            let stats = conn_stats.clone();
            let banner = banner.clone();
            async move {
                if stream.write_all(&banner).await.is_err() {
                    return;
                }
                let (rd, mut wr) = stream.split();
                let mut rd = BufReader::new(rd);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match rd.read_until(b'\n', &mut line).await {
                        Ok(0) => {
                            stats.eofs.fetch_add(1, Ordering::Relaxed);
                            let _ = wr.shutdown().await;
                            return;
                        }
                        Ok(n) => {
                            if wr.write_all(&line).await.is_err() {
                                return;
                            }
                            stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => return,
                    }
                }
            }
        })
        .await?;
        Ok(Self { addr, stats, task })
    }

    /// The server's counters.
    pub fn stats(&self) -> &TcpStats {
        &self.stats
    }

    /// Stops the server and waits until it and its connections are gone.
    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

/// A loopback port that refuses connections for as long as this value lives: a socket is
/// bound to it but never listens. (A port freed by dropping a listener can be taken by
/// another test meanwhile, and then it answers.)
#[derive(Debug)]
pub struct RefusedPort {
    _socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

impl RefusedPort {
    pub fn new() -> std::io::Result<RefusedPort> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = socket.local_addr()?;
        Ok(RefusedPort {
            _socket: socket,
            addr,
        })
    }
}
