//! The processes under test: the gateway and operator binaries (ephemeral
//! ports, JSON logs, signals, exit), what /proc says of a process, the
//! open-file limit, and the Python venv the test command creates.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use switchyard_protocol::admin::PublishResponse;
use switchyard_protocol::Position;

use crate::http::http_request;
use crate::metrics::metric_value;

/// The gateway binary built by this package (`src/bin/sy-gateway.rs`), next
/// to the test executable's `deps/` directory.
pub fn gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    dir.join("sy-gateway")
}

/// The operator binary built by this package (`src/bin/sy-operator.rs`).
pub fn operator_bin() -> PathBuf {
    gateway_bin().with_file_name("sy-operator")
}

/// A running gateway process. Killed when dropped.
pub struct GatewayProcess {
    child: Child,
    /// The public listener.
    pub public: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts a gateway with `--set` overrides, on ephemeral ports, with JSON logs.
    pub fn start(settings: &[&str]) -> Result<GatewayProcess> {
        Self::start_with(settings, &[])
    }

    /// Like [`Self::start`], with extra environment variables.
    pub fn start_with(settings: &[&str], env: &[(&str, &str)]) -> Result<GatewayProcess> {
        let mut command = Command::new(gateway_bin());
        command
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for setting in settings {
            command.args(["--set", setting]);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {}", gateway_bin().display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (found, addresses) = mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                        if event["message"] == "gateway listening" {
                            let parse =
                                |key: &str| event[key].as_str().and_then(|a| a.parse().ok());
                            if let (Some(public), Some(admin)) = (parse("public"), parse("admin")) {
                                let _ = found.send((public, admin));
                            }
                        }
                    }
                    logs.lock().expect("logs").push(line);
                }
            });
        }
        match addresses.recv_timeout(Duration::from_secs(20)) {
            Ok((public, admin)) => Ok(GatewayProcess {
                child,
                public,
                admin,
                logs,
            }),
            Err(_) => {
                let _ = child.kill();
                let logs = logs.lock().expect("logs").join("\n");
                bail!("gateway did not start listening:\n{logs}")
            }
        }
    }

    /// `ws://…/ws` of this gateway.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size of the gateway process, in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        Ok(switchyard_host::rss_kib(self.pid())?)
    }

    /// Log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs").clone()
    }

    /// Sends SIGTERM (the gateway drains, then exits).
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Kills the gateway with SIGKILL (a crash, an OOM kill): no close
    /// frame, no drain; its clients see their sockets end.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGINT (the gateway closes everything with 1001 and exits).
    pub fn interrupt(&self) {
        self.signal(libc::SIGINT);
    }

    fn signal(&self, signal: libc::c_int) {
        let _ = send_signal(self.child.id(), signal);
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// An HTTP request to the admin listener: (status, body).
    pub fn admin_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String)> {
        http_request(self.admin, method, path, body)
    }

    /// Publishes through `POST /api/publish`; `data` is JSON text.
    pub fn publish(&self, topic: &str, data: &str) -> Result<Position> {
        let body = format!(
            r#"{{"topic":{},"data":{data}}}"#,
            serde_json::to_string(topic)?
        );
        let (status, text) = self.admin_request("POST", "/api/publish", Some(&body))?;
        if status != 200 {
            bail!("publish answered {status}: {text}");
        }
        let response: PublishResponse = serde_json::from_str(&text)?;
        Ok(response.position)
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        let (status, text) = http_request(self.public, "GET", "/metrics", None)?;
        if status != 200 {
            bail!("metrics answered {status}");
        }
        Ok(text)
    }

    /// One sample of `/metrics`, e.g. `switchyard_connections` or
    /// `switchyard_connections_closed_total{code="1000",initiator="client"}`; 0 when absent.
    pub fn metric(&self, series: &str) -> Result<f64> {
        Ok(metric_value(&self.metrics()?, series))
    }

    /// Polls `series` until it equals `expected` or `timeout` passes; returns the last value.
    pub fn wait_metric(&self, series: &str, expected: f64, timeout: Duration) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric(series)?;
            if value == expected || Instant::now() > deadline {
                return Ok(value);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python virtual environment the test command creates (`websockets` installed).
pub fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join(".venv/bin/python")
}

/// The resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    Ok(switchyard_host::rss_kib(pid)?)
}

pub use switchyard_host::raise_fd_limit;

/// Sends `signal` to the process `pid` (a child a test started).
pub fn send_signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill(2) with a pid and a valid signal number has no memory effects.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
