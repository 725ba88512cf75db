//! Side-by-side benchmark: this library vs raw bollard vs the docker CLI,
//! on the same engine, image and containers, interleaved (A B C A B C ...)
//! so drift hits every contender alike. Prints one markdown table.
//!
//! ```sh
//! cargo build --release -p sandbox-host -p sandbox-bench  # case 6 runs `sandbox`
//! ./target/release/sandbox-bench                          # full run
//! cargo run -p sandbox-bench -- --smoke                   # CI smoke
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use bollard::query_parameters::RemoveContainerOptionsBuilder;
use bollard::Docker;
use clap::Parser;
use sandbox_host::config::Config;
use sandbox_host::DockerProvider;
use sandbox_host::{image, PolicySource, Sandbox};

use crate::cases::Bench;
use crate::report::Table;

mod baseline;
mod cases;
mod measure;
mod native_host;
mod report;

#[derive(Parser)]
#[command(about = "Benchmark sandbox against raw bollard and the docker CLI")]
struct Args {
    /// Iterations of the latency cases.
    #[arg(long, default_value_t = 40)]
    iterations: usize,
    /// A quick run for CI: few iterations, small concurrency and footprint.
    #[arg(long)]
    smoke: bool,
    /// Run only these cases (by number; repeatable). Every case by default.
    #[arg(long = "case", value_name = "N")]
    cases: Vec<u32>,
    /// Instead of the table: this many users' instances of POLICY (a
    /// component whose `get-thread-backend` for `alloc-*` threads allocates
    /// without bound, e.g. tests/fixtures/hostile-policy) all grow past
    /// their limit at once; prints the host's peak RSS against the
    /// host-wide policy memory cap.
    #[arg(long, value_name = "POLICY")]
    containment: Option<PathBuf>,
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Live users case 15 grows to (fewer when this machine's memory
    /// cannot hold them: the table says how many).
    #[arg(long, default_value_t = 1000)]
    scale_users: usize,
    /// Instead of the table: serve `--users` users once each with POLICY
    /// (`per-user` or a component path) on the in-memory provider and print
    /// the process's peak RSS in bytes (case 10 runs this as a child).
    #[arg(long, value_name = "POLICY")]
    pool_footprint: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(policy) = args.pool_footprint {
        return cases::policy_pool::pool_footprint(policy, args.users).await;
    }
    if let Some(policy) = args.containment {
        return cases::containment::containment(policy, args.users).await;
    }
    let root = tempfile::tempdir()?;
    let config = Config {
        namespace: format!("bench-{}", std::process::id()),
        workspace_root: root.path().to_owned(),
        ..Config::load(None)?
    };
    let provider = Arc::new(DockerProvider::from_config(&config));
    image::ensure(&provider, &config.image).await?;
    let sandbox = Sandbox::with_provider(
        config.clone(),
        provider,
        PolicySource::Builtin("per-user".into()),
    )
    .await?;
    let docker = Docker::connect_with_defaults()?.negotiate_version().await?;
    let version = docker.version().await?;
    println!(
        "sandbox-bench: {} cores, engine {} (API {}), image {}, {} iterations{}, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        version.version.unwrap_or_default(),
        version.api_version.unwrap_or_default(),
        config.image,
        if args.smoke { 5 } else { args.iterations },
        if args.smoke { " (smoke)" } else { "" },
        if cfg!(debug_assertions) {
            "DEBUG build"
        } else {
            "release build"
        },
    );
    let mut bench = Bench {
        config,
        sandbox,
        docker,
        iterations: if args.smoke { 5 } else { args.iterations },
        smoke: args.smoke,
        table: Table::default(),
        user_seq: 0,
        only: args.cases,
        scale_users: args.scale_users,
    };
    let result = cases::run(&mut bench).await;
    cleanup(&bench).await;
    result?;
    bench.table.print();
    Ok(())
}

/// Removes every container the bench's namespaces created.
async fn cleanup(bench: &Bench) {
    let ns = &bench.config.namespace;
    for namespace in [
        ns.clone(),
        format!("{ns}-user"),
        format!("{ns}-thread"),
        format!("{ns}-egress"),
        format!("{ns}-runsc"),
        format!("{ns}-runc"),
        format!("{ns}-quota"),
        format!("{ns}-plain"),
    ] {
        let mut filters = std::collections::HashMap::new();
        filters.insert("label", vec![format!("sandbox.namespace={namespace}")]);
        let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        if let Ok(list) = bench.docker.list_containers(Some(options)).await {
            for c in list {
                if let Some(id) = c.id {
                    let rm = RemoveContainerOptionsBuilder::default().force(true).build();
                    let _ = bench.docker.remove_container(&id, Some(rm)).await;
                }
            }
        }
    }
}
