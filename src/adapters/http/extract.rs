//! Extractors that turn request parts into typed input, failing with problem details: JSON
//! bodies (with the JSON pointer of the bad field), path ids, query strings, and the caller.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use utoipa::IntoParams;

use crate::domain::FieldError;
use crate::domain::api_key::Scope;
use crate::domain::api_key::{KeyRejection, loggable_prefix};
use crate::domain::audit::AuditContext;
use crate::domain::command::ResumePoint;
use crate::domain::ids::CommandId;
use crate::ports::PortError;
use crate::services::{Caller, ServiceError};

use super::AppState;
use super::limits::DecisionSlot;
use super::problem::ApiError;

/// A JSON body. Wrong content type: 415; too large: 413; not JSON: 400; wrong shape or unknown
/// field: 422 naming the field.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes =
            Bytes::from_request(request, state)
                .await
                .map_err(|rejection: BytesRejection| {
                    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::PayloadTooLarge
                    } else {
                        ApiError::MalformedBody(rejection.body_text())
                    }
                })?;
        parse_json(&bytes).map(ApiJson)
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(&mut deserializer) {
        Ok(value) => {
            deserializer
                .end()
                .map_err(|e| ApiError::MalformedBody(e.to_string()))?;
            Ok(value)
        }
        Err(error) => {
            let inner = error.inner();
            if inner.is_data() {
                let pointer = json_pointer(error.path());
                Err(ApiError::invalid(vec![FieldError::new(
                    pointer,
                    inner.to_string(),
                )]))
            } else {
                Err(ApiError::MalformedBody(inner.to_string()))
            }
        }
    }
}

fn json_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut pointer = String::new();
    for segment in path.iter() {
        pointer.push('/');
        match segment {
            Segment::Seq { index } => pointer.push_str(&index.to_string()),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                pointer.push_str(&crate::domain::project::escape_pointer(key))
            }
            Segment::Unknown => pointer.push('?'),
        }
    }
    pointer
}

/// A path parameter; a malformed one (such as a bad UUID) is a 400.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| ApiPath(value))
            .map_err(|rejection| ApiError::BadParameter {
                what: "path parameter",
                detail: rejection.body_text(),
            })
    }
}

/// A query string; a malformed one is a 400.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|rejection| ApiError::BadParameter {
                what: "query parameter",
                detail: rejection.body_text(),
            })
    }
}

/// Finds the client address: the socket peer, or, when the peer is a trusted proxy, the
/// right-most `X-Forwarded-For` hop that is not itself a trusted proxy. Also says whether a
/// loopback peer counts as an operator on this host (`RDEV_TRUST_LOOPBACK`).
#[derive(Debug, Clone)]
pub struct ClientIpResolver {
    trusted: Vec<IpNet>,
    /// False behind a service-mesh sidecar, where every request arrives from loopback.
    trust_loopback: bool,
}

impl Default for ClientIpResolver {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl ClientIpResolver {
    pub fn new(trusted: Vec<IpNet>) -> Self {
        Self {
            trusted,
            trust_loopback: true,
        }
    }

