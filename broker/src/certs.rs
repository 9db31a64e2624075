//! Lab certificates (rcgen): a CA, a server certificate, one client certificate per cluster
//! (URI SAN `spiffe://ballast/cluster/<id>`) and an admin certificate (`spiffe://ballast/admin`).

use std::net::IpAddr;
use std::path::Path;

use ballast_proto::{ADMIN_SPIFFE_ID, CLUSTER_SPIFFE_PREFIX};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// What can go wrong making certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A cluster id breaks the cluster-id rule (`ballast_types::ClusterId`: a DNS label).
    #[error("clusters: invalid cluster id {0:?} (a DNS label: 1-63 characters of a-z, 0-9, '-', no '-' at either end)")]
    ClusterId(String),
    /// A `--server-san` value is neither an IP address nor a DNS name.
    #[error("server-san: invalid name {0:?}")]
    ServerSan(String),
    /// rcgen failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Everything `ballast-broker certs` makes.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub ca: CertPair,
    pub server: CertPair,
    pub admin: CertPair,
    /// `(cluster id, certificate)`, in the order given.
    pub clusters: Vec<(String, CertPair)>,
}

impl Bundle {
    /// The TLS material of one endpoint holding `pair` (the server, the admin or a
    /// cluster's certificate) and trusting this bundle's CA.
    #[must_use]
    pub fn tls_files(&self, pair: &CertPair) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles {
            ca_pem: self.ca.cert_pem.clone(),
            cert_pem: pair.cert_pem.clone(),
            key_pem: pair.key_pem.clone(),
        }
    }
}

fn leaf_params(
    cn: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, CertsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

fn uri(s: &str) -> Result<SanType, CertsError> {
    Ok(SanType::URI(s.try_into()?))
}

/// Makes a CA, a server certificate for `localhost`, `127.0.0.1` and `server_sans`, one client
/// certificate per cluster and an admin certificate.
///
/// # Errors
/// [`CertsError`] naming a bad cluster id or server name.
pub fn generate(clusters: &[String], server_sans: &[String]) -> Result<Bundle, CertsError> {
    for c in clusters {
        if ballast_types::ClusterId::validate(c).is_err() {
            return Err(CertsError::ClusterId(c.clone()));
        }
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ballast lab CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = CertPair {
        cert_pem: ca_cert.pem(),
        key_pem: ca_key.serialize_pem(),
    };
    let issuer = Issuer::new(ca_params, ca_key);

    let sign = |params: CertificateParams| -> Result<CertPair, CertsError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    };

    let mut sans = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
    ];
    for s in server_sans {
        let s = s.trim();
        if let Ok(ip) = s.parse::<IpAddr>() {
            sans.push(SanType::IpAddress(ip));
        } else if !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*')
        {
            sans.push(SanType::DnsName(
                s.try_into()
                    .map_err(|_| CertsError::ServerSan(s.to_string()))?,
            ));
        } else {
            return Err(CertsError::ServerSan(s.to_string()));
        }
    }
    let server = sign(leaf_params(
        "ballast-broker",
        sans,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?)?;
    let admin = sign(leaf_params(
        "ballast-admin",
        vec![uri(ADMIN_SPIFFE_ID)?],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?)?;
    let mut out = Vec::new();
    for c in clusters {
        let pair = sign(leaf_params(
            &format!("ballast-cluster-{c}"),
            vec![uri(&format!("{CLUSTER_SPIFFE_PREFIX}{c}"))?],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?)?;
        out.push((c.clone(), pair));
    }
    Ok(Bundle {
        ca,
        server,
        admin,
        clusters: out,
    })
}

/// Writes a file; private keys (`*-key.pem`) are readable by their owner only (0600).
fn write(dir: &Path, name: &str, contents: &str) -> Result<(), CertsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    let mode = if name.ends_with("-key.pem") {
        0o600
    } else {
        0o644
    };
    let io = |source| CertsError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .map_err(io)?;
    // An existing file keeps its mode on open: set it explicitly.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)
}

impl Bundle {
    /// Writes `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem`, `admin.pem`,
    /// `admin-key.pem` and `cluster-<id>.pem` / `cluster-<id>-key.pem` into `dir` (created).
    ///
    /// # Errors
    /// An I/O error naming the file.
    pub fn write_to(&self, dir: &Path) -> Result<Vec<String>, CertsError> {
        std::fs::create_dir_all(dir).map_err(|source| CertsError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut files = Vec::new();
        let mut put = |name: String, pair: &CertPair| -> Result<(), CertsError> {
            write(dir, &format!("{name}.pem"), &pair.cert_pem)?;
            write(dir, &format!("{name}-key.pem"), &pair.key_pem)?;
            files.push(format!("{name}.pem"));
            files.push(format!("{name}-key.pem"));
            Ok(())
        };
        put("ca".into(), &self.ca)?;
        put("server".into(), &self.server)?;
        put("admin".into(), &self.admin)?;
        for (c, pair) in &self.clusters {
            put(format!("cluster-{c}"), pair)?;
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One cluster-id rule: the certificate generator refuses what the gRPC layer and the
    /// agent refuse (it once accepted a leading or trailing '-').
    #[test]
    fn generate_refuses_ids_outside_the_cluster_id_rule() {
        for bad in ["-c1", "c1-", "C1", ""] {
            assert!(
                matches!(
                    generate(&[bad.to_string()], &[]),
                    Err(CertsError::ClusterId(_))
                ),
                "{bad:?} accepted"
            );
        }
    }
}
