//! The identity provider's keys (`auth.jwt.jwks_url`): fetched over HTTPS
//! at startup, refreshed when the response's `Cache-Control: max-age` runs
//! out (`jwks_refresh_ms` without one) and when a token names a `kid` the
//! set does not hold — a rotation the gateway has not seen yet. What holds:
//!
//! - Keys rotate without a restart: a token signed with a new key is
//!   admitted once a fetch brings the key, at the latest after one fetch
//!   triggered by that token (`the_gateway_follows_the_providers_key_rotation`
//!   in tests/tests/security.rs).
//! - The provider is fetched at most once per `jwks_min_refresh_ms`
//!   whatever tokens arrive: a flood of random `kid`s is answered from the
//!   set in hand (`a_flood_of_unknown_kids_does_not_hammer_the_provider`
//!   in tests/tests/security.rs counts the requests the provider sees).
//! - A failed fetch keeps the last good set; readiness says so in its body
//!   (still 200: the pod can verify what it could before) and
//!   `switchyard_jwks_refreshes_total{result="error"}` counts it. Before
//!   the first good set readiness is 503: the gateway cannot verify a
//!   token, and handshakes carrying one are told to retry (1013).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounterVec, IntGauge};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsConnector;

use super::keys::{KeyError, KeySet};
use crate::task::AbortOnDrop;

/// Most bytes of a JWKS response: providers' sets are a few KiB.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// One fetch (connect, TLS, request, body) ends by then.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `max-age` followed: a provider saying "a year" still gets
/// asked daily.
const MAX_AGE_CAP: Duration = Duration::from_secs(86_400);
/// Retries after failed fetches back off from `jwks_min_refresh_ms` up to this.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// An `https://` JWKS endpoint, split for connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl {
    host: String,
    /// The name the provider's certificate must carry (checked once, here).
    server_name: ServerName<'static>,
    port: u16,
    /// `Host` header value.
    authority: String,
    path: String,
}

impl JwksUrl {
    /// Parses `url`, refusing anything but `https://host[:port]/path`.
    pub fn parse(url: &str) -> Result<JwksUrl, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err("must be an https:// URL: the keys decide who gets in".into());
        }
        let authority = uri.authority().ok_or("has no host")?;
        if authority.as_str().contains('@') {
            return Err("must not carry credentials".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err("has no host".into());
        }
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| format!("host {host}: {e}"))?;
        Ok(JwksUrl {
            server_name,
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_owned(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            host,
        })
    }
}

impl std::fmt::Display for JwksUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "https://{}{}", self.authority, self.path)
    }
}

/// `max-age` of a `Cache-Control` value, if it has one.
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let (name, value) = directive.trim().split_once('=')?;
        name.eq_ignore_ascii_case("max-age")
            .then(|| value.trim().trim_matches('"').parse().ok())
            .flatten()
            .map(Duration::from_secs)
    })
}

/// When the next scheduled fetch is due: the provider's `max-age` (or the
/// configured interval), never sooner than the rate limit allows nor later
/// than a day.
fn next_refresh(max_age: Option<Duration>, default: Duration, min: Duration) -> Duration {
    max_age.unwrap_or(default).clamp(min, MAX_AGE_CAP.max(min))
}

/// The metrics the refresher keeps.
#[derive(Clone)]
pub struct JwksMetrics {
    /// `switchyard_jwks_refreshes_total{result="ok|error"}`.
    pub refreshes: IntCounterVec,
    /// `switchyard_jwks_keys`: usable keys in the set in hand.
    pub keys: IntGauge,
    /// `switchyard_jwks_last_success_timestamp_seconds`.
    pub last_success: IntGauge,
}

#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    fetching: bool,
    /// Failed fetches since the last good one.
    failures: u32,
    last_error: Option<String>,
}

