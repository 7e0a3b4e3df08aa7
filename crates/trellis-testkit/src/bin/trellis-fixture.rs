//! `trellis-fixture`: runs chosen fixture servers until killed; the benchmark harness's upstream.
//!
//! ```text
//! trellis-fixture [--http ADDR] [--http1 ADDR] [--grpc ADDR] [--tcp-echo ADDR] [--ws ADDR]
//! ```
//!
//! Each flag may repeat. Once every server is listening, one line per server
//! (`http 127.0.0.1:8080`) is printed to stdout, so a harness can wait for readiness.

use std::net::SocketAddr;
use std::process::ExitCode;

use trellis_testkit::{GrpcServer, HttpServer, TcpEchoServer, WsEchoServer};

const USAGE: &str = "usage: trellis-fixture [--http ADDR] [--http1 ADDR] [--grpc ADDR] \
                     [--tcp-echo ADDR] [--ws ADDR]";

/// A server handle held for the life of the process (dropping it would stop the server).
type Running = Box<dyn std::any::Any>;

fn parse(args: &[String]) -> Result<Vec<(String, SocketAddr)>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let kind = match flag.as_str() {
            "--http" | "--http1" | "--grpc" | "--tcp-echo" | "--ws" => &flag[2..],
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        };
        let addr = it
            .next()
            .ok_or_else(|| format!("{flag} needs an address\n{USAGE}"))?;
        let addr = addr
            .parse()
            .map_err(|e| format!("{flag} {addr:?}: {e}\n{USAGE}"))?;
        out.push((kind.to_owned(), addr));
    }
    if out.is_empty() {
        return Err(format!("no server chosen\n{USAGE}"));
    }
    Ok(out)
}

async fn start(kind: &str, addr: SocketAddr) -> trellis_testkit::Result<(SocketAddr, Running)> {
    Ok(match kind {
        "http1" => {
            let s = HttpServer::start_on(addr, true).await?;
            (s.addr, Box::new(s) as Running)
        }
        "grpc" => {
            let s = GrpcServer::start_on(addr).await?;
            (s.addr, Box::new(s) as Running)
        }
        "tcp-echo" => {
            let s = TcpEchoServer::start_on(addr).await?;
            (s.addr, Box::new(s) as Running)
        }
        "ws" => {
            let s = WsEchoServer::start_on(addr).await?;
            (s.addr, Box::new(s) as Running)
        }
        _ => {
            let s = HttpServer::start_on(addr, false).await?;
            (s.addr, Box::new(s) as Running)
        }
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let servers = match parse(&args) {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-fixture: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut running = Vec::new();
        for (kind, addr) in servers {
            match start(&kind, addr).await {
                Ok((bound, server)) => {
                    println!("{kind} {bound}");
                    running.push(server);
                }
                Err(e) => {
                    eprintln!("trellis-fixture: {kind} on {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        // Serve until the process is killed.
        std::future::pending::<()>().await;
        drop(running);
        ExitCode::SUCCESS
    })
}
