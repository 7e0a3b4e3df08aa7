//! What every fixture server shares: binding, the accept loop and stop-on-drop.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Owns a server's accept task. Dropping it aborts the task; the task owns the connection
/// tasks in a [`JoinSet`], so they are aborted with it.
#[derive(Debug)]
pub(crate) struct ServerTask {
    task: Option<JoinHandle<()>>,
}

impl ServerTask {
    /// Aborts the server and waits until its task (and so every connection) is gone.
    pub(crate) async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The loopback address with an ephemeral port, where fixtures bind by default.
pub(crate) fn loopback_any() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Binds `addr` and spawns an accept loop that runs `handle` for each connection on its own
/// task. Returns the bound address and the task guard.
pub(crate) async fn spawn_server<F, Fut>(
    addr: SocketAddr,
    mut handle: F,
) -> std::io::Result<(SocketAddr, ServerTask)>
where
    F: FnMut(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Fixtures serve small request/response exchanges: no Nagle delay.
                        let _ = stream.set_nodelay(true);
                        conns.spawn(handle(stream, peer));
                    }
                    // EMFILE and friends: back off briefly instead of spinning.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    Ok((local, ServerTask { task: Some(task) }))
}
