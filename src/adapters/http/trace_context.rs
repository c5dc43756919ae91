//! The request span and W3C trace context. With export on, every request gets an OpenTelemetry
//! server span, the child of the caller's `traceparent` when one is sent; with export off only a
//! request bringing a `traceparent` gets a span (for its trace id in the log lines), and the
//! rest pay for nothing but reading one header. The span records the route template, the
//! status and the API key id: never the URL (stream tokens travel in the query) nor headers.

use axum::http::Request;
use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tower_http::trace::MakeSpan;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::domain::trace::TraceParent;

/// Makes each request's span (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct RequestSpans {
    pub export: bool,
}

impl<B> MakeSpan<B> for RequestSpans {
    fn make_span(&mut self, request: &Request<B>) -> Span {
        let parent = request
            .headers()
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .and_then(TraceParent::parse);
        if !self.export && parent.is_none() {
            return Span::none();
        }
        let span = tracing::info_span!(
            "request",
            otel.name = %request.method(),
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = %request.method(),
            http.route = Empty,
            http.response.status_code = Empty,
            rdev.key_id = Empty,
            trace_id = Empty,
        );
        if let Some(parent) = &parent {
            if self.export {
                // Fails only when the span is disabled (a log filter above `info`).
                let _ = span.set_parent(remote_parent(parent));
            }
            span.record("trace_id", parent.trace_id());
        }
        // A new trace's id is read in `record_route`: reading it starts the OpenTelemetry span,
        // whose name cannot change after that.
        span
    }
}

fn remote_parent(parent: &TraceParent) -> Context {
    let context = SpanContext::new(
        TraceId::from_hex(parent.trace_id()).unwrap_or(TraceId::INVALID),
        SpanId::from_hex(parent.parent_id()).unwrap_or(SpanId::INVALID),
        TraceFlags::new(parent.flags() & 1),
        true,
        TraceState::default(),
    );
    Context::new().with_remote_span_context(context)
}

/// The trace id OpenTelemetry gave `span`, when spans are exported.
fn exported_trace_id(span: &Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// The trace id of the request being served, for its audit rows: the exported span's, else
/// the one its `traceparent` names.
pub fn request_trace_id(traceparent: Option<&str>) -> Option<String> {
    let span = Span::current();
    if !span.is_none()
        && let Some(trace_id) = exported_trace_id(&span)
    {
        return Some(trace_id);
    }
    traceparent
        .and_then(TraceParent::parse)
        .map(|parent| parent.trace_id().to_owned())
}

/// After routing: the span is named for the route template, as OpenTelemetry's HTTP
/// conventions ask (`GET /api/v1/commands/{id}`).
/// Then the trace id is known for the log lines (a new trace's, when the caller sent none).
pub fn record_route(span: &Span, method: &str, route: &str) {
    span.record("http.route", route);
    span.record("otel.name", format!("{method} {route}"));
    if let Some(trace_id) = exported_trace_id(span) {
        span.record("trace_id", trace_id.as_str());
    }
}

pub fn record_status(span: &Span, status: u16) {
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// Records the authenticated key on the request span.
pub fn record_key(key_id: &dyn std::fmt::Display) {
    let span = Span::current();
    if !span.is_none() {
        span.record("rdev.key_id", tracing::field::display(key_id));
    }
}
