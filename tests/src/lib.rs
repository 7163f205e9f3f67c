//! Test support for Switchyard's end-to-end tests: real gateway processes on
//! ephemeral loopback ports, a minimal HTTP client for the admin API, and a
//! raw WebSocket framer for sending what no well-behaved client would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use switchyard_protocol::admin::PublishResponse;
use switchyard_protocol::Position;

pub mod kube;
pub mod otlp;

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
        rss_kib(self.pid())
    }

    /// Log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs").clone()
    }

    /// Sends SIGTERM (the gateway drains, then exits).
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends SIGINT (the gateway closes everything with 1001 and exits).
    pub fn interrupt(&self) {
        self.signal(libc::SIGINT);
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
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

/// The value of one series in Prometheus text, 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Resident set size of a process, in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

/// A one-shot HTTP/1.1 request (`Connection: close`): (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    http_request_with(addr, method, path, &[], body)
}

/// Like [`http_request`], with extra request headers.
pub fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, payload) = text.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let payload = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(payload)
    } else {
        payload.to_owned()
    };
    Ok((status, payload))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// A WebSocket spoken by hand, for sending frames no library would send.
pub struct RawSocket {
    stream: TcpStream,
}

/// Opcodes of RFC 6455.
pub mod opcode {
    /// Text frame.
    pub const TEXT: u8 = 0x1;
    /// Binary frame.
    pub const BINARY: u8 = 0x2;
    /// Close frame.
    pub const CLOSE: u8 = 0x8;
}

impl RawSocket {
    /// Connects and completes the upgrade handshake on `path`.
    pub fn connect(addr: SocketAddr, path: &str) -> Result<RawSocket> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        if !head.starts_with("HTTP/1.1 101") {
            bail!("upgrade refused: {head}");
        }
        Ok(RawSocket { stream })
    }

    /// A second handle on the underlying TCP stream, for reading raw bytes.
    pub fn try_clone_stream(&self) -> Result<TcpStream> {
        Ok(self.stream.try_clone()?)
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Sends one masked frame with the FIN bit set.
    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        self.send_bytes(&client_frame(opcode, payload))
    }

    /// Reads server frames until a close frame; returns its code (1005 if
    /// none) or `None` if the socket ends first.
    pub fn read_close_code(&mut self) -> Result<Option<u16>> {
        loop {
            let mut header = [0u8; 2];
            if self.stream.read_exact(&mut header).is_err() {
                return Ok(None);
            }
            let opcode = header[0] & 0x0f;
            let len = match header[1] & 0x7f {
                126 => {
                    let mut ext = [0u8; 2];
                    self.stream.read_exact(&mut ext)?;
                    u16::from_be_bytes(ext) as usize
                }
                127 => {
                    let mut ext = [0u8; 8];
                    self.stream.read_exact(&mut ext)?;
                    u64::from_be_bytes(ext) as usize
                }
                short => short as usize,
            };
            let mut payload = vec![0u8; len];
            self.stream.read_exact(&mut payload)?;
            if opcode == opcode::CLOSE {
                return Ok(Some(if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                }));
            }
        }
    }
}

/// Encodes a masked client frame (FIN set).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=65535 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The Python virtual environment the test command creates (`websockets` installed).
pub fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join(".venv/bin/python")
}

/// A test CA and a server certificate for 127.0.0.1 it signed, made with
/// the `openssl` CLI (PEM files).
pub struct TestCertificates {
    /// The CA certificate: what clients trust.
    pub ca: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl TestCertificates {
    /// Creates the files in `dir`.
    pub fn create(dir: &std::path::Path) -> Result<TestCertificates> {
        std::fs::create_dir_all(dir)?;
        let openssl = |args: &[&str]| -> Result<()> {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()?;
            if !output.status.success() {
                bail!(
                    "openssl {args:?}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            Ok(())
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=switchyard-test-ca",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])?;
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ])?;
        Ok(TestCertificates {
            ca: dir.join("ca.crt"),
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
        })
    }
}

/// A private `redis-server` (Debian package) on a free loopback port, with no
/// persistence: killing it loses every topic log, as a flushed backplane would.
pub struct RedisServer {
    child: Option<Child>,
    /// The plain-text port (kept across restarts).
    pub port: u16,
    /// The TLS port, when started with [`RedisServer::start_tls`].
    pub tls_port: Option<u16>,
    dir: PathBuf,
    args: Vec<String>,
}

fn free_port() -> Result<u16> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?.port())
}

impl RedisServer {
    /// Starts an instance and waits until it answers PING.
    pub fn start() -> Result<RedisServer> {
        Self::start_with(&[])
    }

