//! TLS for the listeners (wss:// and https://) with rustls, from PEM
//! certificate and key files. Only HTTP/1.1 is offered: the WebSocket
//! upgrade is an HTTP/1.1 mechanism.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsSettings;

/// Why a TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate file is missing, unreadable or holds no certificate.
    #[error("{field}.cert_file {path}: {message}")]
    Certificate {
        /// `tls` or `admin.tls`.
        field: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The key file is missing, unreadable or holds no key.
    #[error("{field}.key_file {path}: {message}")]
    Key {
        /// `tls` or `admin.tls`.
        field: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("{field}: {0}", field = .1)]
    Config(rustls::Error, &'static str),
}

/// The acceptor for `settings`, or `None` when TLS is off. `field` names the
/// settings section in errors.
pub fn acceptor(
    settings: &TlsSettings,
    field: &'static str,
) -> Result<Option<TlsAcceptor>, TlsSetupError> {
    let (Some(cert_path), Some(key_path)) = (&settings.cert_file, &settings.key_file) else {
        return Ok(None);
    };
    let cert_error = |message: String| TlsSetupError::Certificate {
        field,
        path: cert_path.clone(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsSetupError::Key {
        field,
        path: key_path.clone(),
        message: e.to_string(),
    })?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsSetupError::Config(e, field))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}
