//! Case 12: a page of a server the workload runs in its sandbox (network
//! `none`), fetched through `sandbox serve`'s preview route (the router in
//! process, over TCP from a hyper client), against `docker exec C wget -qO-
//! http://127.0.0.1:PORT/` run by the docker CLI, as a platform without the
//! route would fetch it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Bench;
use crate::baseline::docker_cli;
use crate::report::{med_p95, ratio};

impl Bench {
    /// (12) one small page through the preview route vs `docker exec wget`.
    pub(crate) async fn preview(&mut self) -> anyhow::Result<()> {
        use http_body_util::{BodyExt, Empty};
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;

        let user = self.fresh_user("preview");
        let b = self
            .sandbox
            .get_thread_backend(&format!("{user}-1"))
            .await?;
        let r = b
            .execute(
                "mkdir -p www && echo hello-preview > www/index.html && \
                 (httpd -f -p 127.0.0.1:8080 -h www >/dev/null 2>&1 &) && sleep 0.3",
            )
            .await?;
        anyhow::ensure!(r.exit_code == 0, "httpd did not start: {r:?}");
        let container = b.ensure_container().await?.id;

        let token = "bench-token".to_owned();
        let state = Arc::new(sandbox_host::serve::AppState::new(
            self.sandbox.clone(),
            Some(token.clone()),
        ));
        let app = sandbox_host::serve::router(state, 1 << 20);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client: Client<_, Empty<hyper::body::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let url = format!("http://{addr}/v1/threads/{user}-1/ports/8080/index.html");

        let (mut ours, mut cli) = (Vec::<Duration>::new(), Vec::<Duration>::new());
        for _ in 0..self.iterations {
            let t = Instant::now();
            let req = hyper::Request::get(&url)
                .header("authorization", format!("Bearer {token}"))
                .body(Empty::new())?;
            let response = client.request(req).await?;
            anyhow::ensure!(response.status() == 200, "preview: {}", response.status());
            let body = response.into_body().collect().await?.to_bytes();
            ours.push(t.elapsed());
            anyhow::ensure!(&body[..] == b"hello-preview\n", "preview body: {body:?}");

            let t = Instant::now();
            docker_cli(&[
                "exec",
                &container,
                "wget",
                "-qO-",
                "http://127.0.0.1:8080/index.html",
            ])
            .await?;
            cli.push(t.elapsed());
        }
        server.abort();
        self.table.add(
            "12. a page of a dev server in a `none` sandbox: the preview route vs `docker exec C wget`",
            med_p95(&ours),
            med_p95(&cli),
            format!("{:.3}", ratio(&ours, &cli)),
            "(report)",
        );
        Ok(())
    }
}
