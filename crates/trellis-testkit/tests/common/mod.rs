//! Shared by the test files: every wait is bounded.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

/// The bound on any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than [`WAIT`].
pub async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(WAIT, f).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// The path of curl, or `None` (with a printed note) when the machine has none.
pub fn curl() -> Option<&'static str> {
    const CURL: &str = "/usr/bin/curl";
    if std::path::Path::new(CURL).exists() {
        Some(CURL)
    } else {
        println!("note: {CURL} not found; skipping the curl half of this test");
        None
    }
}

/// Runs curl with `args` (plus a 10 s `--max-time`) off the async threads; returns stdout,
/// stderr and success.
pub async fn run_curl(curl: &'static str, args: Vec<String>) -> (String, String, bool) {
    let out = bounded(
        "curl",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(curl)
                .args(["--silent", "--show-error", "--max-time", "10"])
                .args(&args)
                .output()
        }),
    )
    .await
    .expect("curl task")
    .expect("running curl");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}
