//! Keeping web pages off the admin listener. A page the operator of a
//! gateway happens to visit can send a "simple" cross-site request (a POST
//! with `text/plain`, no preflight) to `127.0.0.1:9090`, or rebind its own
//! name to that address and read the answers. Neither needs the admin
//! token when none is configured (the loopback default). So the admin
//! listener refuses what only browsers send, whatever the token setting:
//!
//! - an `Origin` header, or any `Sec-Fetch-*` header (fetch metadata, which
//!   every current browser adds and no API client does);
//! - a `Host` that is not an address (IP literal or `localhost`, with or
//!   without a port) or a name in `admin.allowed_hosts` — a rebinding page
//!   always sends its own name. Off loopback, where the bearer token keeps
//!   pages out, names are checked only once `admin.allowed_hosts` lists
//!   some (a Service name, for clients that call one);
//! - a body that is not JSON on a route that takes one (`POST`): a simple
//!   cross-site request cannot send `application/json`.

use http::{HeaderMap, Method};

/// Why a request to the admin listener was refused: the
/// `switchyard_admin_refused_total{reason}` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrowserRefusal {
    /// An `Origin` header.
    Origin,
    /// A `Sec-Fetch-*` header.
    FetchMetadata,
    /// A `Host` that is not the listener's address nor an allowed name.
    Host,
    /// A `POST` whose body is not declared JSON.
    ContentType,
}

impl BrowserRefusal {
    /// Every label, to start the counter at zero.
    pub const ALL: [BrowserRefusal; 4] = [
        BrowserRefusal::Origin,
        BrowserRefusal::FetchMetadata,
        BrowserRefusal::Host,
        BrowserRefusal::ContentType,
    ];

    /// The metric label and the answer's `error` field.
    pub fn as_str(self) -> &'static str {
        match self {
            BrowserRefusal::Origin => "origin",
            BrowserRefusal::FetchMetadata => "fetch_metadata",
            BrowserRefusal::Host => "host",
            BrowserRefusal::ContentType => "content_type",
        }
    }

    /// What the refused client is told.
    pub fn message(self) -> &'static str {
        match self {
            BrowserRefusal::Origin | BrowserRefusal::FetchMetadata => {
                "the admin API does not answer web pages"
            }
            BrowserRefusal::Host => {
                "Host must be the listener's address or a name in admin.allowed_hosts"
            }
            BrowserRefusal::ContentType => "send the body as Content-Type: application/json",
        }
    }
}

/// Judges one admin request's headers. `on_loopback`: the admin listener is
/// on a loopback address.
pub fn refusal(
    method: &Method,
    headers: &HeaderMap,
    allowed_hosts: &[String],
    on_loopback: bool,
) -> Option<BrowserRefusal> {
    if headers.contains_key(http::header::ORIGIN) {
        return Some(BrowserRefusal::Origin);
    }
    if headers
        .keys()
        .any(|name| name.as_str().starts_with("sec-fetch-"))
    {
        return Some(BrowserRefusal::FetchMetadata);
    }
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_allowed(host, allowed_hosts, on_loopback) {
        return Some(BrowserRefusal::Host);
    }
    if method == Method::POST {
        let json = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Some(BrowserRefusal::ContentType);
        }
    }
    None
}

fn host_allowed(host: &str, allowed: &[String], on_loopback: bool) -> bool {
    let name = strip_port(host);
    if name.eq_ignore_ascii_case("localhost") || is_ip_literal(name) {
        return true;
    }
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
        return true;
    }
    // Off loopback the bearer token keeps pages out; names are checked
    // once some are configured.
    !on_loopback && allowed.is_empty() && !name.is_empty()
}

/// `host[:port]` or `[v6][:port]` without the port.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

fn is_ip_literal(name: &str) -> bool {
    name.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("value"));
        }
        map
    }

    /// (method, headers, allowed hosts, on loopback) -> refusal
    type Row<'a> = (
        &'a Method,
        Vec<(&'static str, &'a str)>,
        &'a [&'a str],
        bool,
        Option<BrowserRefusal>,
    );

    #[test]
    fn what_a_browser_sends_is_refused_and_api_clients_pass() {
        use BrowserRefusal::*;
        let json = ("content-type", "application/json");
        let local = ("host", "127.0.0.1:9090");
        let post = Method::POST;
        let get = Method::GET;
        let table: Vec<Row> = vec![
            // what curl, the operator and the tests send
            (&post, vec![local, json], &[], true, None),
            (
                &post,
                vec![
                    ("host", "localhost:9090"),
                    ("content-type", "application/json; charset=utf-8"),
                ],
                &[],
                true,
                None,
            ),
            (&get, vec![("host", "[::1]:9090")], &[], true, None),
            (&get, vec![("host", "10.0.3.7:9090")], &[], false, None),
            // a cross-site page: Origin, fetch metadata, a simple content type
            (
                &post,
                vec![local, json, ("origin", "https://evil.example")],
                &[],
                true,
                Some(Origin),
            ),
            (
                &post,
                vec![local, json, ("origin", "null")],
                &[],
                true,
                Some(Origin),
            ),
            (
                &get,
                vec![local, ("sec-fetch-site", "cross-site")],
                &[],
                true,
                Some(FetchMetadata),
            ),
            (
                &get,
                vec![local, ("sec-fetch-mode", "no-cors")],
                &[],
                true,
                Some(FetchMetadata),
            ),
            (
                &post,
                vec![local, ("content-type", "text/plain")],
                &[],
                true,
                Some(ContentType),
            ),
            (
                &post,
                vec![local, ("content-type", "application/x-www-form-urlencoded")],
                &[],
                true,
                Some(ContentType),
            ),
            (&post, vec![local], &[], true, Some(ContentType)),
            (
                &post,
                vec![local, ("content-type", "application/jsonx")],
                &[],
                true,
                Some(ContentType),
            ),
            // DNS rebinding: the page's own name in Host
            (
                &get,
                vec![("host", "rebind.evil.example:9090")],
                &[],
                true,
                Some(Host),
            ),
            (&get, vec![("host", "")], &[], true, Some(Host)),
            (&get, vec![], &[], true, Some(Host)),
            (
                &get,
                vec![("host", "chat-preview:9090")],
                &["chat-preview"],
                true,
                None,
            ),
            (
                &get,
                vec![("host", "CHAT-preview")],
                &["chat-preview"],
                false,
                None,
            ),
            (&get, vec![("host", "chat-preview:9090")], &[], false, None),
            (
                &get,
                vec![("host", "evil.example:9090")],
                &["chat-preview"],
                false,
                Some(Host),
            ),
        ];
        for (method, pairs, allowed, on_loopback, expected) in table {
            let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                refusal(method, &headers(&pairs), &allowed, on_loopback),
                expected,
                "{method} {pairs:?} allowed {allowed:?} loopback {on_loopback}"
            );
        }
    }
}
