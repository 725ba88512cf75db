//! Side-by-side benchmark: this library vs raw bollard vs the docker CLI,
//! on the same engine, image and containers, interleaved (A B C A B C ...)
//! so drift hits every contender alike. Prints one markdown table.
//!
//! ```sh
//! cargo build --release --bins && ./target/release/sandbox-bench        # full run
//! ./target/release/sandbox-bench --smoke                                 # CI smoke
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::exec::StartExecResults;
use bollard::models::ExecConfig;
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use bollard::Docker;
use clap::Parser;
use futures_util::{stream, StreamExt};
use policy_core::mapping::PerUser;
use sandbox_host::capabilities::Capabilities;
use sandbox_host::config::{Config, UserIds};
use sandbox_host::plan::ContainerPlan;
use sandbox_host::provider::docker::{create_body, DockerProvider};
use sandbox_host::provider::memory::MemoryProvider;
use sandbox_host::{image, PolicySource, Sandbox};

#[derive(Parser)]
#[command(about = "Benchmark sandbox against raw bollard and the docker CLI")]
struct Args {
    /// Iterations of the latency cases.
    #[arg(long, default_value_t = 40)]
    iterations: usize,
    /// A quick run for CI: few iterations, small concurrency and footprint.
    #[arg(long)]
    smoke: bool,
    /// Instead of the table: this many users' instances of POLICY (a
    /// component whose `get-thread-backend` for `alloc-*` threads allocates
    /// without bound, e.g. tests/fixtures/hostile-policy) all grow past
    /// their limit at once; prints the host's peak RSS against the
    /// host-wide policy memory cap.
    #[arg(long, value_name = "POLICY")]
    containment: Option<PathBuf>,
    #[arg(long, default_value_t = 200)]
    users: usize,
}

/// `VmHWM` (peak RSS) and `VmRSS` of this process, in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Many users' policy instances trying to grow past their limit together:
/// the host-wide pool must hold the process's RSS.
async fn containment(policy: PathBuf, users: usize) -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let config = Config {
        namespace: format!("bench-{}", std::process::id()),
        workspace_root: root.path().to_owned(),
        maintenance_interval_secs: 0.0,
        ..Config::load(None)?
    };
    let sandbox = Sandbox::with_provider(
        config.clone(),
        Arc::new(MemoryProvider::new()),
        PolicySource::File(policy),
    )
    .await?;
    let (_, before) = rss();
    let started = Instant::now();
    let results = stream::iter(0..users)
        .map(|i| {
            let sandbox = sandbox.clone();
            async move { sandbox.get_thread_backend(&format!("alloc-{i}")).await }
        })
        .buffer_unordered(users)
        .collect::<Vec<_>>()
        .await;
    let trapped = results
        .iter()
        .filter(|r| matches!(r, Err(sandbox_host::SandboxError::PolicyTrap(_))))
        .count();
    let (peak, after) = rss();
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "containment: {users} users' instances grew past {} MiB each in {:.1}s; {trapped} trapped",
        config.policy_memory_bytes >> 20,
        started.elapsed().as_secs_f64()
    );
    println!(
        "host RSS: {:.0} MiB before, peak {:.0} MiB, {:.0} MiB after; host-wide policy memory cap {} MiB (uncapped it would be {} MiB)",
        mib(before),
        mib(peak),
        mib(after),
        config.policy_memory_total_bytes >> 20,
        (config.policy_memory_bytes >> 20) * users
    );
    anyhow::ensure!(trapped == users, "every instance must trap: {results:?}");
    anyhow::ensure!(
        peak.saturating_sub(before) <= config.policy_memory_total_bytes as u64 + (64 << 20),
        "peak RSS grew by more than the cap"
    );
    Ok(())
}

struct Row {
    case: String,
    ours: String,
    baseline: String,
    ratio: String,
    target: String,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn add(&mut self, case: &str, ours: String, baseline: String, ratio: String, target: &str) {
        println!("  {case}: ours {ours} | baseline {baseline} | {ratio} (target {target})");
        self.rows.push(Row {
            case: case.into(),
            ours,
            baseline,
            ratio,
            target: target.into(),
        });
    }

