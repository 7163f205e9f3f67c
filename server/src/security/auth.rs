//! Which credential a handshake carries, the session it opens, revocations,
//! and the admin listener's bearer token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, StatusCode};
use subtle::ConstantTimeEq;
use switchyard_protocol::topic::TopicPattern;
use switchyard_protocol::CloseCode;

use super::tickets::{is_well_formed, TicketGrant, TicketStore};
use super::token::{JwtVerifier, KeyError, TokenError};
use super::{pattern_list, patterns, AuthMethod, Session};
use crate::config::{Config, CredentialKind};

/// The credential found in a handshake, by precedence: ticket, bearer, cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// `?ticket=`.
    Ticket(&'a str),
    /// `Authorization: Bearer`.
    Bearer(&'a str),
    /// The session cookie.
    Cookie(&'a str),
    /// Nothing accepted was present.
    None,
}

/// Finds the first accepted credential in a handshake.
pub fn find_credential<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    accept: &[CredentialKind],
    cookie_name: &str,
) -> Credential<'a> {
    if accept.contains(&CredentialKind::Ticket) {
        let ticket = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|pair| pair.strip_prefix("ticket="));
        if let Some(ticket) = ticket {
            return Credential::Ticket(ticket);
        }
    }
    if accept.contains(&CredentialKind::Bearer) {
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        if let Some(token) = bearer {
            return Credential::Bearer(token);
        }
    }
    if accept.contains(&CredentialKind::Cookie) {
        let cookie = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (name, value) = pair.trim().split_once('=')?;
                (name == cookie_name).then(|| value.trim_matches('"'))
            });
        if let Some(token) = cookie {
            return Credential::Cookie(token);
        }
    }
    Credential::None
}

/// Why a handshake could not be authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No accepted credential, and anonymous sessions are off.
    #[error("authentication required")]
    MissingCredentials,
    /// The token failed verification.
    #[error("{0}")]
    BadToken(String),
    /// The token has expired: refresh it.
    #[error("token expired")]
    Expired,
    /// The ticket is unknown, already used or expired.
    #[error("invalid or used ticket")]
    BadTicket,
    /// The subject's sessions were revoked after this credential was issued.
    #[error("session revoked")]
    Revoked,
    /// The ticket store cannot be reached, or the identity provider's keys
    /// are not loaded yet.
    #[error("authentication unavailable, retry")]
    Unavailable,
}

