//! Case 15: flat with users. Warm throughput through `sandbox serve`'s
//! router (in process, kept-alive connections) at concurrency 16, spread
//! over every live user, with 100 live users and then with 1,000 (or as many
//! as this machine's memory holds), in one process; and what a live user
//! costs: the host process, the agent in its container, the engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};

use super::Bench;
use crate::measure::{engine_rss_kib, rss_kib};
use crate::report::{ms, percentile};

/// Requests in flight.
const CONCURRENCY: usize = 16;
/// Cold starts under way at once while users are added (the host's
/// lifecycle slots queue them further).
const CREATING: usize = 8;

impl Bench {
    /// (15) throughput with many live users vs few, and the cost of one.
    pub(crate) async fn scale(&mut self) -> anyhow::Result<()> {
        use http_body_util::{BodyExt, Full};
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;

        let (few, wanted, calls) = if self.smoke {
            (3, 6, 60)
        } else {
            (100, self.scale_users, 4000)
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
        let client: Client<_, Full<hyper::body::Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(CONCURRENCY)
            .build_http();

        // Warm throughput over `users`, each call to the next user in turn.
        let load = |users: Vec<String>| {
            let (client, token) = (client.clone(), token.clone());
            async move {
                let start = Instant::now();
                let latencies: Vec<Duration> = stream::iter(0..calls)
                    .map(|i| {
                        let client = client.clone();
                        let url =
                            format!("http://{addr}/v1/threads/{}-1/exec", users[i % users.len()]);
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
                    .buffer_unordered(CONCURRENCY)
                    .collect()
                    .await;
                (calls as f64 / start.elapsed().as_secs_f64(), latencies)
            }
        };

        let mut users: Vec<String> = Vec::new();
        let host_before = rss_kib();
        let engine_before = engine_rss_kib();
        self.add_live_users(&mut users, few).await?;
        let host_few = rss_kib();
        let engine_few = engine_rss_kib();
        let per_user_engine = engine_few.saturating_sub(engine_before) as f64 / few as f64 * 1024.0;
        // As many more as this machine's memory holds: at the engine's cost
        // per user just measured, plus the agent's and a margin for the
        // kernel's share, within 80 % of what is available.
        let available = available_bytes();
        let agent_bytes = self.agent_rss_kib(&users[0]).await? as f64 * 1024.0;
        let per_user = per_user_engine + agent_bytes + 2.0 * 1024.0 * 1024.0;
        let fits = ((available as f64 * 0.8) / per_user.max(1.0)) as usize + few;
        let many = wanted.min(fits).max(few);
        let few_run = load(users.clone()).await;
        let started = Instant::now();
        self.add_live_users(&mut users, many).await?;
        let adding = started.elapsed();
        let many_run = load(users.clone()).await;
        // The same few users again, with the many live.
        let few_again = load(users[..few].to_vec()).await;
        let host_many = rss_kib();
        let engine_many = engine_rss_kib();
        let agent = self.agent_rss_kib(&users[0]).await?;
        server.abort();

        let show = |(rate, lat): &(f64, Vec<Duration>)| {
            format!(
                "{rate:.0}/s, p50 {} p99 {}",
                ms(percentile(lat, 0.5)),
                ms(percentile(lat, 0.99))
            )
        };
        let why = if many < wanted {
            format!(
                " ({wanted} asked; {} MiB available held {many})",
                available >> 20
            )
        } else {
            String::new()
        };
        self.table.add(
            &format!(
                "15. warm HTTP execs at concurrency {CONCURRENCY} over every live user: \
                 {many} live users vs {few}{why}"
            ),
            show(&many_run),
            show(&few_run),
            format!("{:.3}", many_run.0 / few_run.0),
            ">= 0.8",
        );
        self.table.add(
            &format!("15. the same over the first {few} users, {many} live vs {few} live"),
            show(&few_again),
            show(&few_run),
            format!("{:.3}", few_again.0 / few_run.0),
            "(context)",
        );
        let extra = (many - few).max(1) as f64;
        self.table.add(
            "15. memory per live user: host process / agent (init + serve) / engine (dockerd, containerd, shim)",
            format!(
                "{:.1} KiB / {:.2} MiB / {:.2} MiB",
                host_many.saturating_sub(host_few) as f64 / extra,
                agent as f64 / 1024.0,
                engine_many.saturating_sub(engine_few) as f64 / extra / 1024.0
            ),
            format!(
                "host {:.1} MiB with {few}, {:.1} MiB with {many} ({:.1} MiB before); grown from {few} to {many} users in {:.1} s",
                host_few as f64 / 1024.0,
                host_many as f64 / 1024.0,
                host_before as f64 / 1024.0,
                adding.as_secs_f64()
            ),
            String::new(),
            "report",
        );
        for user in &users {
            let _ = self.sandbox.destroy_user_backend(user).await;
        }
        Ok(())
    }

    /// Adds users until `users` holds `total`, each with a first (cold)
    /// execute, so each is live: a running container and a link.
    async fn add_live_users(
        &mut self,
        users: &mut Vec<String>,
        total: usize,
    ) -> anyhow::Result<()> {
        let fresh: Vec<String> = (users.len()..total)
            .map(|_| self.fresh_user("scale"))
            .collect();
        let sandbox = self.sandbox.clone();
        let results: Vec<anyhow::Result<()>> = stream::iter(fresh.clone())
            .map(|user| {
                let sandbox = sandbox.clone();
                async move {
                    let b = sandbox.get_thread_backend(&format!("{user}-1")).await?;
                    b.execute("true").await?;
                    Ok(())
                }
            })
            .buffer_unordered(CREATING)
            .collect()
            .await;
        for result in results {
            result?;
        }
        users.extend(fresh);
        Ok(())
    }

    /// The agent's resident memory in `user`'s container (init + serve).
    pub(crate) async fn agent_rss_kib(&self, user: &str) -> anyhow::Result<u64> {
        let b = self
            .sandbox
            .get_thread_backend(&format!("{user}-1"))
            .await?;
        let rss = b
            .execute(
                "for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); \
                 case \"$c\" in '/.sandbox/agent init '*|'/.sandbox/agent serve '*) \
                 grep VmRSS $p/status;; esac; done",
            )
            .await?;
        Ok(rss
            .stdout
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum())
    }
}

/// `MemAvailable` of this machine, in bytes.
fn available_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}
