//! Case 9: a large file up and down through upload_files/download_files
//! against `docker cp` both ways: file transfer throughput.

use std::time::{Duration, Instant};

use super::Bench;
use crate::baseline::docker_cli;
use crate::report::{ms, percentile, ratio};

impl Bench {
    /// (9) a 50 MB file in and out: upload_files + download_files vs
    /// `docker cp` both ways.
    pub(crate) async fn file_transfer(&mut self) -> anyhow::Result<()> {
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
}