impl AuthFailure {
    /// The `handshakes_rejected` reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthFailure::MissingCredentials => "missing_credentials",
            AuthFailure::BadToken(_) => "bad_token",
            AuthFailure::Expired => "token_expired",
            AuthFailure::BadTicket => "bad_ticket",
            AuthFailure::Revoked => "revoked",
            AuthFailure::Unavailable => "auth_unavailable",
        }
    }

    /// The close code a browser sees after the connection is accepted.
    pub fn close_code(&self) -> CloseCode {
        match self {
            AuthFailure::Expired => CloseCode::SessionExpired,
            AuthFailure::Revoked => CloseCode::SessionRevoked,
            AuthFailure::Unavailable => CloseCode::TryAgainLater,
            _ => CloseCode::NotAuthenticated,
        }
    }

    /// The HTTP status when `auth.reject_with_http` refuses before the upgrade.
    pub fn http_status(&self) -> StatusCode {
        match self {
            AuthFailure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

/// Subjects on the revocation list at once, at most: its memory stays
/// bounded whatever the admin API is asked (past it, expired entries go
/// first, then the oldest).
const MAX_REVOKED_SUBJECTS: usize = 100_000;

/// Subjects whose sessions were revoked, and when (Unix seconds). A
/// credential issued at or before that second is refused for `ttl_s`
/// afterwards (set it to the longest token lifetime); a token without `iat`
/// cannot show it is newer and is refused for that whole time.
pub struct Revocations {
    ttl_s: u64,
    max_entries: usize,
    revoked: Mutex<HashMap<String, u64>>,
}

impl Revocations {
    /// An empty list keeping entries `ttl_s` seconds, at most `max_entries`.
    pub fn new(ttl_s: u64, max_entries: usize) -> Self {
        Revocations {
            ttl_s,
            max_entries: max_entries.max(1),
            revoked: Mutex::new(HashMap::new()),
        }
    }

    /// Records that `subject` was revoked at `now` (Unix seconds).
    pub fn revoke(&self, subject: &str, now: u64) {
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        if revoked.len() >= self.max_entries && !revoked.contains_key(subject) {
            revoked.retain(|_, at| at.saturating_add(self.ttl_s) > now);
            if revoked.len() >= self.max_entries {
                // Still full of live entries: forget the oldest one.
                let oldest = revoked
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(s, _)| s.clone());
                if let Some(oldest) = oldest {
                    revoked.remove(&oldest);
                }
            }
        }
        revoked.insert(subject.to_owned(), now);
    }

    /// Whether a credential of `subject` issued at `issued_at` is revoked at `now`.
    pub fn is_revoked(&self, subject: &str, issued_at: Option<u64>, now: u64) -> bool {
        let revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        match revoked.get(subject) {
            Some(&at) if at.saturating_add(self.ttl_s) > now => {
                issued_at.is_none_or(|iat| iat <= at)
            }
            _ => false,
        }
    }
}

/// Authenticates handshakes according to `auth.*`.
pub struct Authenticator {
    verifier: Option<JwtVerifier>,
    accept: Vec<CredentialKind>,
    cookie_name: String,
    anonymous: bool,
    default_subscribe: Arc<[TopicPattern]>,
    default_publish: Arc<[TopicPattern]>,
    /// Revoked subjects.
    pub revocations: Revocations,
}

impl Authenticator {
    /// Builds the authenticator (reads key files).
    pub fn new(config: &Config) -> Result<Authenticator, KeyError> {
        let auth = &config.auth;
        Ok(Authenticator {
            verifier: JwtVerifier::from_settings(&auth.jwt)?,
            accept: auth.accept.clone(),
            cookie_name: auth.cookie_name.clone(),
            anonymous: config.anonymous_allowed(),
            default_subscribe: pattern_list(&auth.default_subscribe),
            default_publish: pattern_list(&config.topics.client_publish),
            revocations: Revocations::new(auth.revocation_ttl_ms / 1000, MAX_REVOKED_SUBJECTS),
        })
    }

    /// The session a handshake opens, at Unix time `now_ms`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        tickets: &dyn TicketStore,
        now_ms: u64,
    ) -> Result<Session, AuthFailure> {
        let now = now_ms / 1000;
        let (method, token) = match find_credential(headers, query, &self.accept, &self.cookie_name)
        {
            Credential::None if self.anonymous => {
                return Ok(Session {
                    subject: None,
                    method: AuthMethod::Anonymous,
                    expires_at_ms: None,
                    subscribe: patterns(None, &self.default_subscribe),
                    publish: patterns(None, &self.default_publish),
                })
            }
            Credential::None => return Err(AuthFailure::MissingCredentials),
            Credential::Ticket(ticket) => return self.redeem(ticket, tickets, now).await,
            Credential::Bearer(token) => (AuthMethod::Bearer, token),
            Credential::Cookie(token) => (AuthMethod::Cookie, token),
        };
        let verifier = self
            .verifier
            .as_ref()
            .ok_or_else(|| AuthFailure::BadToken("this gateway has no token key".into()))?;
        let claims = match verifier.verify(token, now) {
            // The provider may have rotated its keys since the last fetch.
            Err(TokenError::UnknownKey) if verifier.refresh_for_unknown_key().await => {
                verifier.verify(token, now)
            }
            verified => verified,
        }
        .map_err(|err| match err {
            TokenError::Expired => AuthFailure::Expired,
            TokenError::NoKeys => AuthFailure::Unavailable,
            TokenError::UnknownKey => AuthFailure::BadToken(err.to_string()),
            TokenError::Invalid(why) => AuthFailure::BadToken(format!("invalid token: {why}")),
        })?;
        if self.revocations.is_revoked(&claims.sub, claims.iat, now) {
            return Err(AuthFailure::Revoked);
        }
        Ok(Session {
            expires_at_ms: Some(claims.exp.saturating_mul(1000)),
            subscribe: patterns(claims.subscribe.as_deref(), &self.default_subscribe),
            publish: patterns(claims.publish.as_deref(), &self.default_publish),
            subject: Some(claims.sub),
            method,
        })
    }

    /// The identity provider's key set, when tokens are verified against
    /// `auth.jwt.jwks_url` (its refresher runs with the gateway).
    pub fn jwks(&self) -> Option<&Arc<super::jwks::Jwks>> {
        self.verifier.as_ref().and_then(JwtVerifier::jwks)
    }

    async fn redeem(
        &self,
        ticket: &str,
        tickets: &dyn TicketStore,
        now: u64,
    ) -> Result<Session, AuthFailure> {
        if !is_well_formed(ticket) {
            return Err(AuthFailure::BadTicket);
        }
        let stored = tickets
            .take_ticket(ticket)
            .await
            .map_err(|_| AuthFailure::Unavailable)?
            .ok_or(AuthFailure::BadTicket)?;
        let grant: TicketGrant =
            serde_json::from_str(&stored).map_err(|_| AuthFailure::BadTicket)?;
        if grant.exp <= now {
            return Err(AuthFailure::Expired);
        }
        if self
            .revocations
            .is_revoked(&grant.sub, Some(grant.minted_at), now)
        {
            return Err(AuthFailure::Revoked);
        }
        Ok(Session {
            expires_at_ms: Some(grant.exp.saturating_mul(1000)),
            subscribe: patterns(grant.subscribe.as_deref(), &self.default_subscribe),
            publish: patterns(grant.publish.as_deref(), &self.default_publish),
            subject: Some(grant.sub),
            method: AuthMethod::Ticket,
        })
    }
}

