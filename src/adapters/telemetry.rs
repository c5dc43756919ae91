//! Logs, traces, metrics and profiles: JSON logs through `tracing`, OpenTelemetry spans exported
//! over OTLP/HTTP when a collector is configured, a Prometheus registry (built here, never the
//! process-global default) with the `rdev_` metrics and the standard, unprefixed `process_*`
//! ones (as every client library exports them, for the dashboards and alerts that read them),
//! jemalloc heap profiles and CPU profiles.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::domain::audit::AuditHead;
use crate::domain::command::CommandStatus;
use async_trait::async_trait;

use crate::ports::{
    AuditHeads, CacheMetrics, CircuitMetrics, CircuitState, CommandMetrics, ConnectionMetrics,
    CpuProfiler, HeapProfiler, HttpRouteMetrics, OperatorMetrics, PortError, WebhookMetrics,
};

/// Where spans go: an OTLP/HTTP collector, with the resource and sampler the standard
/// `OTEL_*` variables name.
#[derive(Debug, Clone)]
pub struct TraceExport {
    /// Base URL; spans are posted to `<endpoint>/v1/traces`.
    pub endpoint: String,
    /// `OTEL_SERVICE_NAME` when given; else `service.name` from the attributes, else `rdev-api`.
    pub service_name: Option<String>,
    pub resource_attributes: Vec<(String, String)>,
    pub sampler: Sampler,
    /// Which spans are exported (`RDEV_TRACE_FILTER`, `EnvFilter` syntax), apart from the log
    /// filter: quieting the logs must not silence the traces.
    pub filter: String,
}

/// Seconds one export may take before it is abandoned (a collector that accepts and never
/// answers holds only the exporter's thread this long; requests never wait on it).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for the last spans at exit.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

/// What [`init`] set up; [`Telemetry::shutdown`] flushes the spans still queued.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is queued and stops the exporter thread, waiting at most
    /// [`SHUTDOWN_FLUSH`]: a dead collector must not hold the process after its drain.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // A plain thread, not `spawn_blocking`: the runtime would wait for that at exit.
            let (done, flushed) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || done.send(provider.shutdown()));
            match tokio::time::timeout(SHUTDOWN_FLUSH, flushed).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => tracing::warn!(%error, "flushing spans at shutdown failed"),
                Ok(Err(_)) | Err(_) => {
                    tracing::warn!("flushing spans at shutdown did not finish; they are lost")
                }
            }
        }
    }
}

fn tracer_provider(
    export: TraceExport,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    // Batched: ending a span is a bounded-queue push; a background thread posts batches (and
    // drops spans when the queue is full rather than making anyone wait).
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", export.endpoint))
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let named = export
        .resource_attributes
        .iter()
        .find(|(key, _)| key == "service.name")
        .map(|(_, value)| value.clone());
    let service_name = export
        .service_name
        .or(named)
        .unwrap_or_else(|| "rdev-api".to_owned());
    let resource = Resource::builder_empty()
        .with_attributes(
            export
                .resource_attributes
                .into_iter()
                .map(|(key, value)| KeyValue::new(key, value)),
        )
        .with_service_name(service_name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(export.sampler)
        .with_resource(resource)
        .build())
}

/// Installs the global subscriber: log lines (JSON, or human text when `json` is false) and,
/// when `export` is given, OpenTelemetry spans. Each has its own filter: `RUST_LOG` for the
/// lines, the export's own for the spans. JSON lines logged inside a request carry its span's
/// fields, the `trace_id` among them.
pub fn init(
    json: bool,
    export: Option<TraceExport>,
) -> Result<Telemetry, opentelemetry_otlp::ExporterBuildError> {
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let span_filter = export.as_ref().map(|export| EnvFilter::new(&export.filter));
    let provider = export.map(tracer_provider).transpose()?;
    let spans = provider
        .as_ref()
        .zip(span_filter)
        .map(|(provider, filter)| {
            tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("rdev-api"))
            .with_tracked_inactivity(false)
            // Spans start when first asked for their context (or when they end), not when
            // entered: the request span is named for its route template only after routing.
            .with_context_activation(false)
            .with_threads(false)
            .with_filter(filter)
        });
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json {
        logs.json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        logs.boxed()
    };
    let result = tracing_subscriber::registry()
        .with(logs.with_filter(log_filter))
        .with(spans)
        .try_init();
    // A second init (tests starting several servers) keeps the first subscriber.
    drop(result);
    Ok(Telemetry { provider })
}

