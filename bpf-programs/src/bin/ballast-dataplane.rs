//! `ballast-dataplane`: steering from a static file on one host.
//!
//! - `apply --cgroup DIR [--pin-dir DIR] FILE.yaml`: attach if needed, make the maps hold
//!   exactly the file's services (each change atomic); an invalid file changes nothing.
//! - `show [--pin-dir DIR] --json`: services, backends, health, weights, connect counters and
//!   payload bytes sent/received per backend.
//! - `detach --cgroup DIR [--pin-dir DIR]`: detach and unpin.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ballast_bpf::{config, Dataplane, DEFAULT_PIN_DIR};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ballast-dataplane",
    version,
    about = "ballast kernel data plane from a static file"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct PinDir {
    /// bpffs directory holding the pinned maps and links
    #[arg(long, env = "BALLAST_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach to the cgroup (if not yet) and install exactly the services of FILE
    Apply {
        /// cgroup v2 directory whose processes are steered
        #[arg(long, env = "BALLAST_CGROUP")]
        cgroup: PathBuf,
        #[command(flatten)]
        pin: PinDir,
        /// services file (YAML)
        file: PathBuf,
    },
    /// Print services, backends, health, weights, connect counters and bytes per backend
    Show {
        #[command(flatten)]
        pin: PinDir,
        /// JSON output (the only format)
        #[arg(long, env = "BALLAST_JSON")]
        json: bool,
    },
    /// Detach from the cgroup and unpin
    Detach {
        #[arg(long, env = "BALLAST_CGROUP")]
        cgroup: PathBuf,
        #[command(flatten)]
        pin: PinDir,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Apply { cgroup, pin, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let specs =
                config::parse(&text).with_context(|| format!("invalid {}", file.display()))?;
            if !cgroup.join("cgroup.procs").exists() {
                bail!(ballast_bpf::Error::CgroupMissing(cgroup));
            }
            let mut dp = Dataplane::open(&pin.pin_dir)?;
            dp.attach(&cgroup)?;
            let before: Vec<_> = dp.services()?.into_iter().map(|s| s.spec).collect();
            dp.apply(&specs)?;
            eprintln!("applied {} services to {}", specs.len(), cgroup.display());
            // connections steered to a backend that turned unhealthy go: their clients
            // reconnect and are steered to a healthy one
            let failed = ballast_bpf::sockdiag::newly_unhealthy(&before, &specs);
            if !failed.is_empty() {
                let r = dp.destroy_sockets_to_in(&failed, &cgroup)?;
                eprintln!(
                    "closed {} connection(s) to {} unhealthy backend(s){}",
                    r.destroyed,
                    failed.len(),
                    if r.failed.is_empty() {
                        String::new()
                    } else {
                        format!("; could not close: {}", r.failed.join(", "))
                    }
                );
            }
        }
        Cmd::Show { pin, json } => {
            if !json {
                bail!("--json is required (the only output format)");
            }
            if !pin.pin_dir.join("blst_svc").exists() {
                bail!(
                    "nothing pinned under {} (run apply first)",
                    pin.pin_dir.display()
                );
            }
            let dp = Dataplane::open(&pin.pin_dir)?;
            let counters = dp.counters()?;
            let services: Vec<serde_json::Value> = dp
                .services()?
                .into_iter()
                .map(|s| {
                    let mut v = serde_json::to_value(&s).unwrap_or_default();
                    if let Some(bs) = v.get_mut("backends").and_then(|b| b.as_array_mut()) {
                        for (b, spec) in bs.iter_mut().zip(&s.spec.backends) {
                            let c = counters
                                .iter()
                                .find(|c| c.service == s.spec.name && c.backend == spec.addr);
                            b["connects"] = c.map_or(0, |c| c.connects).into();
                            b["bytes_sent"] = c.map_or(0, |c| c.bytes_sent).into();
                            b["bytes_received"] = c.map_or(0, |c| c.bytes_received).into();
                            b["cluster_id"] = ballast_bpf::cluster_id(&spec.cluster).into();
                        }
                    }
                    v
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "services": services }))?
            );
        }
        Cmd::Detach { cgroup, pin } => {
            let mut dp = Dataplane::open(&pin.pin_dir)?;
            dp.detach(&cgroup)?;
            eprintln!("detached from {}", cgroup.display());
        }
    }
    Ok(())
}
