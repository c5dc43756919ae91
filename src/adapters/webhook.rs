//! [`HttpWebhookSender`]: webhooks over HTTP with reqwest, behind the SSRF guard. Host names are
//! resolved by [`GuardedResolver`], which drops every address webhooks may not reach before
//! reqwest connects, so a name that resolves (or re-resolves, DNS rebinding) to a private
//! address gets no connection; literal addresses are judged before the request. No redirects
//! are followed, and connect and total timeouts bound every attempt.
//!
//! The process's proxy variables (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`) are ignored: behind a
//! proxy the proxy resolves the host, and the guard would judge nothing. An egress proxy is
//! used only when named (`RDEV_WEBHOOK_PROXY`), and then the SSRF duty is the proxy's.
//!
//! At most [`MAX_RESPONSE_BODY`] bytes of an answer are read: a receiver that streams an
//! endless body loses its connection instead of growing the replica's memory.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::Policy;

use crate::domain::webhook::{WebhookUrl, forbidden_range};
use crate::ports::{OutgoingWebhook, SendError, WebhookSender};

/// How much of a receiver's answer is read before the connection is dropped. Enough for the
/// usual `{"ok":true}` to be read whole, so the connection goes back to the pool.
pub const MAX_RESPONSE_BODY: usize = 4 * 1024;

/// Every address of a host was one webhooks may not reach.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to addresses webhooks may not reach ({range})")]
pub struct ForbiddenDestination {
    host: String,
    range: &'static str,
}

/// Resolves with the system resolver, then keeps only public addresses.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut range = "unresolvable";
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| match forbidden_range(addr.ip()) {
                    Some(r) => {
                        range = r;
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(ForbiddenDestination { host, range }) as _);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// How the sender connects.
#[derive(Debug, Clone)]
pub struct SenderSettings {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Skip the guard (`RDEV_WEBHOOK_ALLOW_PRIVATE=true`): tests and private networks.
    pub allow_private: bool,
    /// An egress proxy every webhook goes through (`RDEV_WEBHOOK_PROXY`); it resolves the
    /// hosts, so it must refuse private destinations itself.
    pub proxy: Option<reqwest::Url>,
}

pub struct HttpWebhookSender {
    client: reqwest::Client,
    allow_private: bool,
    /// Also bounds the create-time DNS check.
    connect_timeout: Duration,
}

impl HttpWebhookSender {
    pub fn new(settings: SenderSettings) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .redirect(Policy::none())
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .user_agent(concat!("rdev-api-webhooks/", env!("CARGO_PKG_VERSION")));
        if !settings.allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        if let Some(proxy) = settings.proxy {
            builder = builder.proxy(reqwest::Proxy::all(proxy)?);
        }
        Ok(Self {
            client: builder.build()?,
            allow_private: settings.allow_private,
            connect_timeout: settings.connect_timeout,
        })
    }

    /// Refuses a URL whose host is a literal address in a forbidden range.
    fn check_literal(&self, url: &reqwest::Url) -> Result<(), SendError> {
        if self.allow_private {
            return Ok(());
        }
        let ip: Option<IpAddr> = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(ip.into()),
            Some(url::Host::Ipv6(ip)) => Some(ip.into()),
            _ => None,
        };
        match ip.and_then(forbidden_range) {
            Some(range) => Err(SendError::Refused(format!(
                "{} is a {range} address",
                url.host_str().unwrap_or_default()
            ))),
            None => Ok(()),
        }
    }
}

/// Reads a small answer to its end, so the connection goes back to the pool (within the
/// attempt's timeout), and drops a larger one unread past [`MAX_RESPONSE_BODY`], closing its
/// connection.
async fn discard_body(mut response: reqwest::Response) {
    let mut read = 0;
    while let Ok(Some(chunk)) = response.chunk().await {
        read += chunk.len();
        if read > MAX_RESPONSE_BODY {
            return;
        }
    }
}

/// Names what went wrong, finding the guard's refusal under reqwest's wrapping.
fn classify(error: &reqwest::Error) -> SendError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(forbidden) = cause.downcast_ref::<ForbiddenDestination>() {
            return SendError::Refused(forbidden.to_string());
        }
        source = cause.source();
    }
    if error.is_timeout() {
        SendError::Timeout
    } else if error.is_connect() {
        SendError::Connect(root_cause(error))
    } else {
        SendError::Other(root_cause(error))
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut last = error;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

#[async_trait]
impl WebhookSender for HttpWebhookSender {
    async fn send(&self, request: &OutgoingWebhook) -> Result<u16, SendError> {
        let url = reqwest::Url::parse(request.url.as_str())
            .map_err(|e| SendError::Other(e.to_string()))?;
        self.check_literal(&url)?;
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", request.id.to_string())
            .header("webhook-timestamp", request.timestamp.to_string())
            .header("webhook-signature", &request.signature)
            .header("traceparent", &request.traceparent)
            .body(request.body.clone())
            .send()
            .await
            .map_err(|e| classify(&e))?;
        let status = response.status().as_u16();
        discard_body(response).await;
        Ok(status)
    }

    async fn check_destination(&self, url: &WebhookUrl) -> Result<(), SendError> {
        if self.allow_private {
            return Ok(());
        }
        let url = reqwest::Url::parse(url.as_str()).map_err(|e| SendError::Other(e.to_string()))?;
        self.check_literal(&url)?;
        let Some(url::Host::Domain(host)) = url.host() else {
            return Ok(());
        };
        let found: Vec<SocketAddr> =
            tokio::time::timeout(self.connect_timeout, tokio::net::lookup_host((host, 0)))
                .await
                .map_err(|_| SendError::Refused(format!("{host} did not resolve in time")))?
                .map_err(|e| SendError::Refused(format!("{host} does not resolve: {e}")))?
                .collect();
        if found.is_empty() {
            return Err(SendError::Refused(format!("{host} does not resolve")));
        }
        // At create time every address must be public; at connect time the resolver keeps the
        // public ones only.
        for addr in found {
            if let Some(range) = forbidden_range(addr.ip()) {
                return Err(SendError::Refused(format!(
                    "{host} resolves to {}, a {range} address",
                    addr.ip()
                )));
            }
        }
        Ok(())
    }
}
