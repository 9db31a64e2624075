//! Who is calling: the ballast identity in the client certificate's URI SAN
//! (`spiffe://ballast/cluster/<id>` or `spiffe://ballast/admin`), established once per call by
//! the interceptor [`Authenticate`] (Broker service: any ballast identity; Admin service:
//! the admin identity), and stored in the request's
//! extensions. Handlers then only check that the caller may act as the message's cluster
//! ([`acting_as`]).

use std::sync::Arc;

use ballast_proto::{ADMIN_SPIFFE_ID, CLUSTER_SPIFFE_PREFIX};
use ballast_types::ClusterId;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::validate::check_cluster_id;
use crate::metrics::Metrics;

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
                if ClusterId::validate(id).is_ok() {
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

/// The interceptor of both services: every call must carry a ballast identity (or the
/// server runs `--insecure`), stored in the request's extensions for [`acting_as`]. With
/// `admin_only` (the Admin service) only the admin identity passes; a cluster identity is
/// `PERMISSION_DENIED`. Refusals are counted as rejected, except the Admin service's
/// unauthenticated ones (as before identity moved here).
#[derive(Debug, Clone)]
pub struct Authenticate {
    pub insecure: bool,
    pub admin_only: bool,
    pub metrics: Arc<Metrics>,
}

impl Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let who = caller(&req, self.insecure).inspect_err(|_| {
            if !self.admin_only {
                self.metrics.rejected.inc();
            }
        })?;
        if self.admin_only {
            require_admin(&who).inspect_err(|_| {
                self.metrics.rejected.inc();
            })?;
        }
        req.extensions_mut().insert(who);
        Ok(req)
    }
}

/// Checks the message's `cluster_id` field and that the authenticated caller may act as
/// that cluster.
///
/// # Errors
/// `INVALID_ARGUMENT` for a malformed id, `UNAUTHENTICATED` when no interceptor ran,
/// `PERMISSION_DENIED` for another identity.
pub fn acting_as<T>(req: &Request<T>, cluster_id: &str) -> Result<(), Status> {
    may_act_as(req.extensions().get::<Caller>(), cluster_id)
}

/// [`acting_as`] for a caller taken from a request earlier (a stream's messages).
///
/// # Errors
/// As [`acting_as`].
pub fn may_act_as(who: Option<&Caller>, cluster_id: &str) -> Result<(), Status> {
    check_cluster_id("cluster_id", cluster_id)?;
    let who = who.ok_or_else(|| Status::unauthenticated("no caller identity"))?;
    require_cluster(who, cluster_id)
}