/// The admin listener's bearer token. Without one, the admin listener is
/// open — which the config allows only on a loopback address.
pub struct AdminAuth {
    expected: Option<Vec<u8>>,
}

impl AdminAuth {
    /// Requires `Authorization: Bearer <token>` when `token` is set.
    pub fn new(token: Option<String>) -> Self {
        AdminAuth {
            expected: token.map(|t| format!("Bearer {t}").into_bytes()),
        }
    }

    /// Whether the request's `Authorization` header carries the token. The
    /// comparison takes the same time wherever the first difference is
    /// (only the length can be learned from timing).
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        match &self.expected {
            None => true,
            Some(expected) => {
                authorization.is_some_and(|given| bool::from(given.ct_eq(expected.as_slice())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::security::header_map as headers;

    #[test]
    fn credential_precedence_and_acceptance() {
        use CredentialKind::*;
        let all = [Cookie, Bearer, Ticket];
        let both = headers(&[
            ("authorization", "Bearer tok.en"),
            ("cookie", "a=1; sy_session=\"cook.ie\"; b=2"),
        ]);
        let table: [(&HeaderMap, Option<&str>, &[CredentialKind], Credential); 7] = [
            (
                &both,
                Some("x=1&ticket=abc"),
                &all,
                Credential::Ticket("abc"),
            ),
            (&both, None, &all, Credential::Bearer("tok.en")),
            (
                &both,
                Some("ticket=abc"),
                &[Cookie, Bearer],
                Credential::Bearer("tok.en"),
            ),
            (&both, None, &[Cookie], Credential::Cookie("cook.ie")),
            (&both, None, &[Ticket], Credential::None),
            (
                &headers(&[("authorization", "Basic dXNlcjpw")]),
                None,
                &all,
                Credential::None,
            ),
            (
                &headers(&[("cookie", "other=1")]),
                Some("tickets=1"),
                &all,
                Credential::None,
            ),
        ];
        for (headers, query, accept, expected) in table {
            assert_eq!(
                find_credential(headers, query, accept, "sy_session"),
                expected,
                "{query:?} {accept:?}"
            );
        }
    }

    #[test]
    fn revocations_refuse_credentials_issued_before() {
        let list = Revocations::new(3600, 2);
        list.revoke("alice", 1000);
        let table = [
            ("alice", Some(999), 1001, true),
            ("alice", Some(1000), 1001, true),
            ("alice", Some(1001), 1002, false),
            ("alice", None, 1001, true),
            ("alice", None, 1000 + 3600, false),
            ("bob", None, 1001, false),
        ];
        for (subject, iat, now, revoked) in table {
            assert_eq!(
                list.is_revoked(subject, iat, now),
                revoked,
                "{subject} {iat:?} {now}"
            );
        }
        // Bounded: a third subject pushes out the oldest live entry.
        list.revoke("bob", 1010);
        list.revoke("carol", 1020);
        assert!(!list.is_revoked("alice", None, 1030));
        assert!(list.is_revoked("bob", None, 1030));
        assert!(list.is_revoked("carol", None, 1030));
    }

    #[test]
    fn failures_map_to_close_codes() {
        let table = [
            (AuthFailure::MissingCredentials, 4501),
            (AuthFailure::BadToken("x".into()), 4501),
            (AuthFailure::BadTicket, 4501),
            (AuthFailure::Expired, 4001),
            (AuthFailure::Revoked, 4503),
            (AuthFailure::Unavailable, 1013),
        ];
        for (failure, code) in table {
            assert_eq!(failure.close_code().as_u16(), code, "{failure:?}");
        }
    }

    #[test]
    fn admin_token() {
        let open = AdminAuth::new(None);
        assert!(open.allows(None));
        let guarded = AdminAuth::new(Some("hunter2".into()));
        let table: [(Option<&[u8]>, bool); 5] = [
            (Some(b"Bearer hunter2"), true),
            (Some(b"Bearer hunter3"), false),
            (Some(b"Bearer hunter22"), false),
            (Some(b"hunter2"), false),
            (None, false),
        ];
        for (given, ok) in table {
            assert_eq!(guarded.allows(given), ok, "{given:?}");
        }
    }
}
