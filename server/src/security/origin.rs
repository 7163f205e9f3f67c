//! The Origin check against cross-site WebSocket hijacking.
//!
//! Browsers attach cookies to a WebSocket handshake whatever page opens it,
//! and the same-origin policy does not apply to WebSockets: without this
//! check, any site a user visits could open a socket with the user's session.
//! Browsers always send `Origin` on a WebSocket handshake and scripts cannot
//! forge it, so checking it is the defence.

/// Why an Origin was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginRejection {
    /// The request had no `Origin` and `origin.allow_missing` is false.
    Missing,
    /// The Origin is not allowed.
    NotAllowed,
}

impl OriginRejection {
    /// The `handshakes_rejected` reason label.
    pub fn reason(self) -> &'static str {
        match self {
            OriginRejection::Missing => "origin_missing",
            OriginRejection::NotAllowed => "origin_not_allowed",
        }
    }
}

/// One allow-list entry: `https://app.example.com` or `https://*.example.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AllowedOrigin {
    Exact(String),
    /// Scheme with `://` and the suffix after `*`, both lowercase:
    /// (`https://`, `.example.com`) or with a port (`.example.com:8443`).
    Subdomains {
        scheme: String,
        suffix: String,
    },
}

/// The origin policy of the public listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    allowed: Vec<AllowedOrigin>,
    allow_same_host: bool,
    allow_missing: bool,
}

/// An allow-list entry that cannot be an origin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not an origin: {why}")]
pub struct BadOriginEntry {
    /// The entry as configured.
    pub entry: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl OriginPolicy {
    /// Builds the policy. `allowed` holds exact origins (`scheme://host[:port]`)
    /// and wildcard entries (`scheme://*.domain[:port]`); `allow_same_host`
    /// also admits an Origin whose host and port equal the request's `Host`;
    /// `allow_missing` admits requests without `Origin` (non-browser clients).
    pub fn new(
        allowed: &[String],
        allow_same_host: bool,
        allow_missing: bool,
    ) -> Result<OriginPolicy, BadOriginEntry> {
        let allowed = allowed
            .iter()
            .map(|entry| parse_entry(entry))
            .collect::<Result<_, _>>()?;
        Ok(OriginPolicy {
            allowed,
            allow_same_host,
            allow_missing,
        })
    }

    /// Checks the `Origin` header of a handshake whose `Host` header is `host`.
    pub fn check(&self, origin: Option<&str>, host: Option<&str>) -> Result<(), OriginRejection> {
        let Some(origin) = origin else {
            return if self.allow_missing {
                Ok(())
            } else {
                Err(OriginRejection::Missing)
            };
        };
        let origin = origin.trim().to_ascii_lowercase();
        if self.allow_same_host && same_host(&origin, host) {
            return Ok(());
        }
        let allowed = self.allowed.iter().any(|entry| match entry {
            AllowedOrigin::Exact(exact) => *exact == origin,
            AllowedOrigin::Subdomains { scheme, suffix } => origin
                .strip_prefix(scheme.as_str())
                .and_then(|rest| rest.strip_suffix(suffix.as_str()))
                .is_some_and(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                }),
        });
        if allowed {
            Ok(())
        } else {
            Err(OriginRejection::NotAllowed)
        }
    }
}

