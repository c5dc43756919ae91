//! The two hand-written layers every request passes, in place of `from_fn` middlewares (each
//! of which boxed its future and cloned a boxed `Next` per request):
//!
//! - [`EdgeLayer`], outermost: the request id (a client's acceptable `X-Request-Id`, else a fresh
//!   UUID; echoed on the response), a problem body for bodiless errors from the framework and
//!   layers (405, 413, ...), and the log line of a server error with its cause chain.
//! - [`RouteMetricsLayer`], a route layer (it sees the matched route template): request count and
//!   latency by method and route, through handles looked up once per route and method, not by
//!   label values on every request.
//!
//! Request spans (`TraceLayer`) and panic catching sit between the two; a step that needs the
//! matched route (a span attribute) belongs in [`RouteMetrics::call`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use axum::response::Response;
use bytes::Bytes;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Span;

use crate::ports::{HttpRouteMetrics, OperatorMetrics};

use super::extract::acceptable_request_id;
use super::limits::DecisionSlot;
use super::{problem, trace_context};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// See the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct EdgeLayer;

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
}

impl<S, B> Service<Request> for Edge<S>
where
    S: Service<Request, Response = axum::http::Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let id = request_id(request.headers_mut());
        // Both are reference-counted or inline: kept for the log line of a server error.
        let method = request.method().clone();
        let uri = request.uri().clone();
        let http1 = request.version() < axum::http::Version::HTTP_2;
        EdgeFuture {
            inner: self.inner.call(request),
            exchange: Some((id, method, uri)),
            http1,
        }
    }
}

pin_project! {
    pub struct EdgeFuture<F> {
        #[pin]
        inner: F,
        exchange: Option<(HeaderValue, Method, Uri)>,
        http1: bool,
    }
}

impl<F, B> Future for EdgeFuture<F>
where
    F: Future<Output = Result<axum::http::Response<B>, Infallible>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let (id, method, uri) = this
            .exchange
            .take()
            .expect("an edge future is not polled after it completed");
        // The router boxes the body here anyway (a body that is already `Body` stays as it is).
        let response = response.map(Body::new);
        let mut response = problem::normalize(&method, uri.path(), response);
        response.headers_mut().entry(X_REQUEST_ID).or_insert(id);
        // A 413 leaves the rest of its body unread: on HTTP/1 those bytes must not be taken
        // for the next request on the connection, so it closes.
        if *this.http1 && response.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                HeaderValue::from_static("close"),
            );
        }
        Poll::Ready(Ok(response))
    }
}

/// The client's `X-Request-Id` when it is fit for logs and audit rows (short, `[A-Za-z0-9._-]`),
/// else a fresh UUID put in its place, so handlers and logs read one id.
fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(X_REQUEST_ID)
        && id.to_str().is_ok_and(acceptable_request_id)
    {
        return id.clone();
    }
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    let id = HeaderValue::from_str(text).expect("a UUID is a valid header value");
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// See the module documentation.
#[derive(Clone)]
pub struct RouteMetricsLayer {
    metrics: Arc<dyn OperatorMetrics>,
}

impl RouteMetricsLayer {
    pub fn new(metrics: Arc<dyn OperatorMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RouteMetricsLayer {
    type Service = RouteMetrics<S>;

    fn layer(&self, inner: S) -> RouteMetrics<S> {
        RouteMetrics {
            inner,
            metrics: self.metrics.clone(),
            handles: Arc::default(),
        }
    }
}

/// The standard methods, in the order of [`method_label`]'s indexes, then `other`.
const METHOD_LABELS: usize = 10;

/// One route's metric handles, by method; filled on first use. Axum applies a route layer to
/// each route's service once, so every clone of it serves one route template.
type RouteHandles = [OnceLock<(Arc<str>, Arc<dyn HttpRouteMetrics>)>; METHOD_LABELS];

#[derive(Clone)]
pub struct RouteMetrics<S> {
    inner: S,
    metrics: Arc<dyn OperatorMetrics>,
    handles: Arc<RouteHandles>,
}

impl<S> RouteMetrics<S> {
    fn handle(&self, method: usize, route: &str) -> Arc<dyn HttpRouteMetrics> {
        let (cached_route, handle) = self.handles[method]
            .get_or_init(|| (route.into(), self.metrics.http_route(LABELS[method], route)));
        if cached_route.as_ref() == route {
            handle.clone()
        } else {
            // Not expected (one service per route), but a wrong label would be worse than a
            // lookup.
            self.metrics.http_route(LABELS[method], route)
        }
    }
}

impl<S> Service<Request> for RouteMetrics<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = RouteMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let rate_decision = DecisionSlot::attach(&mut request);
        let method = method_label(request.method());
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str);
        // The request span is named after the route before anything reads its context.
        let span = Span::current();
        if !span.is_none() {
            trace_context::record_route(&span, LABELS[method], route);
        }
        let handle = self.handle(method, route);
        RouteMetricsFuture {
            inner: self.inner.call(request),
            started,
            handle,
            rate_decision,
            span,
        }
    }
}

pin_project! {
    pub struct RouteMetricsFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        handle: Arc<dyn HttpRouteMetrics>,
        rate_decision: DecisionSlot,
        span: Span,
    }
}

impl<F> Future for RouteMetricsFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx));
        if let Ok(response) = &mut response {
            this.rate_decision.write_headers(response);
            let status = response.status().as_u16();
            if !this.span.is_none() {
                trace_context::record_status(this.span, status);
            }
            this.handle.record(status, this.started.elapsed());
        }
        Poll::Ready(response)
    }
}

const LABELS: [&str; METHOD_LABELS] = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE", "other",
];

/// The index of the `method` label: one of the standard methods, else `other`, so a client
/// inventing methods cannot add series.
fn method_label(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::PATCH => 3,
        Method::DELETE => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}