pub struct Metrics {
    registry: Registry,
    /// `process_resident_memory_bytes` and the rest, under their standard names.
    process: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    sse_active: IntGauge,
    connections_active: IntGauge,
    commands_active: IntGauge,
    commands_queued: IntGauge,
    command_duration: HistogramVec,
    output_bytes: IntCounter,
    audit_head: IntGauge,
    auth_failures: IntCounterVec,
    key_lookups: IntCounter,
    rate_limit_rejections: IntCounterVec,
    circuit_state: IntGaugeVec,
    cache_requests: IntCounterVec,
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
        let connections_active = IntGauge::new(
            "http_connections_active",
            "Open client connections (HTTP/1.1 and h2c), streaming or not",
        )?;
        registry.register(Box::new(connections_active.clone()))?;
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
        let cache_requests = IntCounterVec::new(
            Opts::new(
                "cache_requests_total",
                "Key and project cache lookups by cache and result (hit or miss)",
            ),
            &["cache", "result"],
        )?;
        // Every series from the start, so a rate over them works before the first miss.
        for cache in ["api_key", "project"] {
            for result in ["hit", "miss"] {
                cache_requests.with_label_values(&[cache, result]);
            }
        }
        registry.register(Box::new(cache_requests.clone()))?;
        let key_lookups = IntCounter::new(
            "api_key_lookups_total",
            "Presented API keys looked up (after the per-address guard of failed authentications)",
        )?;
        registry.register(Box::new(key_lookups.clone()))?;
        let rate_limit_rejections = IntCounterVec::new(
            Opts::new(
                "rate_limit_rejections_total",
                "Requests refused with 429, by limiter: api_key or client_ip",
            ),
            &["limiter"],
        )?;
        registry.register(Box::new(rate_limit_rejections.clone()))?;
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
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            process,
            http_requests,
            http_duration,
            sse_active,
            connections_active,
            commands_active,
            commands_queued,
            command_duration,
            output_bytes,
            audit_head,
            auth_failures,
            key_lookups,
            rate_limit_rejections,
            circuit_state,
            cache_requests,
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
    fn http_route(&self, method: &'static str, route: &str) -> Arc<dyn HttpRouteMetrics> {
        Arc::new(RouteMetrics {
            method,
            route: route.to_owned(),
            requests: self.http_requests.clone(),
            duration: self.http_duration.with_label_values(&[method, route]),
            common: OnceLock::new(),
        })
    }

    fn set_commands_queued(&self, queued: u64) {
        self.commands_queued.set(queued as i64);
    }

    fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    fn key_lookup(&self) {
        self.key_lookups.inc();
    }

    fn rate_limited(&self, limiter: &'static str) {
        self.rate_limit_rejections
            .with_label_values(&[limiter])
            .inc();
    }

    fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(
                &[self.registry.gather(), self.process.gather()].concat(),
                &mut buffer,
            )
            .expect("encoding gathered metrics into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

/// One route's handles: the latency histogram, and the counter of the first status it answered
/// (nearly always the only one under load); other statuses are looked up by label.
struct RouteMetrics {
    method: &'static str,
    route: String,
    requests: IntCounterVec,
    duration: Histogram,
    common: OnceLock<(u16, IntCounter)>,
}

impl RouteMetrics {
    fn counter(&self, status: u16) -> IntCounter {
        self.requests
            .with_label_values(&[self.method, &self.route, &status.to_string()])
    }
}

impl HttpRouteMetrics for RouteMetrics {
    fn record(&self, status: u16, elapsed: Duration) {
        let (common, counter) = self.common.get_or_init(|| (status, self.counter(status)));
        if *common == status {
            counter.inc();
        } else {
            self.counter(status).inc();
        }
        self.duration.observe(elapsed.as_secs_f64());
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

impl ConnectionMetrics for Metrics {
    fn connection_opened(&self) {
        self.connections_active.inc();
    }

    fn connection_closed(&self) {
        self.connections_active.dec();
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

impl CacheMetrics for Metrics {
    fn cache_lookup(&self, cache: &'static str, hit: bool) {
        self.cache_requests
            .with_label_values(&[cache, if hit { "hit" } else { "miss" }])
            .inc();
    }
}

/// CPU profiles from the `pprof` crate's SIGPROF sampler, one at a time (the sampler is
/// process-wide).
#[derive(Debug, Default)]
pub struct PprofCpuProfiler {
    busy: Arc<tokio::sync::Mutex<()>>,
}

/// Samples per second: not a multiple of common timer frequencies, as Go's profiler picks.
const CPU_SAMPLE_HZ: i32 = 99;

#[async_trait]
impl CpuProfiler for PprofCpuProfiler {
    async fn cpu_profile(&self, duration: Duration) -> Result<Vec<u8>, PortError> {
        let running = self
            .busy
            .clone()
            .try_lock_owned()
            .map_err(|_| PortError::AlreadyExists("a CPU profile in progress"))?;
        // The sampler's guard stays on one thread for the whole profile: a blocking-pool
        // thread that sleeps while the signal handler samples every thread.
        tokio::task::spawn_blocking(move || {
            let _running = running;
            let guard = pprof::ProfilerGuardBuilder::default()
                .frequency(CPU_SAMPLE_HZ)
                .blocklist(&["libc", "libgcc", "pthread", "vdso"])
                .build()
                .map_err(|e| PortError::Unavailable(Box::new(e)))?;
            std::thread::sleep(duration);
            let profile = guard
                .report()
                .build()
                .and_then(|report| report.pprof())
                .map_err(PortError::backend)?;
            let mut encoded = Vec::new();
            pprof::protos::Message::encode(&profile, &mut encoded).map_err(PortError::backend)?;
            Ok(encoded)
        })
        .await
        .map_err(PortError::backend)?
    }
}
