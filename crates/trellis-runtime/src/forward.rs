//! A port of the machine's loopback forwarded into a mesh (`hostPort`): connections
//! accepted on the host are relayed to an address inside the node namespace.
//!
//! The listening socket belongs to the host's namespace (it is made before anything
//! else); the thread that accepts then enters the node namespace, so the connections it
//! opens are the node's, which reach every pod over the bridge. Nothing is added to the
//! host's network configuration.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

/// A running forward; it stops when dropped.
#[derive(Debug)]
pub struct Forward {
    pub listen: SocketAddr,
    pub to: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Forwards `listen` (on the host) to `to` as seen from the network namespace `netns`.
pub fn forward(listen: SocketAddr, netns: &str, to: SocketAddr) -> anyhow::Result<Forward> {
    let listener = TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen} (is the port taken?)"))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    spawn_in(netns, &format!("forward-{}", listen.port()), move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((client, _)) => {
                    let _ = client.set_nonblocking(false);
                    match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
                        Ok(upstream) => relay(client, upstream),
                        Err(e) => {
                            tracing::warn!("forward {listen} → {to}: {e}");
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::warn!("forward {listen}: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })?;
    Ok(Forward { listen, to, stop })
}

/// Runs `f` on a thread of its own that has entered the network namespace `netns` (the
/// sockets it makes are that namespace's; the rest of the process stays where it is).
pub fn spawn_in<F>(netns: &str, name: &str, f: F) -> anyhow::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("network namespace {netns}"))?;
    let netns = netns.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Err(e) = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET) {
                tracing::warn!("cannot enter network namespace {netns}: {e}");
                return;
            }
            f();
        })?;
    Ok(())
}

/// Copies both ways on two threads, passing each half-close on.
fn relay(a: TcpStream, b: TcpStream) {
    let pairs = match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => [(a, b2), (b, a2)],
        _ => return,
    };
    for (mut from, mut to) in pairs {
        let _ = std::thread::Builder::new()
            .name("forward-copy".into())
            .spawn(move || {
                let mut buf = [0u8; 16 << 10];
                loop {
                    match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = to.shutdown(Shutdown::Write);
                let _ = from.shutdown(Shutdown::Read);
            });
    }
}