    fn print(&self) {
        println!("\n| case | ours | baseline | ratio | target |\n|---|---|---|---|---|");
        for r in &self.rows {
            println!(
                "| {} | {} | {} | {} | {} |",
                r.case, r.ours, r.baseline, r.ratio, r.target
            );
        }
    }
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn med_p95(s: &[Duration]) -> String {
    format!(
        "{} (p95 {})",
        ms(percentile(s, 0.5)),
        ms(percentile(s, 0.95))
    )
}

fn ratio(a: &[Duration], b: &[Duration]) -> f64 {
    percentile(a, 0.5).as_secs_f64() / percentile(b, 0.5).as_secs_f64()
}

async fn timed<T>(
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Duration)> {
    let start = Instant::now();
    let out = f.await?;
    Ok((out, start.elapsed()))
}

async fn raw_exec(docker: &Docker, container: &str) -> anyhow::Result<()> {
    let exec = docker
        .create_exec(
            container,
            ExecConfig {
                cmd: Some(vec!["sh".into(), "-c".into(), "true".into()]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await?;
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while let Some(chunk) = output.next().await {
            chunk?;
        }
    }
    let inspected = docker.inspect_exec(&exec.id).await?;
    anyhow::ensure!(inspected.exit_code == Some(0), "raw exec failed");
    Ok(())
}

async fn docker_cli(args: &[&str]) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("docker")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "docker {args:?} failed");
    Ok(())
}

struct Bench {
    config: Config,
    sandbox: Sandbox,
    docker: Docker,
    iterations: usize,
    smoke: bool,
    table: Table,
    user_seq: usize,
}

impl Bench {
    fn fresh_user(&mut self, tag: &str) -> String {
        self.user_seq += 1;
        format!("{tag}{}", self.user_seq)
    }

    /// (1) warm execute("true").
    async fn warm_exec(&mut self) -> anyhow::Result<Duration> {
        let backend = self.sandbox.get_thread_backend("warm-1").await?;
        backend.execute("true").await?;
        let container = backend.ensure_container().await?.id;
        let (mut ours, mut raw, mut cli) = (vec![], vec![], vec![]);
        for _ in 0..self.iterations {
            ours.push(timed(async { Ok(backend.execute("true").await?) }).await?.1);
            raw.push(timed(raw_exec(&self.docker, &container)).await?.1);
            cli.push(timed(docker_cli(&["exec", &container, "true"])).await?.1);
        }
        let case = "1. warm execute(\"true\")";
        self.table.add(
            &format!("{case} vs raw bollard exec"),
            med_p95(&ours),
            med_p95(&raw),
            format!("{:.3}", ratio(&ours, &raw)),
            "<= 1.05",
        );
        self.table.add(
            &format!("{case} vs `docker exec C true`"),
            med_p95(&ours),
            med_p95(&cli),
            format!("{:.3}", ratio(&ours, &cli)),
            "<= 0.75",
        );
        Ok(percentile(&ours, 0.5))
    }

    /// (2) cold first call for a new user.
    async fn cold_start(&mut self) -> anyhow::Result<()> {
        let owner = self.config.sandbox_user();
        let (mut ours, mut raw, mut cli) = (vec![], vec![], vec![]);
        let n = if self.smoke {
            3
        } else {
            self.iterations.min(20)
        };
        for _ in 0..n {
            let user = self.fresh_user("cold");
            let thread = format!("{user}-1");
            let sandbox = self.sandbox.clone();
            ours.push(
                timed(async {
                    let b = sandbox.get_thread_backend(&thread).await?;
                    Ok(b.execute("true").await?)
                })
                .await?
                .1,
            );
            self.sandbox.destroy_user_backend(&user).await?;

            let raw_user = self.fresh_user("raw");
            let path = self.config.workspace_root.join(&raw_user);
            std::fs::create_dir_all(&path)?;
            std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid))?;
            let plan = ContainerPlan::new(
                &self.config,
                &raw_user,
                &raw_user,
                path,
                owner,
                "raw-bollard",
            );
            let docker = &self.docker;
            let (id, took) = timed(async {
                let options = CreateContainerOptionsBuilder::default()
                    .name(&plan.name)
                    .build();
                let created = docker
                    .create_container(Some(options), create_body(&plan))
                    .await?;
                docker.start_container(&created.id, None).await?;
                raw_exec(docker, &created.id).await?;
                Ok(created.id)
            })
            .await?;
            raw.push(took);
            let rm = RemoveContainerOptionsBuilder::default().force(true).build();
            docker.remove_container(&id, Some(rm)).await?;