/// The provider's key set, and what the refresher knows of its fetches.
pub struct Jwks {
    url: JwksUrl,
    connector: TlsConnector,
    refresh: Duration,
    min_interval: Duration,
    current: RwLock<Option<Arc<KeySet>>>,
    state: Mutex<FetchState>,
    wake: Notify,
    /// Bumped after every fetch, good or not: handshakes waiting on a
    /// refresh learn it ended.
    fetched: watch::Sender<u64>,
}

impl Jwks {
    /// The key set at `url` (`auth.jwt.jwks_url`), trusting `ca_file`
    /// besides the system's CAs, refreshed every `refresh` when the provider
    /// names no `max-age`, fetched at most once per `min_interval`. Reads
    /// the CA file.
    pub fn new(
        url: &str,
        ca_file: Option<&str>,
        refresh: Duration,
        min_interval: Duration,
    ) -> Result<Jwks, KeyError> {
        let url = JwksUrl::parse(url).map_err(|message| KeyError::Parse {
            field: "auth.jwt.jwks_url",
            message,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        // The system's CAs, when it has any (a distroless image may not).
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_file {
            let field = "auth.jwt.jwks_ca_file";
            let parse = |message: String| KeyError::Parse { field, message };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| parse(format!("{path}: {e}")))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| parse(format!("{path}: {e}")))?;
            if certs.is_empty() {
                return Err(parse(format!("{path}: no certificate")));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| parse(format!("{path}: {e}")))?;
            }
        }
        if roots.is_empty() {
            return Err(KeyError::Parse {
                field: "auth.jwt.jwks_ca_file",
                message: "the system has no CA certificates: name the provider's CA here".into(),
            });
        }
        let mut tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Jwks {
            url,
            connector: TlsConnector::from(Arc::new(tls)),
            refresh,
            min_interval,
            current: RwLock::new(None),
            state: Mutex::new(FetchState::default()),
            wake: Notify::new(),
            fetched: watch::Sender::new(0),
        })
    }

    /// The set in hand, if a fetch ever succeeded.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For readiness: `Err` before the first good set (nothing can be
    /// verified), `Ok(Some(note))` while serving the last good set after
    /// failed fetches.
    pub fn health(&self) -> Result<Option<String>, String> {
        let state = self.state();
        let error = state.last_error.as_deref().unwrap_or("not fetched yet");
        if self.current().is_none() {
            return Err(format!("jwks: no key set from {} yet: {error}", self.url));
        }
        Ok((state.failures > 0).then(|| {
            format!(
                "jwks: serving the last good key set; {} fetches of {} failed: {error}",
                state.failures, self.url
            )
        }))
    }

    /// Whether a fetch may start now under the rate limit.
    fn may_fetch(&self, state: &FetchState) -> bool {
        state
            .last_attempt
            .is_none_or(|at| at.elapsed() >= self.min_interval)
    }

    /// Asks for a fetch now (a token named an unknown `kid`) and waits for
    /// it; `false` without waiting when the rate limit says the set in hand
    /// is recent enough. A fetch already running is waited for.
    pub async fn refresh_now(&self) -> bool {
        let mut fetched = self.fetched.subscribe();
        {
            let state = self.state();
            if !state.fetching && !self.may_fetch(&state) {
                return false;
            }
        }
        self.wake.notify_one();
        matches!(
            tokio::time::timeout(FETCH_TIMEOUT + Duration::from_secs(1), fetched.changed()).await,
            Ok(Ok(()))
        )
    }

    /// The refresher: fetches, then sleeps until the set is due or a
    /// handshake asks for a fetch the rate limit allows. Runs for the
    /// gateway's life.
    pub async fn run(self: Arc<Self>, metrics: JwksMetrics) {
        let mut retry = self.min_interval;
        loop {
            {
                let mut state = self.state();
                state.fetching = true;
                state.last_attempt = Some(Instant::now());
            }
            let result = tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {FETCH_TIMEOUT:?}")));
            let next = match result {
                Ok((set, max_age)) => {
                    metrics.refreshes.with_label_values(&["ok"]).inc();
                    metrics.keys.set(set.len() as i64);
                    let unix = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    metrics.last_success.set(unix as i64);
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
                    let mut state = self.state();
                    state.failures = 0;
                    state.last_error = None;
                    retry = self.min_interval;
                    next_refresh(max_age, self.refresh, self.min_interval)
                }
                Err(error) => {
                    metrics.refreshes.with_label_values(&["error"]).inc();
                    tracing::warn!(url = %self.url, %error, "JWKS fetch failed; the last good key set stays");
                    let mut state = self.state();
                    state.failures += 1;
                    state.last_error = Some(error);
                    let next = retry;
                    retry = (retry * 2).min(MAX_RETRY.max(self.min_interval));
                    next
                }
            };
            self.state().fetching = false;
            self.fetched.send_modify(|n| *n += 1);
            let due = tokio::time::Instant::now() + next;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => break,
                    () = self.wake.notified() => {
                        if self.may_fetch(&self.state()) {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// One GET of the set: its keys and the response's `max-age`.
    async fn fetch(&self) -> Result<(KeySet, Option<Duration>), String> {
        let tcp = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = self
            .connector
            .connect(self.url.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        // The connection's I/O runs beside the request; it ends with the
        // request (or is aborted with this future on a timeout).
        let io = AbortOnDrop(tokio::spawn(connection));
        let request = http::Request::get(self.url.path.as_str())
            .header(http::header::HOST, self.url.authority.as_str())
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("switchyard/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        if response.status() != http::StatusCode::OK {
            return Err(format!("HTTP status {}", response.status()));
        }
        let max_age = response
            .headers()
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(max_age);
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("body (at most {MAX_JWKS_BYTES} bytes): {e}"))?
            .to_bytes();
        drop(io);
        let set = KeySet::parse(&body, "auth.jwt.jwks_url", false).map_err(|e| e.to_string())?;
        Ok((set, max_age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_with_a_host_are_taken() {
        let ok = JwksUrl::parse("https://idp.example.com/.well-known/jwks.json").expect("ok");
        assert_eq!(
            (ok.host.as_str(), ok.port, ok.path.as_str()),
            ("idp.example.com", 443, "/.well-known/jwks.json")
        );
        let v6 = JwksUrl::parse("https://[::1]:8443/keys?x=1").expect("ok");
        assert_eq!(
            (
                v6.host.as_str(),
                v6.port,
                v6.path.as_str(),
                v6.authority.as_str()
            ),
            ("::1", 8443, "/keys?x=1", "[::1]:8443")
        );
        let table = [
            ("http://idp.example.com/keys", "https://"),
            ("idp.example.com/keys", "not a URL"),
            ("//idp.example.com/keys", "https://"),
            ("https://user:pw@idp.example.com/keys", "credentials"),
            ("", "not a URL"),
            ("https:///keys", "not a URL"),
            ("ftp://idp/keys", "https://"),
        ];
        for (url, expected) in table {
            let err = JwksUrl::parse(url).expect_err(url);
            assert!(err.contains(expected), "{url}: {err}");
        }
    }

    #[test]
    fn max_age_is_read_from_cache_control() {
        let table = [
            ("max-age=300", Some(300)),
            ("public, max-age=21600, must-revalidate", Some(21600)),
            ("Max-Age=\"60\"", Some(60)),
            ("no-cache", None),
            ("max-age=", None),
            ("max-age=-5", None),
            ("s-maxage=99", None),
            ("", None),
        ];
        for (header, expected) in table {
            assert_eq!(
                max_age(header),
                expected.map(Duration::from_secs),
                "{header}"
            );
        }
    }

    #[test]
    fn the_schedule_follows_max_age_within_the_rate_limit() {
        let s = Duration::from_secs;
        let table = [
            (Some(s(600)), s(300), s(10), s(600)),
            (None, s(300), s(10), s(300)),
            (Some(s(0)), s(300), s(10), s(10)),
            (Some(s(86_400 * 365)), s(300), s(10), s(86_400)),
        ];
        for (max_age, default, min, expected) in table {
            assert_eq!(next_refresh(max_age, default, min), expected, "{max_age:?}");
        }
    }
}
