//! The report: every case adds rows (ours, baseline, ratio, target) to one
//! table, printed as markdown at the end, plus the statistics the rows
//! show (medians and tail percentiles, ratios of medians), so every case
//! reads the same way.

use std::time::Duration;

struct Row {
    case: String,
    ours: String,
    baseline: String,
    ratio: String,
    target: String,
}

#[derive(Default)]
pub(crate) struct Table {
    rows: Vec<Row>,
}

impl Table {
    pub(crate) fn add(
        &mut self,
        case: &str,
        ours: String,
        baseline: String,
        ratio: String,
        target: &str,
    ) {
        println!("  {case}: ours {ours} | baseline {baseline} | {ratio} (target {target})");
        self.rows.push(Row {
            case: case.into(),
            ours,
            baseline,
            ratio,
            target: target.into(),
        });
    }

    pub(crate) fn print(&self) {
        println!("\n| case | ours | baseline | ratio | target |\n|---|---|---|---|---|");
        for r in &self.rows {
            println!(
                "| {} | {} | {} | {} | {} |",
                r.case, r.ours, r.baseline, r.ratio, r.target
            );
        }
    }
}

pub(crate) fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx.min(v.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub(crate) fn med_p95(s: &[Duration]) -> String {
    format!(
        "{} (p95 {})",
        ms(percentile(s, 0.5)),
        ms(percentile(s, 0.95))
    )
}

pub(crate) fn ratio(a: &[Duration], b: &[Duration]) -> f64 {
    percentile(a, 0.5).as_secs_f64() / percentile(b, 0.5).as_secs_f64()
}
