//! `trellis-tcpload`: an open-loop load generator for TCP echo services (the benchmark
//! harness's TCP topologies; oha speaks only HTTP).
//!
//! ```text
//! trellis-tcpload ADDR [--rate RPS] [--duration SECS] [--connections N] [--size BYTES]
//! ```
//!
//! A request is `--size` bytes written and the same number read back, on one of
//! `--connections` kept-open connections (round robin). At a fixed `--rate` each request
//! has its scheduled time; one that could not be sent then because its connection was
//! still waiting for an answer is counted from that time, not from when it was sent
//! (coordinated omission corrected, as oha's `--latency-correction`); `--rate 0` sends as
//! fast as each connection can (saturation). Prints one JSON object: the latency
//! percentiles in µs (`p50`, `p90`, `p99`, `p99.9`), `rps`, `ok`, `errors`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USAGE: &str =
    "usage: trellis-tcpload ADDR [--rate RPS] [--duration SECS] [--connections N] [--size BYTES]";

struct Args {
    addr: SocketAddr,
    rate: f64,
    duration: Duration,
    connections: usize,
    size: usize,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut it = args.iter();
    let addr = it
        .next()
        .ok_or(USAGE)?
        .parse()
        .map_err(|e| format!("ADDR: {e}\n{USAGE}"))?;
    let mut a = Args {
        addr,
        rate: 2000.0,
        duration: Duration::from_secs(10),
        connections: 16,
        size: 1024,
    };
    while let Some(flag) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--rate" => a.rate = num(v)?,
            "--duration" => a.duration = Duration::from_secs_f64(num(v)?),
            "--connections" => a.connections = num(v)?.max(1.0) as usize,
            "--size" => a.size = num(v)?.max(1.0) as usize,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// One connection's requests: its latencies in µs, and its errors.
async fn connection(a: &Args, i: usize, start: Instant, end: Instant) -> (Vec<u32>, u64) {
    let mut latencies = Vec::new();
    let Ok(mut sock) = tokio::net::TcpStream::connect(a.addr).await else {
        return (latencies, 1);
    };
    let _ = sock.set_nodelay(true);
    let out = vec![b'x'; a.size];
    let mut back = vec![0u8; a.size];
    for k in 0u64.. {
        // This connection's k-th request: the (i + k·C)-th of the whole run.
        let due = if a.rate > 0.0 {
            let n = i as f64 + (k as f64) * a.connections as f64;
            start + Duration::from_secs_f64(n / a.rate)
        } else {
            Instant::now()
        };
        if due >= end {
            break;
        }
        // Late already (the previous answer was slow): counted from when it was due. Else
        // counted from when the timer woke (its millisecond grain is not the server's).
        let from = if a.rate > 0.0 && Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
            Instant::now()
        } else if a.rate > 0.0 {
            due
        } else {
            Instant::now()
        };
        let done = async {
            sock.write_all(&out).await?;
            sock.read_exact(&mut back).await
        };
        match tokio::time::timeout(Duration::from_secs(5), done).await {
            Ok(Ok(_)) => {
                let us = from.elapsed().as_micros();
                latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            _ => return (latencies, 1),
        }
    }
    (latencies, 0)
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let a = match parse(&raw) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let (mut all, errors, elapsed) = rt.block_on(async {
        let start = Instant::now() + Duration::from_millis(50);
        let end = start + a.duration;
        let runs = (0..a.connections).map(|i| connection(&a, i, start, end));
        let results = futures_util::future::join_all(runs).await;
        let elapsed = start.elapsed();
        let mut all = Vec::new();
        let mut errors = 0;
        for (l, e) in results {
            all.extend(l);
            errors += e;
        }
        (all, errors, elapsed)
    });
    all.sort_unstable();
    let pct = |p: f64| -> u32 {
        if all.is_empty() {
            return 0;
        }
        let i = ((p / 100.0) * (all.len() - 1) as f64).round() as usize;
        all[i.min(all.len() - 1)]
    };
    println!(
        "{{\"p50\": {}, \"p90\": {}, \"p99\": {}, \"p99.9\": {}, \"rps\": {:.1}, \"ok\": {}, \"errors\": {}}}",
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        all.len() as f64 / elapsed.as_secs_f64().max(0.001),
        all.len(),
        errors
    );
    ExitCode::SUCCESS
}
