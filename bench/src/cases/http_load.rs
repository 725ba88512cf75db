//! Case 8: the HTTP API (`sandbox serve`'s router, in process) under
//! concurrent load from a hyper client, against the library called directly
//! at the same concurrency: what the server adds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};

use super::Bench;
use crate::report::{ms, percentile};

impl Bench {
    /// (8) the HTTP API under load: 200 requests in flight over 50 users,
    /// vs the library called directly at the same concurrency.
    pub(crate) async fn http_load(&mut self) -> anyhow::Result<()> {
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
        // One warm request at a time through the server vs the docker CLI.
        let container = backends[0].ensure_container().await?.id;
        let url = format!("http://{addr}/v1/threads/{}-1/exec", batch[0]);
        let (mut one, mut cli) = (Vec::new(), Vec::new());
        for _ in 0..self.iterations {
            // As in case 1: each timed call starts on a machine at rest.
            tokio::time::sleep(super::warm_exec::SETTLE).await;
            let t = Instant::now();
            let req = hyper::Request::post(&url)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Full::new(hyper::body::Bytes::from_static(
                    b"{\"command\":\"true\"}",
                )))?;
            let resp = client.request(req).await?;
            anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
            resp.into_body().collect().await?;
            one.push(t.elapsed());
            tokio::time::sleep(super::warm_exec::SETTLE).await;
            cli.push(
                crate::measure::timed(crate::baseline::docker_cli(&["exec", &container, "true"]))
                    .await?
                    .1,
            );
        }
        self.table.add(
            "8. one warm HTTP exec through the server vs `docker exec C true`",
            crate::report::med_p95(&one),
            crate::report::med_p95(&cli),
            format!("{:.3}", crate::report::ratio(&one, &cli)),
            "<= 0.06",
        );
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
}
