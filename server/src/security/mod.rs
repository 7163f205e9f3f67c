//! Handshake security and session lifetime; see docs/security.md for the
//! threat model. Pure parts, each tested as tables:
//! - [`origin`]: the Origin allow-list (cross-site WebSocket hijacking).
//! - [`token`]: JWT verification; [`keys`]: key sets from a JWKS; [`jwks`]:
//!   the identity provider's keys, fetched and refreshed.
//! - [`tickets`]: single-use tickets for `?ticket=`.
//! - [`auth`]: which credential a handshake carries, and the session it opens;
//!   revocations; the admin listener's bearer token.
//! - [`expiry`]: when each session ends (one ordered set for the gateway).
//! - [`ratelimit`]: token buckets (handshakes per IP, publishes per connection).

pub mod auth;
pub mod browser;
pub mod expiry;
pub mod jwks;
pub mod keys;
pub mod origin;
pub mod ratelimit;
pub mod shed;
pub mod tickets;
pub mod token;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use switchyard_protocol::topic::TopicPattern;

/// How a session was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No credential; `auth.anonymous` admitted it.
    Anonymous,
    /// A JWT in the session cookie.
    Cookie,
    /// A JWT in `Authorization: Bearer`.
    Bearer,
    /// A single-use ticket in `?ticket=`.
    Ticket,
}

impl AuthMethod {
    /// The log word.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Anonymous => "anonymous",
            AuthMethod::Cookie => "cookie",
            AuthMethod::Bearer => "bearer",
            AuthMethod::Ticket => "ticket",
        }
    }
}

/// Who is on a connection and what they may do, for as long as the
/// connection lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The subject (`sub`); `None` for anonymous sessions.
    pub subject: Option<String>,
    /// How the session was authenticated.
    pub method: AuthMethod,
    /// Unix milliseconds at which the session expires (closed with 4001).
    pub expires_at_ms: Option<u64>,
    /// Topic patterns the session may subscribe to (the configured default
    /// is one allocation shared by every session that uses it).
    pub subscribe: Arc<[TopicPattern]>,
    /// Topic patterns the session may publish on.
    pub publish: Arc<[TopicPattern]>,
}

impl Session {
    /// Whether the session may subscribe to `topic`.
    pub fn may_subscribe(&self, topic: &str) -> bool {
        self.subscribe.iter().any(|p| p.matches(topic))
    }

    /// Whether the session may publish on `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|p| p.matches(topic))
    }
}

/// The longest session subject (`sub`) a token or ticket may carry: it is a
/// key of the revocation list and of every connection, and appears in logs.
pub const MAX_SUBJECT_BYTES: usize = 256;

/// Checks a session subject: 1 to [`MAX_SUBJECT_BYTES`] bytes. The one rule
/// for tokens and tickets alike.
pub fn check_subject(sub: &str) -> Result<(), String> {
    if sub.is_empty() || sub.len() > MAX_SUBJECT_BYTES {
        return Err(format!("sub must be 1 to {MAX_SUBJECT_BYTES} bytes"));
    }
    Ok(())
}

/// Topic patterns from strings.
pub fn pattern_list(list: &[String]) -> Arc<[TopicPattern]> {
    list.iter().map(TopicPattern::new).collect()
}

/// Patterns from a token or ticket, or the configured default when absent.
pub fn patterns(given: Option<&[String]>, default: &Arc<[TopicPattern]>) -> Arc<[TopicPattern]> {
    given.map_or_else(|| default.clone(), pattern_list)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A request target for logs: the path with every query value replaced, so
/// tickets and tokens given in URLs never reach a log line. Formatted only
/// when a log line is actually written: an accepted handshake pays nothing.
#[derive(Debug, Clone, Copy)]
pub struct RedactedTarget<'a> {
    /// The path.
    pub path: &'a str,
    /// The query, if any.
    pub query: Option<&'a str>,
}

impl std::fmt::Display for RedactedTarget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path)?;
        let Some(query) = self.query.filter(|q| !q.is_empty()) else {
            return Ok(());
        };
        for (i, pair) in query.split('&').enumerate() {
            f.write_str(if i == 0 { "?" } else { "&" })?;
            match pair.split_once('=') {
                Some((name, _)) => write!(f, "{name}=REDACTED")?,
                None => f.write_str("REDACTED")?,
            }
        }
        Ok(())
    }
}

/// A header map from static pairs, for table tests.
#[cfg(test)]
pub(crate) fn header_map(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, http::HeaderValue::from_static(value));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_redacted() {
        let table = [
            ("/ws", None, "/ws"),
            ("/ws", Some(""), "/ws"),
            ("/ws", Some("ticket=abc123"), "/ws?ticket=REDACTED"),
            (
                "/ws",
                Some("ticket=abc&x=1&token"),
                "/ws?ticket=REDACTED&x=REDACTED&REDACTED",
            ),
        ];
        for (path, query, expected) in table {
            assert_eq!(RedactedTarget { path, query }.to_string(), expected);
        }
    }

    #[test]
    fn session_patterns() {
        let default = pattern_list(&["public.*".to_string()]);
        let session = Session {
            subject: Some("alice".into()),
            method: AuthMethod::Bearer,
            expires_at_ms: None,
            subscribe: patterns(Some(&["chat.*".to_string()]), &default),
            publish: patterns(None, &pattern_list(&[])),
        };
        assert!(session.may_subscribe("chat.room1"));
        assert!(
            !session.may_subscribe("public.news"),
            "the token's list replaces the default"
        );
        assert!(!session.may_publish("chat.room1"));
        assert!(patterns(None, &default)[0].matches("public.news"));
    }
}
