//! The demo service's backend: `GET /` answers `{"cluster": "c2", "backend": "IP:PORT"}`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::error::{IoContext, Result};

/// The body a backend answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoReply {
    pub cluster: String,
    pub backend: String,
}

fn respond(req: &Request<Incoming>, body: &Bytes) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => (StatusCode::OK, body.clone()),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"only GET\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Serves on an already bound listener until the task is dropped.
pub async fn serve_on(listener: TcpListener, cluster: &str) -> Result<()> {
    let local = listener.local_addr().ctx(|| "local address".into())?;
    let reply = EchoReply {
        cluster: cluster.to_string(),
        backend: local.to_string(),
    };
    let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let r = respond(&req, &body);
                async move { Ok::<_, Infallible>(r) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!("connection: {e}");
            }
        });
    }
}

/// Binds `listen` and serves.
pub async fn serve(cluster: &str, listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .ctx(|| format!("binding {listen}"))?;
    tracing::info!(%listen, cluster, "echo backend up");
    serve_on(listener, cluster).await
}
