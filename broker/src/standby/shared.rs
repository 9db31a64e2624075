//! `--reuseport`: the gRPC listener in a `SO_REUSEPORT` group steered by the `sk_reuseport`
//! program (slot 0 = the serving process, slot 1 = the standby).

use std::net::SocketAddr;
use std::path::PathBuf;

use ballast_bpf::reuseport::{ReuseportGroup, Slot};
use tokio::net::{TcpListener, TcpSocket};
use tracing::{info, warn};

use super::StandbyError;

/// The accept backlog of a `--reuseport` listener: what a standby can hold, handshakes
/// completed by the kernel, between the primary's death and its first `accept`.
pub const LISTEN_BACKLOG: u32 = 4096;

/// `--reuseport` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReuseportConfig {
    /// bpffs directory of the pinned program and socket array.
    pub pin_dir: PathBuf,
    /// Attach the program (false: plain `SO_REUSEPORT`, the kernel spreads connections by
    /// hash over both processes, the waiting standby included; for comparison).
    pub program: bool,
}

/// The default pin dir for a port: `/sys/fs/bpf/ballast-broker-<port>`.
#[must_use]
pub fn default_pin_dir(port: u16) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/ballast-broker-{port}"))
}

/// A `SO_REUSEPORT` listener and, with the program, its place in the socket array.
#[derive(Debug)]
pub struct SharedListener {
    listener: TcpListener,
    group: Option<ReuseportGroup>,
}

impl SharedListener {
    /// Binds `addr` with `SO_REUSEPORT`, listens, and attaches the program to the group
    /// (loaded, or opened from the pins). The socket is in no slot yet.
    ///
    /// # Errors
    /// The bind (e.g. a process without `SO_REUSEPORT` holds the port) or the program.
    pub fn bind(addr: SocketAddr, cfg: &ReuseportConfig) -> Result<Self, StandbyError> {
        let bind_err = |source| StandbyError::Bind { addr, source };
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(bind_err)?;
        socket.set_reuseaddr(true).map_err(bind_err)?;
        socket.set_reuseport(true).map_err(bind_err)?;
        socket.bind(addr).map_err(bind_err)?;
        let listener = socket.listen(LISTEN_BACKLOG).map_err(bind_err)?;
        let group = if cfg.program {
            let prog_err = |source| StandbyError::Program {
                pin_dir: cfg.pin_dir.clone(),
                source: Box::new(source),
            };
            let group = ReuseportGroup::open(&cfg.pin_dir).map_err(prog_err)?;
            group.attach(&listener).map_err(prog_err)?;
            Some(group)
        } else {
            None
        };
        info!(%addr, program = cfg.program, pin_dir = %cfg.pin_dir.display(), "gRPC listener bound with SO_REUSEPORT");
        Ok(Self { listener, group })
    }

    /// The address bound.
    ///
    /// # Errors
    /// `getsockname` failed.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Slot 1: new connections come here only when slot 0 is empty (and requests of a
    /// closing slot-0 listener migrate here).
    ///
    /// # Errors
    /// The map update failed.
    pub fn enter_standby(&mut self) -> Result<(), StandbyError> {
        if let Some(g) = &mut self.group {
            if let Ok(Some(_)) = g.cookie(Slot::Standby) {
                warn!("slot 1 of the reuseport group held another standby's socket; replacing it");
            }
            g.set(Slot::Standby, &self.listener)
                .map_err(|source| StandbyError::Program {
                    pin_dir: g.pin_dir().to_path_buf(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// Slot 0 (then slot 1 cleared if it held this socket): every new connection comes here.
    ///
    /// # Errors
    /// The map update failed.
    pub fn promote(&mut self) -> Result<(), StandbyError> {
        if let Some(g) = &mut self.group {
            g.promote(&self.listener)
                .map_err(|source| StandbyError::Program {
                    pin_dir: g.pin_dir().to_path_buf(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// The listener, to accept from (the program and the slot stay with the socket).
    #[must_use]
    pub fn into_listener(self) -> TcpListener {
        self.listener
    }
}
