//! The gRPC listener's accept side, bounded: at most `max_connections` open connections in
//! all and `max_per_peer` from one IP address (a new one over either cap is closed at once
//! and counted), and an accept loop that backs off when the process is out of file
//! descriptors (EMFILE/ENFILE) instead of spinning on failing `accept4` calls (logged once
//! per episode, counted).
//!
//! The handshake timeout, HTTP/2 keepalive and the stream cap are tonic's settings
//! (`server.rs`); this module only decides which TCP connections reach them.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, info, warn};

/// Caps on open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_per_peer: usize,
}

/// What the listener counts (handles into the broker's metrics).
#[derive(Debug, Clone, Default)]
pub struct ListenerMetrics {
    /// Connections closed at once because a cap was reached.
    pub refused: Counter,
    /// Accepts that failed for want of file descriptors.
    pub fd_exhausted: Counter,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// Counts a connection while it is open (released on drop).
#[derive(Debug)]
struct Permit {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut o = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.per_peer.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.per_peer.remove(&self.ip);
            }
        }
    }
}

fn admit(open: &Arc<Mutex<Open>>, limits: ConnectionLimits, ip: IpAddr) -> Option<Permit> {
    let mut o = open
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let from_peer = o.per_peer.get(&ip).copied().unwrap_or(0);
    if o.total >= limits.max_connections || from_peer >= limits.max_per_peer {
        return None;
    }
    o.total += 1;
    *o.per_peer.entry(ip).or_insert(0) += 1;
    Some(Permit {
        open: open.clone(),
        ip,
    })
}

/// One admitted TCP connection (its slot is freed when tonic drops it).
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    _permit: Permit,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Whether an accept error means the process or system is out of file descriptors.
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The first wait after an EMFILE/ENFILE; doubled up to [`MAX_BACKOFF`] while it lasts.
pub const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// The longest wait between accepts while descriptors are exhausted.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

struct AcceptState {
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: ListenerMetrics,
    open: Arc<Mutex<Open>>,
    backoff: Duration,
}

/// The admitted connections of `listener`, for tonic's `serve_with_incoming`. Never yields an
/// error: refused connections and failed accepts are handled here.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: ListenerMetrics,
) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let state = AcceptState {
        listener,
        limits,
        metrics,
        open: Arc::new(Mutex::new(Open::default())),
        backoff: Duration::ZERO,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            match st.listener.accept().await {
                Ok((stream, peer)) => {
                    if !st.backoff.is_zero() {
                        info!("accepting again: file descriptors available");
                        st.backoff = Duration::ZERO;
                    }
                    let Some(permit) = admit(&st.open, st.limits, peer.ip()) else {
                        st.metrics.refused.inc();
                        debug!(%peer, "connection refused: connection cap reached");
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let conn = Conn {
                        stream,
                        _permit: permit,
                    };
                    return Some((Ok(conn), st));
                }
                Err(e) if out_of_descriptors(&e) => {
                    st.metrics.fd_exhausted.inc();
                    if st.backoff.is_zero() {
                        warn!(error = %e, "out of file descriptors: accepting with backoff until some are freed");
                        st.backoff = MIN_BACKOFF;
                    } else {
                        st.backoff = (st.backoff * 2).min(MAX_BACKOFF);
                    }
                    tokio::time::sleep(st.backoff).await;
                }
                // ECONNABORTED and the like concern one connection only.
                Err(e) => debug!(error = %e, "accept failed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_total_and_per_peer_and_freed_on_drop() {
        let open = Arc::new(Mutex::new(Open::default()));
        let limits = ConnectionLimits {
            max_connections: 3,
            max_per_peer: 2,
        };
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let p1 = admit(&open, limits, a).expect("first from a");
        let _p2 = admit(&open, limits, a).expect("second from a");
        assert!(
            admit(&open, limits, a).is_none(),
            "a is at its per-peer cap"
        );
        let _p3 = admit(&open, limits, b).expect("b still fits the total");
        assert!(admit(&open, limits, b).is_none(), "the total cap");
        drop(p1);
        assert!(admit(&open, limits, a).is_some(), "a slot of a was freed");
    }

    #[test]
    fn only_descriptor_exhaustion_backs_off() {
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!out_of_descriptors(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
