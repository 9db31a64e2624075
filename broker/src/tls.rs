//! mTLS: who is calling (from the client certificate's URI SAN), and TLS configurations for
//! the server and for clients (agents, the admin CLI, tests).

use std::path::Path;

use ballast_proto::{ADMIN_SPIFFE_ID, CLUSTER_SPIFFE_PREFIX};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The caller, as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A member agent of this cluster (`spiffe://ballast/cluster/<id>`).
    Cluster(String),
    /// The operator (`spiffe://ballast/admin`).
    Admin,
    /// The server runs with `--insecure`: no certificate, every caller is trusted.
    Insecure,
}

/// Reads the caller's identity from the TLS session of `req`.
///
/// With `insecure`, returns [`Caller::Insecure`]. Otherwise a request without a client
/// certificate, or whose certificate names no ballast identity, is `UNAUTHENTICATED`.
///
/// # Errors
/// `UNAUTHENTICATED` as above.
pub fn caller<T>(req: &Request<T>, insecure: bool) -> Result<Caller, Status> {
    if insecure {
        return Ok(Caller::Insecure);
    }
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    identity_of_der(leaf.as_ref()).map_err(Status::unauthenticated)
}

/// The ballast identity in a DER certificate's URI SANs.
///
/// # Errors
/// A message saying why there is none.
pub fn identity_of_der(der: &[u8]) -> Result<Caller, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("client certificate SAN: {e}"))?
        .ok_or_else(|| "client certificate has no subjectAltName".to_string())?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if *uri == ADMIN_SPIFFE_ID {
                return Ok(Caller::Admin);
            }
            if let Some(id) = uri.strip_prefix(CLUSTER_SPIFFE_PREFIX) {
                if crate::certs::valid_cluster_id(id) {
                    return Ok(Caller::Cluster(id.to_string()));
                }
            }
        }
    }
    Err(format!(
        "client certificate names no ballast identity (URI SAN {CLUSTER_SPIFFE_PREFIX}<id> or {ADMIN_SPIFFE_ID})"
    ))
}

/// Requires that the caller may act as `cluster_id`.
///
/// # Errors
/// `PERMISSION_DENIED` naming both identities.
pub fn require_cluster(caller: &Caller, cluster_id: &str) -> Result<(), Status> {
    match caller {
        Caller::Insecure => Ok(()),
        Caller::Cluster(c) if c == cluster_id => Ok(()),
        Caller::Cluster(c) => Err(Status::permission_denied(format!(
            "cluster_id: certificate is for cluster {c:?}, request is for {cluster_id:?}"
        ))),
        Caller::Admin => Err(Status::permission_denied(format!(
            "cluster_id: the admin identity may not act as cluster {cluster_id:?}"
        ))),
    }
}

/// Requires the admin identity.
///
/// # Errors
/// `PERMISSION_DENIED`.
pub fn require_admin(caller: &Caller) -> Result<(), Status> {
    match caller {
        Caller::Insecure | Caller::Admin => Ok(()),
        Caller::Cluster(c) => Err(Status::permission_denied(format!(
            "the Admin service needs the admin certificate ({ADMIN_SPIFFE_ID}); caller is cluster {c:?}"
        ))),
    }
}

/// PEM material of one TLS endpoint.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn read(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl TlsFiles {
    /// Reads the CA, certificate and key PEM files.
    ///
    /// # Errors
    /// A message naming the flag and file that could not be read.
    pub fn read(ca: &Path, cert: &Path, key: &Path) -> Result<Self, String> {
        Ok(Self {
            ca_pem: read(ca, "--ca")?,
            cert_pem: read(cert, "--cert")?,
            key_pem: read(key, "--key")?,
        })
    }

    /// Server side: present `cert`, require a client certificate signed by `ca`.
    #[must_use]
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client side: trust `ca`, present `cert`, expect the server to be `domain`.
    #[must_use]
    pub fn client_config(&self, domain: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(domain)
    }
}
