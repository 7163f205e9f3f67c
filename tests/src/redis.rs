//! Private `redis-server` instances (Debian package) on free loopback ports.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::certs::TestCertificates;

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

    /// Stops the server with SIGSTOP: connections stay open and nothing is
    /// answered (a Redis stuck in a long command or a fork, or a partition).
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let child = self.child.as_ref().context("redis is not running")?;
        crate::send_signal(child.id(), signal).context("kill")
    }

    /// Starts the server again on the same port (empty).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.resume();
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