    /// Whether a request from loopback, forwarded by nobody, is an operator's on this host.
    pub fn trusting_loopback(mut self, trust: bool) -> Self {
        self.trust_loopback = trust;
        self
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut client = peer;
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in hops.into_iter().rev() {
            // A hop that names no address cannot be trusted to be anyone: fail closed with an
            // address no allowlist entry but "any" matches, rather than the proxy's own.
            let Some(ip) = parse_hop(hop) else {
                return IpAddr::from([0, 0, 0, 0]);
            };
            client = ip.to_canonical();
            if !self.is_trusted(client) {
                break;
            }
        }
        client
    }
}

/// An `X-Forwarded-For` hop: an address, possibly with a port (`1.2.3.4:5678`, `[::1]:80`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(socket) = hop.parse::<SocketAddr>() {
        return Some(socket.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Headers that name another origin than the socket peer: a request carrying any of them was
/// relayed, so it is not "made on this host" even over loopback.
const FORWARDING_HEADERS: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// The longest `X-Request-Id` taken from a client; longer or odd ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// True for a client-chosen request id fit for logs and audit rows.
pub fn acceptable_request_id(id: &str) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What a request presents about itself before it is authenticated.
pub struct Credentials {
    pub presented: Option<String>,
    pub client_ip: IpAddr,
    /// The request came over loopback and named no other origin (no `X-Forwarded-For`): it was
    /// made on this host, as `kubectl exec ... curl localhost` is. False when the socket peer is
    /// unknown (a router served without `ConnectInfo`): an unknown peer is never local. Always
    /// false with `RDEV_TRUST_LOOPBACK=false`.
    pub local: bool,
    pub context: AuditContext,
    /// Where the key's rate decision goes for the response headers; absent only when the
    /// router lacks its edge layer, which authenticating then refuses with a 500.
    pub rate_decision: Option<DecisionSlot>,
}

impl Credentials {
    /// Reads the request parts; `peer` is the socket peer when the server recorded one. Both
    /// `Authorization` and `X-API-Key` at once is ambiguous, and refused.
    fn read(
        parts: &Parts,
        peer: Option<IpAddr>,
        resolver: &ClientIpResolver,
    ) -> Result<Self, ApiError> {
        if parts.headers.contains_key(header::AUTHORIZATION)
            && parts.headers.contains_key("x-api-key")
        {
            return Err(ApiError::BadParameter {
                what: "credentials",
                detail: "send either Authorization or X-API-Key, not both".into(),
            });
        }
        // An unknown peer matches no allowlist entry but "any", like a garbled forwarded hop.
        let client_ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |peer| {
            resolver.resolve(peer, &parts.headers)
        });
        let header_text = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let presented = header_text(header::AUTHORIZATION.as_str())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| token.trim().to_owned())
            })
            .or_else(|| header_text("x-api-key"));
        let trace_id =
            super::trace_context::request_trace_id(header_text("traceparent").as_deref());
        let local = resolver.trust_loopback
            && peer.is_some_and(|peer| peer.to_canonical().is_loopback())
            && !FORWARDING_HEADERS
                .iter()
                .any(|name| parts.headers.contains_key(*name));
        Ok(Credentials {
            presented,
            client_ip,
            local,
            context: AuditContext {
                actor: None,
                client_ip: Some(client_ip.to_string()),
                request_id: header_text("x-request-id"),
                trace_id,
            },
            rate_decision: parts.extensions.get::<DecisionSlot>().cloned(),
        })
    }

    /// The caller these credentials name, by API key, counted against the key's rate limit.
    /// An address that failed too often is refused before its key is looked up. A refusal is
    /// counted (`rdev_auth_failures_total{reason}`) and logged with the client address and the
    /// key's prefix, never its secret.
    async fn authenticate(self, state: &AppState) -> Result<Caller, ApiError> {
        self.guard(state).await?;
        if self.presented.is_some() {
            state.metrics.key_lookup();
        }
        let prefix = self.presented.as_deref().map(loggable_prefix);
        let client_ip = self.client_ip;
        match state
            .keys
            .authenticate(self.presented.as_deref(), client_ip, self.context)
            .await
        {
            Ok(caller) => {
                super::trace_context::record_key(&caller.key_id);
                admit(state, caller, self.rate_decision.as_ref()).await
            }
            Err(ServiceError::Unauthenticated(reason)) => {
                Err(refused(state, client_ip, prefix, reason).await)
            }
            Err(other) => Err(other.into()),
        }
    }

    /// Refuses an address that spent its budget of failed authentications.
    async fn guard(&self, state: &AppState) -> Result<(), ApiError> {
        state
            .auth_guard
            .check(self.client_ip)
            .await
            .map_err(|wait| {
                state.metrics.rate_limited("client_ip");
                ApiError::TooManyFailedAuthentications(wait)
            })
    }
}

/// Counts, logs and charges to the client's address a refused authentication.
async fn refused(
    state: &AppState,
    client_ip: IpAddr,
    prefix: Option<&str>,
    reason: KeyRejection,
) -> ApiError {
    state.metrics.auth_failure(reason.as_str());
    state.auth_guard.failed(client_ip).await;
    tracing::warn!(
        %client_ip,
        key_prefix = prefix.unwrap_or("-"),
        reason = reason.as_str(),
        "authentication failed"
    );
    ServiceError::Unauthenticated(reason).into()
}