fn parse_entry(entry: &str) -> Result<AllowedOrigin, BadOriginEntry> {
    let bad = |why| BadOriginEntry {
        entry: entry.to_owned(),
        why,
    };
    let lower = entry.trim().to_ascii_lowercase();
    if lower == "null" {
        // Sandboxed iframes and file:// pages send "null"; only an explicit entry admits them.
        return Ok(AllowedOrigin::Exact(lower));
    }
    let (scheme, authority) = lower
        .split_once("://")
        .ok_or_else(|| bad("expected scheme://host[:port]"))?;
    if scheme.is_empty() || authority.is_empty() {
        return Err(bad("expected scheme://host[:port]"));
    }
    if authority.contains('/') || authority.contains('?') || authority.contains('#') {
        return Err(bad("an origin has no path, query or fragment"));
    }
    match authority.strip_prefix('*') {
        Some(suffix) => {
            if !suffix.starts_with('.') || suffix.len() < 2 || suffix.contains('*') {
                return Err(bad(
                    "a wildcard must be the whole first label: *.example.com",
                ));
            }
            Ok(AllowedOrigin::Subdomains {
                scheme: format!("{scheme}://"),
                suffix: suffix.to_owned(),
            })
        }
        None if authority.contains('*') => Err(bad(
            "a wildcard must be the whole first label: *.example.com",
        )),
        None => Ok(AllowedOrigin::Exact(lower)),
    }
}

/// Whether the (lowercase) origin's authority equals the Host header, the
/// default port of its scheme written or not.
fn same_host(origin: &str, host: Option<&str>) -> bool {
    let (Some((scheme, authority)), Some(host)) = (origin.split_once("://"), host) else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    let default_port = match scheme {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let strip = |s: &str| s.strip_suffix(default_port).unwrap_or(s).to_owned();
    strip(authority) == strip(&host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str], same_host: bool, missing: bool) -> OriginPolicy {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        OriginPolicy::new(&allowed, same_host, missing).expect("valid policy")
    }

    #[test]
    fn origins_against_the_allow_list() {
        let p = policy(
            &["https://app.example.com", "https://*.example.org:8443"],
            false,
            false,
        );
        use OriginRejection::*;
        let table: [(Option<&str>, Result<(), OriginRejection>); 12] = [
            (Some("https://app.example.com"), Ok(())),
            (Some("HTTPS://APP.EXAMPLE.COM"), Ok(())),
            (Some("http://app.example.com"), Err(NotAllowed)),
            (Some("https://app.example.com:444"), Err(NotAllowed)),
            (Some("https://evil.com"), Err(NotAllowed)),
            (Some("https://app.example.com.evil.com"), Err(NotAllowed)),
            (Some("https://a.example.org:8443"), Ok(())),
            (Some("https://a.b.example.org:8443"), Ok(())),
            (Some("https://example.org:8443"), Err(NotAllowed)),
            (Some("https://evilexample.org:8443"), Err(NotAllowed)),
            (Some("null"), Err(NotAllowed)),
            (None, Err(Missing)),
        ];
        for (origin, expected) in table {
            assert_eq!(
                p.check(origin, Some("gw.example.com")),
                expected,
                "{origin:?}"
            );
        }
    }

    #[test]
    fn same_host_and_missing_origin() {
        let p = policy(&[], true, true);
        let table = [
            (Some("http://127.0.0.1:8080"), Some("127.0.0.1:8080"), true),
            (
                Some("https://app.example.com"),
                Some("app.example.com"),
                true,
            ),
            (
                Some("https://app.example.com:443"),
                Some("app.example.com"),
                true,
            ),
            (
                Some("http://app.example.com"),
                Some("app.example.com:80"),
                true,
            ),
            (Some("https://evil.com"), Some("app.example.com"), false),
            (Some("http://127.0.0.1:8081"), Some("127.0.0.1:8080"), false),
            (Some("http://127.0.0.1:8080"), None, false),
            (None, Some("app.example.com"), true),
        ];
        for (origin, host, ok) in table {
            assert_eq!(p.check(origin, host).is_ok(), ok, "{origin:?} on {host:?}");
        }
    }

    #[test]
    fn malformed_entries_are_refused() {
        for entry in [
            "example.com",
            "https://",
            "https://a.*.example.com",
            "https://*example.com",
            "https://app.example.com/path",
        ] {
            assert!(
                OriginPolicy::new(&[entry.to_string()], false, false).is_err(),
                "{entry}"
            );
        }
        assert!(OriginPolicy::new(&["null".to_string()], false, false)
            .expect("null is allowed explicitly")
            .check(Some("null"), None)
            .is_ok());
    }
}
