//! Verification keys from a JSON Web Key Set, and why a key could not be
//! had: shared by JWKS files and the identity provider's endpoint, which
//! depend on this module. Pure: no settings, no I/O.

use std::collections::HashMap;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::DecodingKey;
use serde::Deserialize;

/// Why the verifier could not be built from the settings.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("cannot read {field} {path}: {source}")]
    Read {
        /// The setting naming the file.
        field: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key could not be parsed.
    #[error("{field}: {message}")]
    Parse {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Keys by `kid`, from a JWKS.
pub struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    /// The key a token without `kid` gets: only when the set has one key.
    only: Option<DecodingKey>,
    len: usize,
}

impl KeySet {
    /// The keys of a JWKS document. `strict` (a file the operator wrote):
    /// any key that cannot be used is an error. Otherwise (a provider's
    /// set, which may also hold encryption keys or other key types) such
    /// keys are skipped; a set with no usable key is an error either way.
    pub fn parse(json: &[u8], field: &'static str, strict: bool) -> Result<KeySet, KeyError> {
        // Key by key: one key of a type this build does not know must not
        // make a provider's whole set unreadable.
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<serde_json::Value>,
        }
        let set: RawSet = serde_json::from_slice(json).map_err(|err| KeyError::Parse {
            field,
            message: err.to_string(),
        })?;
        let mut by_kid = HashMap::new();
        let mut all = Vec::new();
        for raw in set.keys {
            let jwk: Jwk = match serde_json::from_value(raw) {
                Ok(jwk) => jwk,
                Err(err) if strict => {
                    return Err(KeyError::Parse {
                        field,
                        message: err.to_string(),
                    })
                }
                Err(err) => {
                    tracing::debug!(%err, "JWKS key skipped");
                    continue;
                }
            };
            let for_encryption = matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            );
            if let Err(why) = public_key_shape(&jwk) {
                if strict {
                    return Err(KeyError::Parse {
                        field,
                        message: why,
                    });
                }
                tracing::debug!(kid = ?jwk.common.key_id, %why, "JWKS key skipped");
                continue;
            }
            let key = match DecodingKey::from_jwk(&jwk) {
                Ok(key) if strict || !for_encryption => key,
                Ok(_) => continue,
                Err(err) if strict => return Err(parse_err(field)(err)),
                Err(err) => {
                    tracing::debug!(kid = ?jwk.common.key_id, %err, "JWKS key skipped");
                    continue;
                }
            };
            if let Some(kid) = &jwk.common.key_id {
                by_kid.insert(kid.clone(), key.clone());
            }
            all.push(key);
        }
        if all.is_empty() {
            return Err(KeyError::Parse {
                field,
                message: "the key set has no usable key".into(),
            });
        }
        let len = all.len();
        let only = (len == 1).then(|| all.remove(0));
        Ok(KeySet { by_kid, only, len })
    }

    /// How many usable keys the set holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The key with id `kid`.
    pub fn by_kid(&self, kid: &str) -> Option<&DecodingKey> {
        self.by_kid.get(kid)
    }

    /// The key for a token that names none: the set's only key, if it has
    /// exactly one.
    pub fn only(&self) -> Option<&DecodingKey> {
        self.only.as_ref()
    }
}

/// Whether `jwk` is a public key these algorithms can verify with: RSA of
/// at least 2048 bits, or EC P-256 with both coordinates. `jsonwebtoken`
/// builds a key from empty or short components, which would then refuse
/// every token ("bad signature") in place of the set it replaced.
fn public_key_shape(jwk: &Jwk) -> Result<(), String> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
    // Unpadded base64url lengths: 2048 bits are 342 characters, a P-256
    // coordinate (32 bytes) 43.
    match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) if rsa.n.len() >= 342 && !rsa.e.is_empty() => Ok(()),
        AlgorithmParameters::RSA(_) => Err("an RSA key below 2048 bits".into()),
        AlgorithmParameters::EllipticCurve(ec)
            if ec.curve == EllipticCurve::P256 && ec.x.len() == 43 && ec.y.len() == 43 =>
        {
            Ok(())
        }
        AlgorithmParameters::EllipticCurve(_) => Err("not a P-256 public key".into()),
        _ => Err("not an RSA or EC public key".into()),
    }
}

/// Maps a `jsonwebtoken` key error to [`KeyError::Parse`] for `field`.
pub fn parse_err(field: &'static str) -> impl Fn(jsonwebtoken::errors::Error) -> KeyError {
    move |err| KeyError::Parse {
        field,
        message: err.to_string(),
    }
}
