//! Processes in pods: started in a network namespace with their output in a log file,
//! restarted with backoff when they exit, stopped with SIGTERM then SIGKILL.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// The first wait before a restart; it doubles up to [`MAX_BACKOFF`], and starts over
/// once a process has run for [`STEADY`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STEADY: Duration = Duration::from_secs(10);

/// A supervised process.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for people (`reviews-v1-0/app`).
    pub name: String,
    pub netns: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// Its stdout and stderr, appended.
    pub log: PathBuf,
    /// How many times it was started again after exiting.
    pub restarts: u32,
    child: Option<Child>,
    started: Instant,
    next_start: Option<Instant>,
    backoff: Duration,
    /// Its last exit, for people (`exit status: 1`).
    pub last_exit: Option<String>,
}

impl Proc {
    pub fn new(name: String, netns: String, argv: Vec<String>, log: PathBuf) -> Proc {
        Proc {
            name,
            netns,
            argv,
            env: Vec::new(),
            cwd: None,
            log,
            restarts: 0,
            child: None,
            started: Instant::now(),
            next_start: Some(Instant::now()),
            backoff: FIRST_BACKOFF,
            last_exit: None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it (in its namespace, through `ip netns exec`, which also mounts the pod's
    /// hosts file).
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("{}", self.log.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .args(&self.argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("{}: cannot start {:?}", self.name, self.argv))?;
        self.child = Some(child);
        self.started = Instant::now();
        self.next_start = None;
        Ok(())
    }

    /// Notices an exit (and schedules the restart), or starts it when its restart is
    /// due. Returns what happened, for the log.
    pub fn tick(&mut self) -> Option<String> {
        if let Some(child) = &mut self.child {
            let Ok(Some(status)) = child.try_wait() else {
                return None;
            };
            self.child = None;
            if self.started.elapsed() >= STEADY {
                self.backoff = FIRST_BACKOFF;
            }
            let wait = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            self.next_start = Some(Instant::now() + wait);
            self.last_exit = Some(status.to_string());
            return Some(format!(
                "{} exited ({status}); restarting in {}s",
                self.name,
                wait.as_secs()
            ));
        }
        match self.next_start {
            Some(at) if Instant::now() >= at => match self.start() {
                Ok(()) => {
                    if self.last_exit.is_some() {
                        self.restarts += 1;
                    }
                    None
                }
                Err(e) => {
                    self.next_start = Some(Instant::now() + self.backoff);
                    Some(format!("{e:#}"))
                }
            },
            _ => None,
        }
    }

    /// Stops it: SIGTERM, then SIGKILL after `grace`; it is not restarted.
    pub fn stop(&mut self, grace: Duration) {
        self.next_start = None;
        let Some(mut child) = self.child.take() else {
            return;
        };
        crate::net::signal(&[child.id()], "TERM");
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
