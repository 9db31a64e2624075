//! `ballast-broker`: serve, solve, certs, admin.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use ballast_broker::cli::admin::AdminArgs;
use ballast_broker::cli::args::{CertsArgs, ServeArgs};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ballast-broker",
    version,
    about = "ballast broker: weights for cross-cluster traffic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Solve one problem from a JSON file and print the weights as JSON (no server, no store).
    Solve {
        /// The problem: policy, params, clusters, rtt_ms, prices, optional cost, services.
        #[arg(long, value_name = "FILE.json")]
        input: PathBuf,
    },
    /// Run the broker: gRPC (mutual TLS) for agents and operators, store, solver, /metrics.
    Serve(Box<ServeArgs>),
    /// Make a lab CA, a server certificate, per-cluster client certificates and an admin one.
    Certs(CertsArgs),
    /// Operator commands against a running broker (the Admin service).
    Admin(AdminArgs),
}

async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let cfg = args.to_config().map_err(anyhow::Error::msg)?;
    // A hot standby waits inside `start` for the database lock: a signal then ends it.
    let mut running = tokio::select! {
        r = ballast_broker::server::start(cfg) => r.context("starting the broker")?,
        () = ballast_runtime::shutdown_signal() => {
            tracing::info!("shutting down before serving");
            return Ok(());
        }
    };
    let fallback = ballast_broker::policy::ClusterPolicy {
        policy: running.engine().config().policy,
        params: running.engine().config().params,
    };
    if let Some(rx) = ballast_broker::policy::spawn_policy_watcher_from_env(fallback)
        .await
        .context("starting the policy CRD watcher")?
    {
        tracing::info!("watching LoadBalancingPolicy / ServiceLoadBalancingPolicy objects");
        tokio::spawn(ballast_broker::policy::sync::follow(
            std::sync::Arc::clone(running.engine()),
            rx,
        ));
    }
    tokio::select! {
        () = running.wait() => {}
        () = ballast_runtime::shutdown_signal() => {}
    }
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

fn certs(args: &CertsArgs) -> anyhow::Result<String> {
    let bundle = ballast_broker::certs::generate(&args.clusters, &args.server_san)?;
    let files = bundle.write_to(&args.out)?;
    Ok(format!(
        "wrote {} files to {}: {}",
        files.len(),
        args.out.display(),
        files.join(" ")
    ))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn report(r: anyhow::Result<String>) -> ExitCode {
    match r {
        Ok(s) => {
            if !s.is_empty() {
                println!("{}", s.trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Solve { input } => report(ballast_broker::cli::solve::run(&input)),
        Command::Serve(args) => report(
            args.log
                .init()
                .map_err(anyhow::Error::from)
                .and_then(|()| runtime())
                .and_then(|rt| rt.block_on(serve(&args)).map(|()| String::new())),
        ),
        Command::Certs(args) => report(certs(&args)),
        Command::Admin(args) => {
            report(runtime().and_then(|rt| rt.block_on(ballast_broker::cli::admin::run(&args))))
        }
    }
}