/// Counts an authenticated request against its key's rate limit; the decision goes to the
/// response headers, or refuses the request past the limit.
async fn admit(
    state: &AppState,
    caller: Caller,
    slot: Option<&DecisionSlot>,
) -> Result<Caller, ApiError> {
    // The edge layer attaches the slot to every request; without it the response would lack
    // its rate-limit headers and nobody would notice.
    let slot = slot.ok_or_else(|| {
        ApiError::Service(ServiceError::Internal(PortError::backend(
            "no rate-limit slot on the request: the router lacks its edge layer",
        )))
    })?;
    match state.limits.admit(&caller).await {
        Ok(decision) => {
            slot.fill(decision);
            Ok(caller)
        }
        Err(error @ ServiceError::RateLimited(_)) => {
            state.metrics.rate_limited("api_key");
            Err(error.into())
        }
        Err(other) => Err(other.into()),
    }
}

impl FromRequestParts<AppState> for Credentials {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        Credentials::read(parts, peer, &state.client_ip)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Credentials::from_request_parts(parts, state)
            .await?
            .authenticate(state)
            .await
    }
}

/// Access to operator endpoints (heap profiles): a request made on this host needs no key (so
/// `kubectl exec ... curl localhost:8080/...` works), any other needs an admin key. Fails closed:
/// when the socket peer is unknown the request is not local.
#[derive(Debug)]
pub enum AdminOrLocal {
    Local,
    Admin(Box<Caller>),
}

impl FromRequestParts<AppState> for AdminOrLocal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let credentials = Credentials::from_request_parts(parts, state).await?;
        if credentials.local {
            return Ok(AdminOrLocal::Local);
        }
        let caller = credentials.authenticate(state).await?;
        caller.require(Scope::Admin)?;
        Ok(AdminOrLocal::Admin(Box::new(caller)))
    }
}

/// The query string of an event stream. Both parameters have header equivalents, so each
/// extractor reads its own and ignores the rest.
#[derive(Debug, Default, serde::Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Resume after this output sequence number (same as the `Last-Event-ID` header).
    pub last_event_id: Option<String>,
    /// A stream token from `POST /commands/{id}/stream-token`, for clients that cannot send headers.
    pub token: Option<String>,
}

impl EventsQuery {
    fn read(parts: &Parts) -> Self {
        axum::extract::Query::<Self>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(query)| query)
            .unwrap_or_default()
    }
}

/// The caller of an event stream: an API key as usual, or (for `EventSource`, which cannot set
/// headers) a `?token=` issued for this very command.
pub struct StreamCaller(pub Caller);

impl FromRequestParts<AppState> for StreamCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let credentials = Credentials::from_request_parts(parts, state).await?;
        let (Some(token), None) = (EventsQuery::read(parts).token, &credentials.presented) else {
            return credentials.authenticate(state).await.map(StreamCaller);
        };
        credentials.guard(state).await?;
        let ApiPath(command) = ApiPath::<CommandId>::from_request_parts(parts, state).await?;
        let client_ip = credentials.client_ip;
        let Some(claims) = state.follow.token_key(&token, command).await? else {
            return Err(refused(state, client_ip, None, KeyRejection::Invalid).await);
        };
        match state
            .keys
            .authenticate_as(
                claims.key,
                &claims.key_prefix,
                client_ip,
                credentials.context,
            )
            .await
        {
            Ok(caller) => admit(state, caller, credentials.rate_decision.as_ref())
                .await
                .map(StreamCaller),
            Err(ServiceError::Unauthenticated(reason)) => {
                Err(refused(state, client_ip, None, reason).await)
            }
            Err(other) => Err(other.into()),
        }
    }
}

/// Where an event stream resumes: the `Last-Event-ID` header, else `?last_event_id=`, else from
/// the start.
pub struct LastEventId(pub ResumePoint);

impl<S: Send + Sync> FromRequestParts<S> for LastEventId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let raw = match parts.headers.get("last-event-id") {
            Some(value) => value.to_str().ok().map(str::to_owned),
            None => EventsQuery::read(parts).last_event_id,
        };
        match raw {
            None => Ok(LastEventId(ResumePoint::default())),
            Some(raw) => {
                ResumePoint::parse(&raw)
                    .map(LastEventId)
                    .map_err(|rule| ApiError::BadParameter {
                        what: "Last-Event-ID",
                        detail: rule.0,
                    })
            }
        }
    }
}

