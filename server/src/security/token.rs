//! JWT verification: HS256 with a shared secret, RS256/ES256 with a public
//! key, a JWKS file or the identity provider's JWKS endpoint
//! ([`super::jwks`]). Signature, algorithm, `nbf`, `iss` and `aud` are
//! checked by `jsonwebtoken`; `exp` is checked here to the second, without
//! leeway, because the same instant closes the connection later (4001).

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::jwks::Jwks;
use super::keys::parse_err;
pub use super::keys::{KeyError, KeySet};
use crate::config::{JwtAlgorithm, JwtSettings};

/// Most topic patterns one token may carry (per list).
pub const MAX_TOKEN_PATTERNS: usize = 256;

/// The claims Switchyard reads from a token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claims {
    /// The subject (user id).
    pub sub: String,
    /// Expiry, Unix seconds. Required: a token without one would outlive every logout.
    pub exp: u64,
    /// Issued at, Unix seconds (a revocation applies to tokens issued before it).
    #[serde(default)]
    pub iat: Option<u64>,
    /// Topic patterns the subject may subscribe to; absent: `auth.default_subscribe`.
    #[serde(default)]
    pub subscribe: Option<Vec<String>>,
    /// Topic patterns the subject may publish on; absent: `topics.client_publish`.
    #[serde(default)]
    pub publish: Option<Vec<String>>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// Bad signature, wrong algorithm, malformed, `nbf` in the future, wrong
    /// issuer or audience, missing claims.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token's `kid` names no key in the set (the provider may have
    /// rotated: [`JwtVerifier::refresh_for_unknown_key`]).
    #[error("invalid token: unknown key id")]
    UnknownKey,
    /// The identity provider's keys have not been fetched yet.
    #[error("the identity provider's keys are not loaded yet")]
    NoKeys,
}

/// The key of `set` that `token`'s header names.
fn pick<'a>(set: &'a KeySet, token: &str) -> Result<&'a DecodingKey, TokenError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid("malformed".into()))?;
    match header.kid {
        Some(kid) => set.by_kid(&kid).ok_or(TokenError::UnknownKey),
        None => set
            .only()
            .ok_or_else(|| TokenError::Invalid("no key id (kid)".into())),
    }
}

enum Keys {
    /// One key for every token.
    Single(DecodingKey),
    /// A JWKS file: by `kid`.
    Set(KeySet),
    /// The identity provider's JWKS, refreshed in the background.
    Remote(Arc<Jwks>),
}

/// Verifies tokens with the configured key.
pub struct JwtVerifier {
    keys: Keys,
    validation: Validation,
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        field,
        path: path.to_owned(),
        source,
    })
}

