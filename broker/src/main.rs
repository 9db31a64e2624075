//! `ballast-broker`: serve, solve, certs.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "ballast-broker", version, about = "ballast broker: weights for cross-cluster traffic")]
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Solve { input } => match ballast_broker::solve_cli::run(&input) {
            Ok(json) => {
                println!("{json}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}
