//! Prometheus metrics of `sandbox serve` (OpenMetrics text exposition by
//! prometheus-client).

use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::Sandbox;

type Labels = Vec<(String, String)>;

/// The media type of what [`Metrics::render`] writes: prometheus-client
/// encodes OpenMetrics text (`# EOF` terminated, `_total` counters), which a
/// scraper told `text/plain; version=0.0.4` would parse as the older format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The server's Prometheus registry (names prefixed `sandbox_`): calls,
/// errors and latency by operation, policy swaps, and the library's own
/// counters.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// API operations by `op`.
    pub calls: Family<Labels, Counter>,
    /// Failed operations by error `kind`.
    pub errors: Family<Labels, Counter>,
    /// Seconds per operation by `op`.
    pub latency: Family<Labels, Histogram, fn() -> Histogram>,
    /// Policies swapped in live (`POST /v1/policy`, or SIGHUP).
    pub policy_swaps: Counter,
    /// HTTP connections open now.
    pub connections: Gauge,
    /// Idle connections closed to make room for new ones.
    pub connections_evicted: Counter,
    /// File content of the JSON transfers in flight (the transfer budget
    /// in use), at the scrape.
    pub transfer_bytes: Gauge,
    /// Mirrors of the library's own counters, synced at each scrape.
    containers_created: Counter,
    policy_traps: Counter,
    /// Managed containers, and the work in flight on them, at the scrape.
    containers: Gauge,
    in_flight: Gauge,
    /// Egress through this process's proxy (`network = "egress"`): bytes by
    /// `direction` (`in`: to the sandboxes), connections and refusals;
    /// by `user` too when `[egress] metrics_per_user` is set.
    egress_bytes: Family<Labels, Counter>,
    egress_connections: Family<Labels, Counter>,
    egress_refused: Family<Labels, Counter>,
}

/// What the engine holds at a scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Containers this namespace manages.
    pub containers: i64,
    /// Commands and file transfers running on them, from any host process.
    pub in_flight: i64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered.
    pub fn new() -> Self {
        let calls = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let latency =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let policy_swaps = Counter::default();
        let connections = Gauge::default();
        let connections_evicted = Counter::default();
        let transfer_bytes = Gauge::default();
        let containers_created = Counter::default();
        let policy_traps = Counter::default();
        let containers = Gauge::default();
        let in_flight = Gauge::default();
        let egress_bytes = Family::<Labels, Counter>::default();
        let egress_connections = Family::<Labels, Counter>::default();
        let egress_refused = Family::<Labels, Counter>::default();
        let mut registry = Registry::with_prefix("sandbox");
        registry.register("calls", "API operations, by op", calls.clone());
        registry.register("errors", "Failed operations, by error kind", errors.clone());
        registry.register(
            "call_duration_seconds",
            "Operation latency, by op",
            latency.clone(),
        );
        registry.register(
            "policy_swaps",
            "Policies swapped in live",
            policy_swaps.clone(),
        );
        registry.register("connections", "HTTP connections open", connections.clone());
        registry.register(
            "connections_evicted",
            "Idle HTTP connections closed to make room for new ones",
            connections_evicted.clone(),
        );
        registry.register(
            "transfer_bytes",
            "File content of the JSON transfers in flight (the transfer budget in use)",
            transfer_bytes.clone(),
        );
        registry.register(
            "container_creations",
            "Containers created",
            containers_created.clone(),
        );
        registry.register(
            "policy_traps",
            "Policy instances that trapped and were replaced",
            policy_traps.clone(),
        );
        registry.register(
            "containers",
            "Containers this namespace manages, at the scrape",
            containers.clone(),
        );
        registry.register(
            "in_flight",
            "Commands and file transfers running on them, from any host process on this machine",
            in_flight.clone(),
        );
        registry.register(
            "egress_bytes",
            "Bytes through the egress proxy, by direction (in: to the sandboxes)",
            egress_bytes.clone(),
        );
        registry.register(
            "egress_connections",
            "Connections sandboxes opened to the egress proxy",
            egress_connections.clone(),
        );
        registry.register(
            "egress_refused",
            "Egress requests refused by the allow-list",
            egress_refused.clone(),
        );
        Metrics {
            egress_bytes,
            egress_connections,
            egress_refused,
            containers,
            in_flight,
            registry: Mutex::new(registry),
            calls,
            errors,
            latency,
            policy_swaps,
            connections,
            connections_evicted,
            transfer_bytes,
            containers_created,
            policy_traps,
        }
    }

    /// Counts one refused or failed request by its error kind.
    pub fn count_error(&self, kind: &str) {
        self.errors
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .inc();
    }

    /// The OpenMetrics text exposition ([`CONTENT_TYPE`]), with the library
    /// counters brought up to date, and the gauges when `usage` is known.
    pub fn render(
        &self,
        sandbox: &Sandbox,
        usage: Option<Usage>,
    ) -> Result<String, std::fmt::Error> {
        if let Some(usage) = usage {
            self.containers.set(usage.containers);
            self.in_flight.set(usage.in_flight);
        }
        let counters = sandbox.counters();
        sync(&self.containers_created, counters.containers_created);
        sync(&self.policy_traps, counters.policy_traps);
        self.sync_egress(sandbox);
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().unwrap())?;
        Ok(out)
    }
}

impl Metrics {
    /// Brings the egress families up to the library's counters: one
    /// series per direction (and per user, when the operator asked).
    fn sync_egress(&self, sandbox: &Sandbox) {
        let per_user = sandbox.config().egress.metrics_per_user;
        let mut totals: std::collections::BTreeMap<Option<String>, crate::EgressCounts> =
            Default::default();
        for (user, counts) in sandbox.egress_counts() {
            *totals.entry(per_user.then_some(user)).or_default() += counts;
        }
        for (user, counts) in totals {
            let labels = |extra: Option<(&str, &str)>| {
                let mut labels: Labels = extra
                    .map(|(k, v)| vec![(k.to_owned(), v.to_owned())])
                    .unwrap_or_default();
                if let Some(user) = &user {
                    labels.push(("user".to_owned(), user.clone()));
                }
                labels
            };
            sync(
                &self
                    .egress_bytes
                    .get_or_create(&labels(Some(("direction", "in")))),
                counts.bytes_in,
            );
            sync(
                &self
                    .egress_bytes
                    .get_or_create(&labels(Some(("direction", "out")))),
                counts.bytes_out,
            );
            sync(
                &self.egress_connections.get_or_create(&labels(None)),
                counts.connections,
            );
            sync(
                &self.egress_refused.get_or_create(&labels(None)),
                counts.refused,
            );
        }
    }
}

/// One API operation in progress: counted and timed when it ends, with its
/// error, if any, counted by kind.
pub(super) struct Call {
    op: &'static str,
    start: Instant,
}

impl Call {
    pub(super) fn start(op: &'static str) -> Self {
        Call {
            op,
            start: Instant::now(),
        }
    }

    pub(super) fn end(self, metrics: &Metrics, error_kind: Option<&str>) {
        let labels = vec![("op".to_owned(), self.op.to_owned())];
        metrics.calls.get_or_create(&labels).inc();
        metrics
            .latency
            .get_or_create(&labels)
            .observe(self.start.elapsed().as_secs_f64());
        if let Some(kind) = error_kind {
            metrics.count_error(kind);
        }
    }
}

fn sync(counter: &Counter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}
