//! mTLS material: TLS configurations for the server and for clients (agents, the admin CLI,
//! tests). Who is calling is read from the client certificate in `grpc::identity`.

use std::path::Path;

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

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

    /// A client channel to a broker on loopback port `port`, checking the server certificate
    /// for `localhost` (the name the lab and test certificates carry).
    ///
    /// # Errors
    /// The TLS material or the connection is refused.
    pub async fn localhost_channel(&self, port: u16) -> Result<Channel, ConnectError> {
        Ok(Endpoint::from_shared(format!("https://localhost:{port}"))?
            .tls_config(self.client_config("localhost"))?
            .connect()
            .await?)
    }
}

/// Why a client channel could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("broker address: {0}")]
    Uri(#[from] tonic::codegen::http::uri::InvalidUri),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}
