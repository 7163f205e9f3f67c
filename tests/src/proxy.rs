//! The Service stand-in: a switchable L4 proxy that records opens and
//! closes per backend, and a blue/green fleet of gateways behind it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::http::wait_status;
use crate::process::{raise_fd_limit, GatewayProcess};
use crate::redis::RedisServer;

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

/// Whether a connection from a peer may reach a backend (the network
/// plugin's NetworkPolicy decision, in the emulator).
pub type Admission = Arc<dyn Fn(SocketAddr, SocketAddr) -> bool + Send + Sync>;

#[derive(Default)]
struct ProxyState {
    backends: Vec<SocketAddr>,
    admission: Option<Admission>,
    refused: usize,
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

    /// From now on, a new connection reaches its backend only if `admit`
    /// says so; otherwise it is closed at once and counted.
    pub fn set_admission(&self, admit: Admission) {
        self.state.lock().expect("proxy state").admission = Some(admit);
    }

    /// Connections the admission check closed.
    pub fn refused(&self) -> usize {
        self.state.lock().expect("proxy state").refused
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
        let Ok((mut inbound, peer)) = listener.accept().await else {
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
            if s.admission
                .as_ref()
                .is_some_and(|admit| !admit(peer, backend))
            {
                s.refused += 1;
                continue;
            }
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
