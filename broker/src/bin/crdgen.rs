//! `crdgen`: prints ballast's CRDs (derived from `ballast_k8s_api::policy`) as YAML, or writes one
//! file per CRD into a directory (the chart's `crds/`).
//!
//! ```text
//! cargo run -p ballast-broker --bin crdgen                                  # print
//! cargo run -p ballast-broker --bin crdgen -- --out helm/ballast-broker/crds # regenerate the chart's copy
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "crdgen",
    about = "Print or write ballast's CustomResourceDefinitions"
)]
struct Args {
    /// Write one `<plural>.<group>.yaml` per CRD into this directory instead of printing.
    #[arg(long, env = "BALLAST_CRDGEN_OUT", value_name = "DIR")]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.out {
        None => print!("{}", ballast_k8s_api::policy::crds_yaml()?),
        Some(dir) => {
            anyhow::ensure!(
                dir.is_dir(),
                "--out: {} is not an existing directory",
                dir.display()
            );
            for (name, yaml) in ballast_k8s_api::policy::crd_files()? {
                let path = dir.join(&name);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("--out: writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