            let image = self.config.image.clone();
            cli.push(
                timed(docker_cli(&[
                    "run",
                    "--rm",
                    "--network",
                    "none",
                    &image,
                    "true",
                ]))
                .await?
                .1,
            );
        }
        self.table.add(
            "2. cold first call (ensure + exec) vs raw bollard create+start+exec",
            med_p95(&ours),
            med_p95(&raw),
            format!("{:.3}", ratio(&ours, &raw)),
            "(context)",
        );
        self.table.add(
            "2. cold first call vs `docker run --rm IMG true`",
            med_p95(&ours),
            med_p95(&cli),
            format!("{:.3}", ratio(&ours, &cli)),
            "<= 0.6",
        );
        Ok(())
    }

    /// (3) the policy's own cost, on the in-memory provider.
    async fn policy_cost(&mut self, exec_median: Duration) -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let config = Config {
            workspace_root: root.path().to_owned(),
            sandbox_user: Some(my_ids()),
            ..self.config.clone()
        };
        let provider = Arc::new(MemoryProvider::new());
        let sandbox = Sandbox::with_provider(
            config.clone(),
            provider.clone(),
            PolicySource::Builtin("per-user".into()),
        )
        .await?;
        let backend = sandbox.get_thread_backend("alice-1").await?;
        backend.ensure_container().await?;
        let rounds = if self.smoke { 200 } else { 5000 };
        let mut wasm = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = Instant::now();
            let b = sandbox.get_thread_backend("alice-1").await?;
            b.ensure_container().await?;
            wasm.push(start.elapsed());
        }

        let caps = Capabilities::new(config, provider);
        let mut native_policy = policy_core::Policy::new(PerUser);
        let mut host = NativeHost { caps: &caps };
        let id = native_policy.backend_id("alice-1")?;
        native_policy.ensure_container(&mut host, &id)?;
        let mut native = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = Instant::now();
            let id = native_policy.backend_id("alice-1")?;
            native_policy.get_thread_backend(&mut host, "alice-1")?;
            native_policy.ensure_container(&mut host, &id)?;
            native.push(start.elapsed());
        }
        let us = |d: Duration| format!("{:.1} us", d.as_secs_f64() * 1e6);
        let wasm_med = percentile(&wasm, 0.5);
        self.table.add(
            "3. warm get-thread-backend + ensure-container: component (full host path) vs native policy-core",
            format!("{} (p95 {})", us(wasm_med), us(percentile(&wasm, 0.95))),
            format!("{} (p95 {})", us(percentile(&native, 0.5)), us(percentile(&native, 0.95))),
            format!("{:.1}x", ratio(&wasm, &native)),
            "(context)",
        );
        self.table.add(
            "3. policy path as a share of one warm exec round trip",
            us(wasm_med),
            ms(exec_median),
            format!(
                "{:.3}%",
                100.0 * wasm_med.as_secs_f64() / exec_median.as_secs_f64()
            ),
            "<= 1%",
        );
        Ok(())
    }

    /// (4) 20 users x 10 threads, all first calls at once; then warm
    /// throughput at concurrency 50.
    async fn concurrency(&mut self) -> anyhow::Result<()> {
        let (users, threads) = if self.smoke { (4, 3) } else { (20, 10) };
        let batch: Vec<String> = (0..users).map(|_| self.fresh_user("conc")).collect();
        let before = self.sandbox.list().await?.len();
        let start = Instant::now();
        let calls = batch
            .iter()
            .flat_map(|u| (0..threads).map(move |t| format!("{u}-{t}")));
        let tasks: Vec<_> = calls
            .map(|thread| {
                let sandbox = self.sandbox.clone();
                tokio::spawn(async move {
                    let b = sandbox.get_thread_backend(&thread).await?;
                    b.execute("true").await
                })
            })
            .collect();
        for t in futures_util::future::join_all(tasks).await {
            t??;
        }
        let concurrent = start.elapsed();
        let created = self.sandbox.list().await?.len() - before;

        let seq_users: Vec<String> = (0..users).map(|_| self.fresh_user("seq")).collect();
        let start = Instant::now();
        for u in &seq_users {
            for t in 0..threads {
                let b = self.sandbox.get_thread_backend(&format!("{u}-{t}")).await?;
                b.execute("true").await?;
            }
        }
        let sequential = start.elapsed();
        for u in &seq_users {
            self.sandbox.destroy_user_backend(u).await?;
        }
        self.table.add(
            &format!(
                "4. {users} users x {threads} threads, first calls at once: containers created"
            ),
            created.to_string(),
            format!("{users} expected"),
            if created == users {
                "exact".into()
            } else {
                "WRONG".into()
            },
            &format!("exactly {users}"),
        );
        self.table.add(
            "4. same burst: concurrent wall vs sequential wall",
            ms(concurrent),
            ms(sequential),
            format!("{:.3}", concurrent.as_secs_f64() / sequential.as_secs_f64()),
            "<= 0.5",
        );

        // Warm throughput at concurrency 50 over those users' containers.
        let total = if self.smoke { 50 } else { 600 };
        let mut backends = Vec::new();
        let mut containers = Vec::new();
        for u in &batch {
            let b = self.sandbox.get_thread_backend(&format!("{u}-0")).await?;
            containers.push(b.ensure_container().await?.id);
            backends.push(b);
        }
        let (mut ours, mut raw) = (vec![], vec![]);
        for _ in 0..3 {
            let start = Instant::now();
            stream::iter(0..total)
                .map(|i| {
                    let b = backends[i % backends.len()].clone();
                    async move { b.execute("true").await }
                })
                .buffer_unordered(50)
                .for_each(|r| async move {
                    r.expect("warm execute");
                })
                .await;
            ours.push(total as f64 / start.elapsed().as_secs_f64());
            let start = Instant::now();
            let docker = &self.docker;
            let containers = &containers;
            stream::iter(0..total)
                .map(|i| async move { raw_exec(docker, &containers[i % containers.len()]).await })
                .buffer_unordered(50)
                .for_each(|r| async move {
                    r.expect("raw exec");
                })
                .await;
            raw.push(total as f64 / start.elapsed().as_secs_f64());
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (ours, raw) = (median(&mut ours), median(&mut raw));
        self.table.add(
            "4. warm executes at concurrency 50: throughput vs raw bollard (median of 3 interleaved rounds)",
            format!("{ours:.0}/s"),
            format!("{raw:.0}/s"),
            format!("{:.3}", ours / raw),
            ">= 0.9",
        );
        for u in &batch {
            self.sandbox.destroy_user_backend(u).await?;
        }
        Ok(())
    }

    /// (5) B's warm latency alone vs while 10 other users cold-start.
    async fn head_of_line(&mut self) -> anyhow::Result<()> {
        let b = self.sandbox.get_thread_backend("hol-1").await?;
        b.execute("true").await?;
        let n = if self.smoke {
            10
        } else {
            self.iterations.max(60)
        };
        let container = b.ensure_container().await?.id;
        let docker = self.docker.clone();
        let (mut alone, mut raw_alone) = (Vec::new(), Vec::new());
        for _ in 0..n {
            alone.push(timed(async { Ok(b.execute("true").await?) }).await?.1);
            raw_alone.push(timed(raw_exec(&docker, &container)).await?.1);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let starters: Vec<String> = (0..10).map(|_| self.fresh_user("hols")).collect();
        let mut handles = Vec::new();
        for (i, u) in starters.iter().enumerate() {
            let sandbox = self.sandbox.clone();
            let stop = stop.clone();
            let u = u.clone();
            handles.push(tokio::spawn(async move {
                let mut round = 0;
                let mut cold_starts = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    round += 1;
                    let thread = format!("{u}x{i}r{round}-1");
                    let user = thread.split('-').next().unwrap().to_owned();
                    if let Ok(b) = sandbox.get_thread_backend(&thread).await {
                        if b.execute("true").await.is_ok() {
                            cold_starts += 1;
                        }
                    }
                    let _ = sandbox.destroy_user_backend(&user).await;
                }
                cold_starts
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (mut busy, mut raw_busy) = (Vec::new(), Vec::new());
        for _ in 0..n {
            busy.push(timed(async { Ok(b.execute("true").await?) }).await?.1);
            raw_busy.push(timed(raw_exec(&docker, &container)).await?.1);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut cold_total = 0;
        for h in handles {
            cold_total += h.await?;
        }
        let p = |s: &[Duration]| {
            format!(
                "p50 {} / p99 {}",
                ms(percentile(s, 0.5)),
                ms(percentile(s, 0.99))
            )
        };
        let p99 = |s: &[Duration]| percentile(s, 0.99).as_secs_f64();
        self.table.add(
            "5. the engine's floor: raw bollard exec on B's container, same load vs alone",
            p(&raw_busy),
            p(&raw_alone),
            format!("p99 {:.3}", p99(&raw_busy) / p99(&raw_alone)),
            "(context)",
        );
        self.table.add(
            &format!("5. user B warm execute while 10 users cold-start ({cold_total} cold starts) vs alone"),
            p(&busy),
            p(&alone),
            format!(
                "p99 {:.3}",
                percentile(&busy, 0.99).as_secs_f64() / percentile(&alone, 0.99).as_secs_f64()
            ),
            "p99 <= 1.5",
        );
        Ok(())
    }

    /// (6) `sandbox exec` as a process vs `docker exec`.
    async fn cli_process(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?.with_file_name("sandbox");
        if !exe.exists() {
            println!(
                "  6. skipped: {} missing (cargo build --release --bins)",
                exe.display()
            );
            return Ok(());
        }
        let b = self.sandbox.get_thread_backend("cli-1").await?;
        b.execute("true").await?;
        let container = b.ensure_container().await?.id;
        let run_ours = || {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(["exec", "cli-1", "--", "true"])
                .env("SANDBOX_NAMESPACE", &self.config.namespace)
                .env("SANDBOX_WORKSPACE_ROOT", &self.config.workspace_root)
                .env("SANDBOX_IMAGE", &self.config.image)
                .env("RUST_LOG", "error")
                .stdout(std::process::Stdio::null());
            cmd
        };
        // Warm the component cache once, as any second run would find it.
        run_ours().status().await?;
        let (mut ours, mut cli) = (vec![], vec![]);
        let n = if self.smoke {
            3
        } else {
            self.iterations.min(30)
        };
        for _ in 0..n {
            ours.push(
                timed(async {
                    let s = run_ours().status().await?;
                    anyhow::ensure!(s.success(), "sandbox exec failed");
                    Ok(())
                })
                .await?
                .1,
            );
            cli.push(timed(docker_cli(&["exec", &container, "true"])).await?.1);
        }
        self.table.add(
            "6. `sandbox exec alice-1 -- true` process vs `docker exec C true`",
            med_p95(&ours),
            med_p95(&cli),
            format!("{:.3}", ratio(&ours, &cli)),
            "<= 1.0",
        );
        Ok(())
    }

    /// (8) the HTTP API under load: 200 requests in flight over 50 users,
    /// vs the library called directly at the same concurrency.
    async fn http_load(&mut self) -> anyhow::Result<()> {
        use http_body_util::{BodyExt, Full};
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;

        let (users, in_flight, total) = if self.smoke {
            (5, 20, 40)
        } else {
            (50, 200, 1000)
        };
        let token = "bench-token".to_owned();
        let state = Arc::new(sandbox_host::serve::AppState::new(
            self.sandbox.clone(),
            Some(token.clone()),
        ));
        let app = sandbox_host::serve::router(state, 1 << 20);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let batch: Vec<String> = (0..users).map(|_| self.fresh_user("http")).collect();
        let mut backends = Vec::new();
        for u in &batch {
            let b = self.sandbox.get_thread_backend(&format!("{u}-1")).await?;
            b.execute("true").await?;
            backends.push(b);
        }
        let client: Client<_, Full<hyper::body::Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(in_flight)
            .build_http();
        let (mut http, mut direct) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let start = Instant::now();
            let latencies: Vec<Duration> = stream::iter(0..total)
                .map(|i| {
                    let client = client.clone();
                    let url = format!("http://{addr}/v1/threads/{}-1/exec", batch[i % batch.len()]);
                    let token = token.clone();
                    async move {
                        let t = Instant::now();
                        let req = hyper::Request::post(url)
                            .header("authorization", format!("Bearer {token}"))
                            .header("content-type", "application/json")
                            .body(Full::new(hyper::body::Bytes::from_static(
                                b"{\"command\":\"echo ok\"}",
                            )))
                            .expect("request");
                        let resp = client.request(req).await.expect("http");
                        assert!(resp.status().is_success(), "status {}", resp.status());
                        resp.into_body().collect().await.expect("body");
                        t.elapsed()
                    }
                })
                .buffer_unordered(in_flight)
                .collect()
                .await;
            http.push((total as f64 / start.elapsed().as_secs_f64(), latencies));

            let start = Instant::now();
            let latencies: Vec<Duration> = stream::iter(0..total)
                .map(|i| {
                    let b = backends[i % backends.len()].clone();
                    async move {
                        let t = Instant::now();
                        b.execute("echo ok").await.expect("execute");
                        t.elapsed()
                    }
                })
                .buffer_unordered(in_flight)
                .collect()
                .await;
            direct.push((total as f64 / start.elapsed().as_secs_f64(), latencies));
        }
        server.abort();
        let best = |runs: &[(f64, Vec<Duration>)]| {
            runs.iter()
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .cloned()
                .expect("two runs")
        };
        let (h, d) = (best(&http), best(&direct));
        let show = |(rate, lat): &(f64, Vec<Duration>)| {
            format!(
                "{rate:.0}/s, p50 {} p99 {}",
                ms(percentile(lat, 0.5)),
                ms(percentile(lat, 0.99))
            )
        };
        self.table.add(
            &format!("8. HTTP API, {in_flight} requests in flight over {users} users ({total} execs) vs library direct"),
            show(&h),
            show(&d),
            format!("{:.3}", h.0 / d.0),
            "(report)",
        );
        for u in &batch {
            self.sandbox.destroy_user_backend(u).await?;
        }
        Ok(())
    }

    /// (9) a 50 MB file in and out: upload_files + download_files vs
    /// `docker cp` both ways.
    async fn file_transfer(&mut self) -> anyhow::Result<()> {
        let size = if self.smoke { 5 << 20 } else { 50 << 20 };
        let b = self.sandbox.get_thread_backend("files-1").await?;
        b.execute("true").await?;
        let container = b.ensure_container().await?.id;
        let content: Vec<u8> = (0..size)
            .map(|i: usize| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let local = tempfile::tempdir()?;
        let src = local.path().join("in.bin");
        std::fs::write(&src, &content)?;
        let (mut ours, mut cli) = (vec![], vec![]);
        for _ in 0..3 {
            let upload = sandbox_host::files::Upload {
                path: "big.bin".into(),
                content: content.clone(),
                mode: None,
            };
            let t = Instant::now();
            let r = b.upload_files(vec![upload]).await?;
            anyhow::ensure!(r[0].error.is_none(), "upload failed");
            let got = b.download_files(&["big.bin".into()]).await?;
            anyhow::ensure!(
                got[0].content.as_ref().map(Vec::len) == Some(size),
                "download failed"
            );
            ours.push(t.elapsed());

            let dst = local.path().join("out.bin");
            let t = Instant::now();
            docker_cli(&[
                "cp",
                &src.display().to_string(),
                &format!("{container}:/workspace/cp.bin"),
            ])
            .await?;
            docker_cli(&[
                "cp",
                &format!("{container}:/workspace/cp.bin"),
                &dst.display().to_string(),
            ])
            .await?;
            cli.push(t.elapsed());
        }
        let rate = |d: Duration| format!("{:.0} MB/s", 2.0 * size as f64 / 1e6 / d.as_secs_f64());
        self.table.add(
            &format!(
                "9. {} MB file up + down: upload_files/download_files vs `docker cp` both ways",
                size >> 20
            ),
            format!(
                "{} ({})",
                ms(percentile(&ours, 0.5)),
                rate(percentile(&ours, 0.5))
            ),
            format!(
                "{} ({})",
                ms(percentile(&cli, 0.5)),
                rate(percentile(&cli, 0.5))
            ),
            format!("{:.3}", ratio(&ours, &cli)),
            "(report)",
        );
        Ok(())
    }

    /// (7) footprint.
    async fn footprint(&mut self) -> anyhow::Result<()> {
        let n = if self.smoke { 500 } else { 10_000 };
        let root = tempfile::tempdir()?;
        let config = Config {
            workspace_root: root.path().to_owned(),
            sandbox_user: Some(my_ids()),
            ..self.config.clone()
        };
        let rss_before = rss_kib();
        let sandbox = Sandbox::with_provider(
            config,
            Arc::new(MemoryProvider::new()),
            PolicySource::Builtin("per-user".into()),
        )
        .await?;
        for i in 0..n {
            let b = sandbox.get_thread_backend(&format!("fp{i}-1")).await?;
            b.ensure_container().await?;
        }
        let rss_after = rss_kib();
        let delta = rss_after.saturating_sub(rss_before);
        let instances = sandbox.policy_instances();
        self.table.add(
            &format!(
                "7. host RSS with {n} backends in use (in-memory provider; {instances} policy instances kept, the rest evicted and re-adopted on use)"
            ),
            format!("{:.1} MiB (+{:.1} KiB/backend)", delta as f64 / 1024.0, delta as f64 / n as f64),
            format!("{:.1} MiB before", rss_before as f64 / 1024.0),
            "-".into(),
            "(report)",
        );
        drop(sandbox);

        let (users, threads) = if self.smoke { (2, 3) } else { (10, 10) };
        let mut figures = Vec::new();
        for policy in ["per-user", "per-thread"] {
            let ns = format!("{}-{}", self.config.namespace, &policy[4..]);
            let config = Config {
                namespace: ns.clone(),
                ..self.config.clone()
            };
            let sandbox = Sandbox::with_provider(
                config.clone(),
                Arc::new(DockerProvider::from_config(&config)),
                PolicySource::Builtin(policy.into()),
            )
            .await?;
            let engine_before = engine_rss_kib();
            let batch: Vec<String> = (0..users).map(|_| self.fresh_user("fp")).collect();
            for u in &batch {
                for t in 0..threads {
                    sandbox
                        .get_thread_backend(&format!("{u}-{t}"))
                        .await?
                        .execute("true")
                        .await?;
                }
            }
            let containers = sandbox.list().await?;
            let mut memory = 0u64;
            for c in &containers {
                memory += container_memory(&self.docker, &c.id).await.unwrap_or(0);
            }
            let engine_delta = engine_rss_kib().saturating_sub(engine_before);
            figures.push((policy, containers.len(), memory, engine_delta));
            for u in &batch {
                sandbox.destroy_user_backend(u).await?;
            }
        }
        let show = |f: &(&str, usize, u64, u64)| {
            format!(
                "{}: {} containers, {:.1} MiB in containers, +{:.1} MiB engine (dockerd+shims)",
                f.0,
                f.1,
                f.2 as f64 / 1048576.0,
                f.3 as f64 / 1024.0
            )
        };
        self.table.add(
            &format!(
                "7. {} threads of {users} users: per-user vs per-thread policy",
                users * threads
            ),
            show(&figures[0]),
            show(&figures[1]),
            format!(
                "{:.1}x fewer containers",
                figures[1].1 as f64 / figures[0].1.max(1) as f64
            ),
            ">= 10x fewer",
        );
        Ok(())
    }
}

/// The native policy's host: the same capabilities, driven synchronously
/// (the in-memory provider never actually waits).
struct NativeHost<'a> {
    caps: &'a Capabilities,
}

fn now<T>(
    f: impl std::future::Future<Output = sandbox_host::error::Result<T>>,
) -> policy_core::host::Result<T> {
    use futures_util::FutureExt;
    match f.now_or_never() {
        Some(r) => r.map_err(|e| policy_core::Error::Other(e.to_string())),
        None => Err(policy_core::Error::Other("would block".into())),
    }
}

fn to_core(c: sandbox_host::ManagedContainer) -> policy_core::Container {
    policy_core::Container {
        id: c.id,
        name: c.name,
        backend_id: c.backend_id,
        workspace: c.workspace,
        status: c.status,
        last_used_ms: c.last_used_ms,
    }
}

impl policy_core::Host for NativeHost<'_> {
    fn find(
        &mut self,
        backend_id: &str,
    ) -> policy_core::host::Result<Option<policy_core::Container>> {
        now(self.caps.find(backend_id)).map(|c| c.map(to_core))
    }
    fn list(&mut self) -> policy_core::host::Result<Vec<policy_core::Container>> {
        now(self.caps.list_managed()).map(|v| v.into_iter().map(to_core).collect())
    }
    fn create(
        &mut self,
        backend_id: &str,
        workspace: &str,
    ) -> policy_core::host::Result<policy_core::Container> {
        now(self.caps.create(backend_id, workspace, "native")).map(to_core)
    }
    fn start(&mut self, container_id: &str) -> policy_core::host::Result<()> {
        now(self.caps.start(container_id))
    }
    fn inspect(
        &mut self,
        container_id: &str,
    ) -> policy_core::host::Result<Option<policy_core::Container>> {
        now(self.caps.inspect(container_id)).map(|c| c.map(to_core))
    }
    fn remove(&mut self, container_id: &str) -> policy_core::host::Result<bool> {
        now(self.caps.remove(container_id))
    }
    fn prepare_workspace(&mut self, name: &str) -> policy_core::host::Result<()> {
        self.caps
            .prepare_workspace(name)
            .map_err(|e| policy_core::Error::Other(e.to_string()))
    }
    fn now_ms(&mut self) -> u64 {
        sandbox_host::capabilities::now_ms()
    }
    fn policy_config(&mut self) -> Vec<(String, String)> {
        Vec::new()
    }
    fn log(&mut self, _level: policy_core::Level, _message: &str) {}
}

fn my_ids() -> UserIds {
    UserIds {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    }
}

fn rss_kib() -> u64 {
    proc_rss_kib("self")
}

fn proc_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// RSS of dockerd, containerd and every containerd shim.
fn engine_rss_kib() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let comm = comm.trim();
            (comm == "dockerd" || comm == "containerd" || comm.starts_with("containerd-shim"))
                .then(|| proc_rss_kib(&pid))
        })
        .sum()
}

