//! ICMP echo from inside a cluster (the host may have no `ping` binary).

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use surge_ping::{Client, Config, PingIdentifier, PingSequence};

use crate::error::{IoContext, LabError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReport {
    pub target: IpAddr,
    pub sent: u32,
    pub received: u32,
    pub rtts_ms: Vec<f64>,
    pub avg_ms: Option<f64>,
}

/// Sends `count` echo requests `interval` apart; each waits up to `timeout`.
pub async fn ping(
    target: IpAddr,
    count: u32,
    interval: Duration,
    timeout: Duration,
) -> Result<PingReport> {
    if count == 0 || count > 10_000 {
        return Err(LabError::invalid("count", "want 1..=10000"));
    }
    let client = Client::new(&Config::default()).ctx(|| "opening an ICMP socket".into())?;
    let mut pinger = client.pinger(target, PingIdentifier(rand::random())).await;
    pinger.timeout(timeout);
    let mut r = PingReport {
        target,
        sent: 0,
        received: 0,
        rtts_ms: Vec::new(),
        avg_ms: None,
    };
    for seq in 0..count {
        if seq > 0 {
            tokio::time::sleep(interval).await;
        }
        r.sent += 1;
        if let Ok((_, rtt)) = pinger.ping(PingSequence(seq as u16), &[0u8; 56]).await {
            r.received += 1;
            r.rtts_ms.push(rtt.as_secs_f64() * 1000.0);
        }
    }
    if !r.rtts_ms.is_empty() {
        r.avg_ms = Some(r.rtts_ms.iter().sum::<f64>() / r.rtts_ms.len() as f64);
    }
    Ok(r)
}