    /// Starts an instance with extra `redis-server` arguments (e.g. `--requirepass`).
    pub fn start_with(extra: &[&str]) -> Result<RedisServer> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("sy-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut server = RedisServer {
            child: None,
            port,
            tls_port: None,
            dir,
            args: extra.iter().map(|a| a.to_string()).collect(),
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts an instance that also listens with TLS, with a certificate for
    /// 127.0.0.1 signed by a fresh test CA (made with the `openssl` CLI).
    /// Returns the server and the CA's PEM file.
    pub fn start_tls() -> Result<(RedisServer, PathBuf)> {
        let port = free_port()?;
        let tls_port = free_port()?;
        let dir = std::env::temp_dir().join(format!("sy-redis-tls-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let certs = TestCertificates::create(&dir)?;
        let path = |p: &PathBuf| p.display().to_string();
        let args = vec![
            "--tls-port".to_owned(),
            tls_port.to_string(),
            "--tls-cert-file".to_owned(),
            path(&certs.cert),
            "--tls-key-file".to_owned(),
            path(&certs.key),
            "--tls-ca-cert-file".to_owned(),
            path(&certs.ca),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        let ca = certs.ca;
        let mut server = RedisServer {
            child: None,
            port,
            tls_port: Some(tls_port),
            dir,
            args,
        };
        server.spawn()?;
        Ok((server, ca))
    }

    fn spawn(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(&self.args)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning redis-server (the test command installs it: apt-get install redis-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("redis-server on port {} did not answer PING", self.port)
    }

    fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        // A server with a password answers -NOAUTH: it is up all the same.
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && (&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL: no goodbye to its clients, no data kept.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `GET path` on a listener until it answers `status`, at most `timeout`.
pub fn wait_status(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if http_request(addr, "GET", path, None).is_ok_and(|(s, _)| s == status) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

impl RedisServer {
    /// Runs `redis-cli` against this server and returns its trimmed output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .context("running redis-cli")?;
        if !output.status.success() {
            bail!(
                "redis-cli {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

/// A switchable L4 proxy standing in for a Kubernetes Service: new
/// connections go to the current backend set (round robin); established ones
/// stay where they are, as with kube-proxy. It records when connections to
/// each backend open and close, to measure reconnect and close rates.
pub struct ServiceProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    backends: Vec<SocketAddr>,
    next: usize,
    started: Option<Instant>,
    opened: Vec<(SocketAddr, u64)>,
    closed: Vec<(SocketAddr, u64)>,
}

impl ServiceProxy {
    /// Starts the proxy on an ephemeral loopback port.
    pub async fn start(backends: Vec<SocketAddr>) -> Result<ServiceProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(ProxyState {
            backends,
            started: Some(Instant::now()),
            ..ProxyState::default()
        }));
        let accept = tokio::spawn(proxy_accept(listener, state.clone()));
        Ok(ServiceProxy {
            addr,
            state,
            accept,
        })
    }

    /// `ws://proxy/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Routes new connections to `backends` from now on.
    pub fn switch(&self, backends: Vec<SocketAddr>) {
        let mut state = self.state.lock().expect("proxy state");
        state.backends = backends;
        state.next = 0;
    }

    /// Milliseconds (since the proxy started) at which connections to
    /// `backend` closed.
    pub fn closes(&self, backend: SocketAddr) -> Vec<u64> {
        let state = self.state.lock().expect("proxy state");
        state
            .closed
            .iter()
            .filter(|(b, _)| *b == backend)
            .map(|(_, t)| *t)
            .collect()
    }

    /// Milliseconds (since the proxy started) at which connections to `backend` opened.
    pub fn opens(&self, backend: SocketAddr) -> Vec<u64> {
        let state = self.state.lock().expect("proxy state");
        state
            .opened
            .iter()
            .filter(|(b, _)| *b == backend)
            .map(|(_, t)| *t)
            .collect()
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn proxy_now(state: &ProxyState) -> u64 {
    state.started.map_or(0, |s| s.elapsed().as_millis() as u64)
}

async fn proxy_accept(listener: tokio::net::TcpListener, state: Arc<Mutex<ProxyState>>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let backend = {
            let mut s = state.lock().expect("proxy state");
            if s.backends.is_empty() {
                continue;
            }
            let backend = s.backends[s.next % s.backends.len()];
            s.next += 1;
            backend
        };
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            {
                let mut s = state.lock().expect("proxy state");
                let now = proxy_now(&s);
                s.opened.push((backend, now));
            }
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            let mut s = state.lock().expect("proxy state");
            let now = proxy_now(&s);
            s.closed.push((backend, now));
        });
    }
}

/// Raises this process's open-file limit to its hard limit (tests that hold
/// thousands of sockets).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a pointer to a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Blue and green gateway processes (`server_id` blue / green) on one
/// private Redis, with a [`ServiceProxy`] routing to blue.
pub struct BlueGreen {
    /// The shared backplane.
    pub redis: RedisServer,
    /// The gateway being drained.
    pub blue: GatewayProcess,
    /// The gateway taking over.
    pub green: GatewayProcess,
    /// The Service.
    pub proxy: ServiceProxy,
}

impl BlueGreen {
    /// Starts the fleet; `blue_settings` apply to blue only.
    pub async fn start(blue_settings: &[&str]) -> Result<BlueGreen> {
        raise_fd_limit();
        let redis = RedisServer::start()?;
        let url = format!("redis.url={}", redis.url());
        let mut settings = vec!["broker=redis", url.as_str(), "worker_threads=1"];
        let green = GatewayProcess::start(&[settings.as_slice(), &["server_id=green"]].concat())?;
        settings.push("server_id=blue");
        settings.extend_from_slice(blue_settings);
        let blue = GatewayProcess::start(&settings)?;
        for gw in [&blue, &green] {
            if !wait_status(gw.public, "/readyz", 200, Duration::from_secs(30)) {
                bail!("gateway on {} never became ready", gw.public);
            }
        }
        let proxy = ServiceProxy::start(vec![blue.public]).await?;
        Ok(BlueGreen {
            redis,
            blue,
            green,
            proxy,
        })
    }
}

/// How long a test waits for any one expected frame.
pub const STEP: Duration = Duration::from_secs(15);

/// The next frame on `conn`, panicking on a close or after [`STEP`].
pub async fn next_frame(
    conn: &mut switchyard_client::Connection,
) -> switchyard_protocol::ServerFrame {
    match tokio::time::timeout(STEP, conn.next_event()).await {
        Ok(Ok(switchyard_client::Event::Frame(frame))) => frame,
        other => panic!("expected a frame, got {other:?}"),
    }
}