/// The `Idempotency-Key` header, as sent; a value that is not visible ASCII reads as empty, which
/// the submit rules refuse.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Ok(IdempotencyKey(parts.headers.get("idempotency-key").map(
            |value| value.to_str().map(str::to_owned).unwrap_or_default(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_traceparent_gives_a_trace_id() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let w3c_trace_id = |header: &str| {
            crate::domain::trace::TraceParent::parse(header).map(|p| p.trace_id().to_owned())
        };
        assert_eq!(
            w3c_trace_id(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(),
            Some(id)
        );
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-\"level=ERROR\"xxxxxxxxxxxxxxxxxxx-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736",
        ] {
            assert_eq!(w3c_trace_id(bad), None, "{bad}");
        }
    }

    fn headers(xff: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", xff.parse().unwrap());
        headers
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let resolver = ClientIpResolver::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(resolver.resolve(peer, &headers("1.2.3.4")), peer);
    }

    #[test]
    fn forwarded_for_from_a_trusted_proxy_names_the_client() {
        let resolver = ClientIpResolver::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        // The left-most entry is whatever the client claimed; the right-most untrusted hop counts.
        let client = resolver.resolve(peer, &headers("6.6.6.6, 1.2.3.4, 10.0.0.7"));
        assert_eq!(client, "1.2.3.4".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_hops_with_ports_are_read_and_garbage_fails_closed() {
        let resolver = ClientIpResolver::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(
            resolver.resolve(peer, &headers("1.2.3.4:5678")),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            resolver.resolve(peer, &headers("[2001:db8::1]:80")),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            resolver.resolve(peer, &headers("unknown")),
            "0.0.0.0".parse::<IpAddr>().unwrap()
        );
    }

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut request = axum::http::Request::builder().uri("/debug/pprof/heap");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_a_known_loopback_peer_without_forwarding_is_local() {
        let resolver = ClientIpResolver::default();
        let local = |headers: &[(&str, &str)], peer| {
            Credentials::read(&parts(headers), peer, &resolver)
                .unwrap()
                .local
        };
        let loopback = Some(IpAddr::from([127, 0, 0, 1]));
        assert!(local(&[], loopback));
        assert!(local(&[], Some("::1".parse().unwrap())));
        for forwarding in FORWARDING_HEADERS {
            assert!(!local(&[(forwarding, "1.2.3.4")], loopback), "{forwarding}");
        }
        assert!(!local(&[], Some(IpAddr::from([10, 1, 2, 3]))));
        // Behind a mesh sidecar loopback is everyone.
        let meshed = ClientIpResolver::default().trusting_loopback(false);
        let read = Credentials::read(&parts(&[]), loopback, &meshed).unwrap();
        assert!(!read.local);
    }

    #[test]
    fn both_key_headers_at_once_are_refused() {
        let both = parts(&[
            ("authorization", "Bearer rdev_a_b"),
            ("x-api-key", "rdev_c_d"),
        ]);
        let read = Credentials::read(&both, None, &ClientIpResolver::default());
        assert!(matches!(
            read,
            Err(ApiError::BadParameter {
                what: "credentials",
                ..
            })
        ));
    }

    #[test]
    fn only_short_plain_request_ids_are_taken_from_clients() {
        assert!(acceptable_request_id("req-1.2_3"));
        assert!(acceptable_request_id(&"a".repeat(128)));
        assert!(!acceptable_request_id(&"a".repeat(129)));
        assert!(!acceptable_request_id(""));
        assert!(!acceptable_request_id("a b"));
        assert!(!acceptable_request_id("x\nfake log line"));
    }

    #[test]
    fn an_unknown_peer_is_not_local_and_matches_no_allowlist() {
        let resolver = ClientIpResolver::default();
        let credentials = Credentials::read(&parts(&[]), None, &resolver).unwrap();
        assert!(!credentials.local);
        assert_eq!(credentials.client_ip, IpAddr::from([0, 0, 0, 0]));
    }

    #[test]
    fn json_errors_name_the_field() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            #[allow(dead_code)]
            inner: Inner,
        }
        #[derive(Debug, serde::Deserialize)]
        struct Inner {
            #[allow(dead_code)]
            count: u32,
        }
        let Err(ApiError::Service(crate::services::ServiceError::Invalid(fields))) =
            parse_json::<Body>(br#"{"inner": {"count": "x"}}"#)
        else {
            panic!("expected a validation error")
        };
        assert_eq!(fields[0].pointer, "/inner/count");
        assert!(matches!(
            parse_json::<Body>(b"{"),
            Err(ApiError::MalformedBody(_))
        ));
    }
}
