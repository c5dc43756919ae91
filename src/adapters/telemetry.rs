//! Logs, metrics and profiles: JSON logs through `tracing`, a Prometheus registry (built here,
//! never the process-global default) with the `rdev_` metrics, and jemalloc heap profiles.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tracing_subscriber::EnvFilter;

use crate::domain::audit::AuditHead;
use crate::domain::command::CommandStatus;
use async_trait::async_trait;

use crate::ports::{
    AuditHeads, CircuitMetrics, CircuitState, CommandMetrics, HeapProfiler, OperatorMetrics,
    PortError, WebhookMetrics,
};

/// Installs the global log subscriber: JSON lines, or human text when `json` is false.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests starting several servers) keeps the first subscriber.
    drop(result);
}

pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    sse_active: IntGauge,
    commands_active: IntGauge,
    commands_queued: IntGauge,
    command_duration: HistogramVec,
    output_bytes: IntCounter,
    audit_head: IntGauge,
    auth_failures: IntCounterVec,
    circuit_state: IntGaugeVec,
    webhook_deliveries: IntCounterVec,
    webhook_latency: HistogramVec,
    webhook_circuits: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("rdev".into()), None)?;
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route and status"),
            &["method", "route", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency").buckets(
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            &["method", "route"],
        )?;
        let sse_active = IntGauge::new("sse_connections_active", "Open SSE event streams")?;
        let commands_active = IntGauge::new("commands_active", "Commands running on this replica")?;
        let commands_queued =
            IntGauge::new("commands_queued", "Commands waiting in the shared queue")?;
        let command_duration = HistogramVec::new(
            HistogramOpts::new(
                "command_duration_seconds",
                "Command run time by final status",
            )
            .buckets(vec![
                0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0,
            ]),
            &["status"],
        )?;
        let output_bytes = IntCounter::new(
            "command_output_bytes_total",
            "Output bytes produced by commands",
        )?;
        let circuit_state = IntGaugeVec::new(
            Opts::new(
                "circuit_breaker_state",
                "Circuit breaker state by backend: 0 closed, 1 open, 2 half-open",
            ),
            &["target"],
        )?;
        registry.register(Box::new(circuit_state.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(sse_active.clone()))?;
        registry.register(Box::new(commands_active.clone()))?;
        registry.register(Box::new(commands_queued.clone()))?;
        registry.register(Box::new(command_duration.clone()))?;
        registry.register(Box::new(output_bytes.clone()))?;
        let audit_head = IntGauge::new(
            "audit_head_seq",
            "Sequence number of the audit chain's last entry this replica wrote",
        )?;
        registry.register(Box::new(audit_head.clone()))?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "auth_failures_total",
                "Requests refused for their API key, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(auth_failures.clone()))?;
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "webhook_deliveries_total",
                "Webhook delivery attempts by outcome: delivered, retry, failed, gone, refused, circuit_open",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(webhook_deliveries.clone()))?;
        let webhook_latency = HistogramVec::new(
            HistogramOpts::new(
                "webhook_delivery_duration_seconds",
                "Webhook attempt latency, request sent to answer read, by outcome",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["outcome"],
        )?;
        registry.register(Box::new(webhook_latency.clone()))?;
        let webhook_circuits = IntGaugeVec::new(
            Opts::new(
                "webhook_circuit_breakers",
                "Webhook endpoints this replica has sent to, by circuit breaker state",
            ),
            &["state"],
        )?;
        registry.register(Box::new(webhook_circuits.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            http_requests,
            http_duration,
            sse_active,
            commands_active,
            commands_queued,
            command_duration,
            output_bytes,
            audit_head,
            auth_failures,
            circuit_state,
            webhook_deliveries,
            webhook_latency,
            webhook_circuits,
        })
    }
}

impl WebhookMetrics for Metrics {
    fn webhook_attempt(&self, outcome: &'static str, latency: Duration) {
        self.webhook_deliveries.with_label_values(&[outcome]).inc();
        self.webhook_latency
            .with_label_values(&[outcome])
            .observe(latency.as_secs_f64());
    }

    fn webhook_circuits(&self, closed: u64, open: u64, half_open: u64) {
        for (state, count) in [("closed", closed), ("open", open), ("half_open", half_open)] {
            self.webhook_circuits
                .with_label_values(&[state])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

/// The head goes to the log (kept outside the database, so a deleted tail shows against it) and
/// to a gauge; out-of-order commits never move the gauge back.
impl AuditHeads for Metrics {
    fn published(&self, head: AuditHead) {
        if head.seq > self.audit_head.get() {
            self.audit_head.set(head.seq);
        }
        tracing::info!(seq = head.seq, hash = %head.hash, "audit head");
    }
}

impl OperatorMetrics for Metrics {
    fn http_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.http_requests
            .with_label_values(&[method, route, &status.to_string()])
            .inc();
        self.http_duration
            .with_label_values(&[method, route])
            .observe(elapsed.as_secs_f64());
    }

    fn set_commands_queued(&self, queued: u64) {
        self.commands_queued.set(queued as i64);
    }

    fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding gathered metrics into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

/// Heap profiles from jemalloc's sampling profiler (enabled by the binary's `malloc_conf`).
#[derive(Debug, Default, Clone, Copy)]
pub struct JemallocProfiler;

#[async_trait]
impl HeapProfiler for JemallocProfiler {
    async fn heap_profile(&self) -> Result<Vec<u8>, PortError> {
        let control = jemalloc_pprof::PROF_CTL.as_ref().ok_or_else(|| {
            PortError::Unavailable("jemalloc heap profiling is not enabled".into())
        })?;
        let mut control = control.clone().lock_owned().await;
        if !control.activated() {
            return Err(PortError::Unavailable(
                "jemalloc heap profiling is not active".into(),
            ));
        }
        // Dumping writes and parses a file: keep it off the async workers.
        tokio::task::spawn_blocking(move || control.dump_pprof())
            .await
            .map_err(PortError::backend)?
            .map_err(|e| PortError::backend(e.to_string()))
    }
}

impl CircuitMetrics for Metrics {
    fn circuit_state(&self, target: &'static str, state: CircuitState) {
        self.circuit_state
            .with_label_values(&[target])
            .set(state.gauge_value());
    }
}

impl CommandMetrics for Metrics {
    fn command_started(&self) {
        self.commands_active.inc();
    }

    fn command_finished(&self, status: CommandStatus, ran_for: Duration) {
        self.commands_active.dec();
        self.command_duration
            .with_label_values(&[status.as_str()])
            .observe(ran_for.as_secs_f64());
    }

    fn output_bytes(&self, bytes: u64) {
        self.output_bytes.inc_by(bytes);
    }

    fn stream_opened(&self) {
        self.sse_active.inc();
    }

    fn stream_closed(&self) {
        self.sse_active.dec();
    }
}