async fn container_memory(docker: &Docker, id: &str) -> anyhow::Result<u64> {
    let options = bollard::query_parameters::StatsOptionsBuilder::default()
        .stream(false)
        .one_shot(true)
        .build();
    let mut stats = docker.stats(id, Some(options));
    let s = stats.next().await.context("no stats")??;
    Ok(s.memory_stats.and_then(|m| m.usage).unwrap_or(0))
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
    if let Some(policy) = args.containment {
        return containment(policy, args.users).await;
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
    };
    let result = run(&mut bench).await;
    cleanup(&bench).await;
    result?;
    bench.table.print();
    Ok(())
}

async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let exec_median = bench.warm_exec().await.context("case 1")?;
    bench.cold_start().await.context("case 2")?;
    bench.policy_cost(exec_median).await.context("case 3")?;
    bench.concurrency().await.context("case 4")?;
    bench.head_of_line().await.context("case 5")?;
    bench.cli_process().await.context("case 6")?;
    bench.footprint().await.context("case 7")?;
    bench.http_load().await.context("case 8")?;
    bench.file_transfer().await.context("case 9")?;
    Ok(())
}

/// Removes every container the bench's namespaces created.
async fn cleanup(bench: &Bench) {
    let ns = &bench.config.namespace;
    for namespace in [ns.clone(), format!("{ns}-user"), format!("{ns}-thread")] {
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
    let _: Option<PathBuf> = None;
}