impl JwtVerifier {
    /// The verifier the settings describe, or `None` when no key is configured.
    pub fn from_settings(settings: &JwtSettings) -> Result<Option<JwtVerifier>, KeyError> {
        let algorithm = match settings.algorithm {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
        };
        let keys = match settings.algorithm {
            JwtAlgorithm::Hs256 => {
                let secret = match (&settings.secret, &settings.secret_file) {
                    (Some(secret), _) => secret.as_bytes().to_vec(),
                    (None, Some(path)) => {
                        let mut bytes = read("auth.jwt.secret_file", path)?;
                        // A mounted Secret often ends in a newline that is not part of it.
                        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
                            bytes.pop();
                        }
                        bytes
                    }
                    (None, None) => return Ok(None),
                };
                if secret.len() < 32 {
                    return Err(KeyError::Parse {
                        field: if settings.secret.is_some() {
                            "auth.jwt.secret"
                        } else {
                            "auth.jwt.secret_file"
                        },
                        message: "an HS256 secret must be at least 32 bytes (256 bits)".into(),
                    });
                }
                Keys::Single(DecodingKey::from_secret(&secret))
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 => {
                match (&settings.public_key_file, &settings.jwks_file) {
                    (None, None) if settings.jwks_url.is_some() => {
                        Keys::Remote(Arc::new(Jwks::new(
                            settings.jwks_url.as_deref().unwrap_or_default(),
                            settings.jwks_ca_file.as_deref(),
                            Duration::from_millis(settings.jwks_refresh_ms),
                            Duration::from_millis(settings.jwks_min_refresh_ms),
                        )?))
                    }
                    (Some(path), _) => {
                        let pem = read("auth.jwt.public_key_file", path)?;
                        let field = "auth.jwt.public_key_file";
                        let key = if algorithm == Algorithm::RS256 {
                            DecodingKey::from_rsa_pem(&pem).map_err(parse_err(field))?
                        } else {
                            DecodingKey::from_ec_pem(&pem).map_err(parse_err(field))?
                        };
                        Keys::Single(key)
                    }
                    (None, Some(path)) => Keys::Set(KeySet::parse(
                        &read("auth.jwt.jwks_file", path)?,
                        "auth.jwt.jwks_file",
                        true,
                    )?),
                    (None, None) => return Ok(None),
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        // A configured issuer or audience is required, not only compared
        // when present: a token without `aud` from another service sharing
        // the key must not pass (`configured_issuer_and_audience_are_required`).
        let mut required = vec!["exp", "sub"];
        if settings.issuer.is_some() {
            required.push("iss");
        }
        if settings.audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_exp = false;
        validation.validate_nbf = true;
        validation.leeway = settings.leeway_s;
        match &settings.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &settings.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Ok(Some(JwtVerifier { keys, validation }))
    }

    /// Verifies `token` at Unix time `now` and returns its claims.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let invalid = |err: jsonwebtoken::errors::Error| match err.kind() {
            ErrorKind::ImmatureSignature => TokenError::Invalid("not valid yet (nbf)".into()),
            ErrorKind::InvalidSignature => TokenError::Invalid("bad signature".into()),
            ErrorKind::InvalidAlgorithm => TokenError::Invalid("algorithm not accepted".into()),
            ErrorKind::MissingRequiredClaim(claim) => {
                TokenError::Invalid(format!("missing claim {claim}"))
            }
            ErrorKind::InvalidIssuer => TokenError::Invalid("wrong issuer".into()),
            ErrorKind::InvalidAudience => TokenError::Invalid("wrong audience".into()),
            ErrorKind::Json(err) => TokenError::Invalid(format!("claims: {err}")),
            _ => TokenError::Invalid("malformed".into()),
        };
        let remote;
        let key = match &self.keys {
            Keys::Single(key) => key,
            Keys::Set(set) => pick(set, token)?,
            Keys::Remote(jwks) => {
                remote = jwks.current().ok_or(TokenError::NoKeys)?;
                pick(&remote, token)?
            }
        };
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(invalid)?
            .claims;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        let too_many = |list: &Option<Vec<String>>| {
            list.as_ref().is_some_and(|l| l.len() > MAX_TOKEN_PATTERNS)
        };
        crate::security::check_subject(&claims.sub).map_err(TokenError::Invalid)?;
        if too_many(&claims.subscribe) || too_many(&claims.publish) {
            return Err(TokenError::Invalid(format!(
                "at most {MAX_TOKEN_PATTERNS} topic patterns per list"
            )));
        }
        Ok(claims)
    }

    /// The identity provider's key set, when the keys come from `jwks_url`.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.keys {
            Keys::Remote(jwks) => Some(jwks),
            _ => None,
        }
    }

    /// After [`TokenError::UnknownKey`]: fetches the provider's keys again
    /// if the rate limit allows, and says whether a fresh set arrived (then
    /// verify once more). Files and single keys never change.
    pub async fn refresh_for_unknown_key(&self) -> bool {
        match &self.keys {
            Keys::Remote(jwks) => jwks.refresh_now().await,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;
    const SECRET: &str = "unit-test-secret-0123456789abcdef";

    fn settings() -> JwtSettings {
        JwtSettings {
            secret: Some(SECRET.into()),
            ..JwtSettings::default()
        }
    }

    fn sign(claims: serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    #[test]
    fn hs256_tokens() {
        let verifier = JwtVerifier::from_settings(&settings())
            .expect("settings")
            .expect("a key is configured");
        let good = json!({"sub": "alice", "exp": NOW + 60, "subscribe": ["chat.*"]});
        let claims = verifier
            .verify(&sign(good.clone(), SECRET), NOW)
            .expect("valid");
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.subscribe, Some(vec!["chat.*".to_string()]));

        let too_many: Vec<String> = (0..=MAX_TOKEN_PATTERNS).map(|i| format!("t{i}")).collect();
        let table = [
            (sign(good.clone(), "other"), "bad signature"),
            (
                sign(json!({"sub": "a", "exp": NOW}), SECRET),
                "token expired",
            ),
            (sign(json!({"sub": "a"}), SECRET), "missing field `exp`"),
            (
                sign(json!({"sub": "a", "exp": "soon"}), SECRET),
                "claims: invalid type",
            ),
            (
                sign(json!({"exp": NOW + 60}), SECRET),
                "missing field `sub`",
            ),
            (
                sign(
                    json!({"sub": "a", "exp": NOW + 60, "nbf": NOW + 3600}),
                    SECRET,
                ),
                "not valid yet (nbf)",
            ),
            (
                sign(
                    json!({"sub": "a", "exp": NOW + 60, "publish": too_many}),
                    SECRET,
                ),
                "at most 256 topic patterns per list",
            ),
            ("not.a.token".to_string(), "malformed"),
        ];
        for (token, expected) in table {
            let err = verifier.verify(&token, NOW).expect_err(expected);
            assert!(err.to_string().contains(expected), "{err} vs {expected}");
        }
    }

    /// Every configured claim is required, not only checked when present:
    /// a token from another service sharing the key (no `aud`), or from
    /// the same provider for another audience, is refused. Wrong, missing,
    /// wrong type and null, for `iss` and `aud` alike.
    #[test]
    fn configured_issuer_and_audience_are_required() {
        let verifier = JwtVerifier::from_settings(&JwtSettings {
            issuer: Some("https://idp.example".into()),
            audience: Some("switchyard".into()),
            ..settings()
        })
        .expect("settings")
        .expect("a key is configured");
        let with = |extra: serde_json::Value| {
            let mut claims = json!({"sub": "a", "exp": NOW + 60,
                "iss": "https://idp.example", "aud": "switchyard"});
            for (key, value) in extra.as_object().expect("object") {
                if value == &json!("<absent>") {
                    claims.as_object_mut().expect("object").remove(key);
                } else {
                    claims[key] = value.clone();
                }
            }
            sign(claims, SECRET)
        };
        assert!(verifier.verify(&with(json!({})), NOW).is_ok(), "both right");
        assert!(
            verifier
                .verify(&with(json!({"aud": ["other", "switchyard"]})), NOW)
                .is_ok(),
            "an audience list naming this one"
        );
        let table = [
            (json!({"iss": "https://evil.example"}), "wrong issuer"),
            (json!({"iss": "<absent>"}), "missing claim iss"),
            // A claim of the wrong type, or null, does not count as present.
            (json!({"iss": 7}), "missing claim iss"),
            (json!({"iss": null}), "missing claim iss"),
            (json!({"aud": "other"}), "wrong audience"),
            (json!({"aud": ["other"]}), "wrong audience"),
            (json!({"aud": "<absent>"}), "missing claim aud"),
            (json!({"aud": 7}), "missing claim aud"),
            (json!({"aud": null}), "missing claim aud"),
            (json!({"aud": []}), "wrong audience"),
        ];
        for (extra, expected) in table {
            let err = verifier
                .verify(&with(extra.clone()), NOW)
                .expect_err(&format!("{extra} must be refused"));
            assert!(
                err.to_string().contains(expected),
                "{extra}: {err} vs {expected}"
            );
        }
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        // A token signed with HS256 must not pass an RS256 verifier, whatever its key.
        let dir = std::env::temp_dir().join(format!("sy-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let jwks = dir.join("jwks.json");
        // An RSA public key (RFC 7517 appendix A.1 example).
        std::fs::write(
            &jwks,
            r#"{"keys":[{"kty":"RSA","kid":"2011-04-29","alg":"RS256","e":"AQAB",
              "n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}]}"#,
        )
        .expect("write");
        let verifier = JwtVerifier::from_settings(&JwtSettings {
            algorithm: JwtAlgorithm::Rs256,
            jwks_file: Some(jwks.display().to_string()),
            ..JwtSettings::default()
        })
        .expect("settings")
        .expect("a key is configured");
        let token = sign(json!({"sub": "a", "exp": NOW + 60}), "anything");
        let err = verifier.verify(&token, NOW).expect_err("wrong algorithm");
        assert_eq!(err, TokenError::Invalid("algorithm not accepted".into()));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_providers_set_skips_keys_it_cannot_use_and_a_file_may_not() {
        let rsa = |kid: &str, usage: &str| {
            json!({"kty": "RSA", "kid": kid, "use": usage, "e": "AQAB",
                   "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"})
        };
        let set = |keys: Vec<serde_json::Value>| json!({ "keys": keys }).to_string();
        let mixed = set(vec![
            rsa("sig", "sig"),
            rsa("enc", "enc"),
            json!({"kty": "OKP", "kid": "ed", "crv": "Ed448", "x": "AA"}),
            // Keys jsonwebtoken would build, and that verify nothing.
            json!({"kty": "RSA", "kid": "short", "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "empty", "n": "", "e": ""}),
            json!({"kty": "EC", "kid": "ec", "crv": "P-256", "x": "", "y": ""}),
            json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}),
            json!({"kty": "future-type", "kid": "new"}),
        ]);
        let provider = KeySet::parse(mixed.as_bytes(), "auth.jwt.jwks_url", false).expect("set");
        assert_eq!(provider.len(), 1);
        assert!(provider.by_kid("sig").is_some() && provider.by_kid("enc").is_none());
        assert!(KeySet::parse(mixed.as_bytes(), "auth.jwt.jwks_file", true).is_err());
        // Nothing usable, not JSON, no `keys`: errors either way.
        for body in [
            set(vec![rsa("enc", "enc")]),
            set(vec![]),
            "<html>".into(),
            "{}".into(),
        ] {
            assert!(
                KeySet::parse(body.as_bytes(), "auth.jwt.jwks_url", false).is_err(),
                "{body}"
            );
        }
        // A kid the set does not hold is UnknownKey (the refresh hint), a
        // token without a kid against a set of one key takes that key.
        let verifier = JwtVerifier {
            keys: Keys::Set(provider),
            validation: Validation::new(Algorithm::RS256),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rotated".into());
        let token = jsonwebtoken::encode(
            &header,
            &json!({"sub": "a", "exp": NOW + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign");
        assert_eq!(verifier.verify(&token, NOW), Err(TokenError::UnknownKey));
    }

    #[test]
    fn a_short_secret_file_is_refused() {
        let path = std::env::temp_dir().join(format!("sy-short-secret-{}", std::process::id()));
        std::fs::write(&path, "too-short\n").expect("write");
        let result = JwtVerifier::from_settings(&JwtSettings {
            secret_file: Some(path.display().to_string()),
            ..JwtSettings::default()
        });
        assert!(matches!(
            result,
            Err(KeyError::Parse {
                field: "auth.jwt.secret_file",
                ..
            })
        ));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn no_key_means_no_verifier() {
        assert!(JwtVerifier::from_settings(&JwtSettings::default())
            .expect("settings")
            .is_none());
    }
}
