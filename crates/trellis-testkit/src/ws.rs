//! A WebSocket echo upstream (HTTP/1.1 Upgrade, no TLS) and a client for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::server::{ServerTask, loopback_any, spawn_server};
use crate::{Error, Result};

/// How long [`ws_echo`] waits for each echo.
const ECHO_WAIT: Duration = Duration::from_secs(10);

/// Counters of a [`WsEchoServer`]; read them through the handle.
#[derive(Debug, Default)]
pub struct WsStats {
    connections: AtomicU64,
    upgrades: AtomicU64,
    messages: AtomicU64,
}

impl WsStats {
    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    /// Completed WebSocket handshakes.
    pub fn upgrades(&self) -> u64 {
        self.upgrades.load(Ordering::Relaxed)
    }
    /// Text and binary messages echoed.
    pub fn messages_echoed(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

/// A running WebSocket echo fixture: any path upgrades; text and binary messages come back
/// unchanged; pings are answered; a close is returned. Dropping the handle stops it.
#[derive(Debug)]
pub struct WsEchoServer {
    /// Where the server listens.
    pub addr: SocketAddr,
    stats: Arc<WsStats>,
    task: ServerTask,
}

impl WsEchoServer {
    /// Serves on `127.0.0.1:0`.
    pub async fn start() -> Result<Self> {
        Self::start_on(loopback_any()).await
    }

    /// Serves on `addr`.
    pub async fn start_on(addr: SocketAddr) -> Result<Self> {
        let stats = Arc::new(WsStats::default());
        let conn_stats = stats.clone();
        let (addr, task) = spawn_server(addr, move |stream, _peer| {
            conn_stats.connections.fetch_add(1, Ordering::Relaxed);
            let stats = conn_stats.clone();
            async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                stats.upgrades.fetch_add(1, Ordering::Relaxed);
                while let Some(Ok(msg)) = ws.next().await {
                    match msg {
                        Message::Text(_) | Message::Binary(_) => {
                            stats.messages.fetch_add(1, Ordering::Relaxed);
                            if ws.send(msg).await.is_err() {
                                return;
                            }
                        }
                        // tungstenite queues the pong and the close reply itself; a flush
                        // sends them.
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                            let _ = ws.flush().await;
                        }
                        Message::Close(_) => {
                            let _ = ws.flush().await;
                            break;
                        }
                    }
                }
            }
        })
        .await?;
        Ok(Self { addr, stats, task })
    }

    /// The server's counters.
    pub fn stats(&self) -> &WsStats {
        &self.stats
    }

    /// Stops the server and waits until it and its connections are gone.
    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

/// Connects to `addr`, upgrades with `Host: host` (path `/echo`), sends each message and waits
/// (at most 10 s each) for its echo, then closes. Returns the echoes in order; pings and pongs
/// are skipped.
pub async fn ws_echo(addr: SocketAddr, host: &str, messages: Vec<Message>) -> Result<Vec<Message>> {
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let (mut ws, _resp) =
        tokio_tungstenite::client_async(format!("ws://{host}/echo"), stream).await?;
    let mut echoes = Vec::with_capacity(messages.len());
    for msg in messages {
        ws.send(msg).await?;
        loop {
            let next = tokio::time::timeout(ECHO_WAIT, ws.next())
                .await
                .map_err(|_| Error::Timeout(ECHO_WAIT, "a WebSocket echo"))?;
            match next {
                None => return Err(Error::Protocol("WebSocket closed before the echo".into())),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => {
                    echoes.push(m);
                    break;
                }
            }
        }
    }
    ws.close(None).await?;
    // Wait (bounded) for the server's close reply so the exchange ends cleanly.
    let _ = tokio::time::timeout(ECHO_WAIT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    Ok(echoes)
}
