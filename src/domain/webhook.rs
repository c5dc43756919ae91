//! Webhooks: endpoints that receive command events, their signing secrets, the deliveries of
//! events to them, the retry schedule, and the rule about which addresses they may point at.
//! Signatures follow the Standard Webhooks spec, so any of its libraries verifies them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use time::OffsetDateTime;

use super::ids::ProjectId;
use super::validation::Rule;

pub use super::ids::{DeliveryId, WebhookId};

/// Longest accepted endpoint URL.
pub const MAX_URL_BYTES: usize = 2048;

/// An endpoint URL: `http` or `https`, with a host, no credentials, at most [`MAX_URL_BYTES`].
/// A literal IP address must be a public one unless private addresses are allowed; host names
/// are checked against the same rule after DNS, at create time and again at every connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(String);

impl WebhookUrl {
    pub fn parse(raw: &str, allow_private: bool) -> Result<Self, Rule> {
        if raw.len() > MAX_URL_BYTES {
            return Err(Rule::new(format!("must be at most {MAX_URL_BYTES} bytes")));
        }
        let url = url::Url::parse(raw).map_err(|e| Rule::new(format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Rule::new("must be an http or https URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Rule::new("must not carry credentials"));
        }
        let forbidden = match url.host() {
            None => return Err(Rule::new("must name a host")),
            Some(url::Host::Domain(_)) => None,
            Some(url::Host::Ipv4(ip)) => forbidden_range(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => forbidden_range(IpAddr::V6(ip)),
        };
        match forbidden {
            Some(range) if !allow_private => Err(Rule::new(format!(
                "points at a {range} address, which webhooks may not reach"
            ))),
            _ => Ok(Self(url.to_string())),
        }
    }

    /// A URL read back from storage, where it was validated on the way in.
    pub fn from_trusted(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Names the non-public range `ip` is in (loopback, private, link-local incl. the cloud metadata
/// address 169.254.169.254, CGNAT 100.64/10, unique-local fc00::/7, site-local fec0::/10,
/// unspecified, ...), or `None` for a public address. IPv6 forms that carry an IPv4 address
/// (mapped, compatible, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo `2001::/32`) are judged
/// by that address, since a translator or relay delivers them there; the local-use NAT64
/// prefix `64:ff9b:1::/48` is refused whole, as its embedding is the network's choice.
pub fn forbidden_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden_v4(v4),
            None => forbidden_v6(v6),
        },
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_private() {
        Some("private")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (CGNAT)")
    } else if ip.is_broadcast()
        || ip.is_multicast()
        || a >= 240
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
    {
        Some("reserved")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    let first = segments[0];
    let v4 = |high: u16, low: u16| {
        let [a, b] = high.to_be_bytes();
        let [c, d] = low.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if first & 0xfe00 == 0xfc00 {
        Some("unique-local")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if first & 0xffc0 == 0xfec0 {
        Some("site-local")
    } else if ip.is_multicast() {
        Some("reserved")
    } else if segments[..6] == [0; 6] {
        // IPv4-compatible (::a.b.c.d), deprecated but still routed by some stacks.
        forbidden_v4(v4(segments[6], segments[7]))
    } else if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64, well-known prefix (RFC 6052): the translator connects to the IPv4 address.
        forbidden_v4(v4(segments[6], segments[7]))
    } else if segments[..3] == [0x64, 0xff9b, 1] {
        Some("local-use NAT64")
    } else if first == 0x2002 {
        // 6to4 (RFC 3056): 2002:AABB:CCDD::/48 is relayed to AA.BB.CC.DD.
        forbidden_v4(v4(segments[1], segments[2]))
    } else if first == 0x2001 && segments[1] == 0 {
        // Teredo (RFC 4380): the server's address, and the client's with every bit inverted.
        forbidden_v4(v4(segments[2], segments[3]))
            .or_else(|| forbidden_v4(v4(!segments[6], !segments[7])))
    } else {
        None
    }
}

/// The events a webhook can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    CommandQueued,
    CommandStarted,
    CommandSucceeded,
    CommandFailed,
    CommandCancelled,
    CommandTimedOut,
    CommandLost,
    /// Sent by `POST /webhooks/{id}/ping`, whatever the endpoint's filter.
    Ping,
}

impl EventType {
    /// The command events, which endpoints subscribe to.
    pub const COMMAND_EVENTS: [EventType; 7] = [
        EventType::CommandQueued,
        EventType::CommandStarted,
        EventType::CommandSucceeded,
        EventType::CommandFailed,
        EventType::CommandCancelled,
        EventType::CommandTimedOut,
        EventType::CommandLost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CommandQueued => "command.queued",
            EventType::CommandStarted => "command.started",
            EventType::CommandSucceeded => "command.succeeded",
            EventType::CommandFailed => "command.failed",
            EventType::CommandCancelled => "command.cancelled",
            EventType::CommandTimedOut => "command.timed_out",
            EventType::CommandLost => "command.lost",
            EventType::Ping => "ping",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, Rule> {
        Self::COMMAND_EVENTS
            .into_iter()
            .chain([EventType::Ping])
            .find(|e| e.as_str() == raw)
            .ok_or_else(|| {
                Rule::new(format!(
                    "unknown event `{raw}`: one of command.queued, command.started, \
                     command.succeeded, command.failed, command.cancelled, command.timed_out, \
                     command.lost"
                ))
            })
    }
}

/// Which command events an endpoint receives: all of them, or a non-empty subset. Stored as
/// `*` or a comma-separated list, which the outbox insert matches in SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFilter {
    All,
    Only(Vec<EventType>),
}

impl EventFilter {
    /// `["*"]` or an empty list is every event; otherwise each must be a command event.
    pub fn parse(raw: &[String]) -> Result<Self, Rule> {
        if raw.is_empty() || raw.iter().any(|e| e == "*") {
            return Ok(EventFilter::All);
        }
        let mut events = Vec::with_capacity(raw.len());
        for name in raw {
            let event = EventType::parse(name)?;
            if event == EventType::Ping {
                return Err(Rule::new(
                    "`ping` is always delivered and cannot be filtered",
                ));
            }
            events.push(event);
        }
        events.sort();
        events.dedup();
        Ok(EventFilter::Only(events))
    }

    pub fn to_stored(&self) -> String {
        match self {
            EventFilter::All => "*".into(),
            EventFilter::Only(events) => events
                .iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    pub fn from_stored(stored: &str) -> Result<Self, Rule> {
        if stored == "*" {
            return Ok(EventFilter::All);
        }
        let names: Vec<String> = stored.split(',').map(str::to_owned).collect();
        Self::parse(&names)
    }

    /// The filter as a list for clients: `["*"]` or the event names.
    pub fn names(&self) -> Vec<String> {
        match self {
            EventFilter::All => vec!["*".into()],
            EventFilter::Only(events) => events.iter().map(|e| e.as_str().to_owned()).collect(),
        }
    }

    pub fn matches(&self, event: EventType) -> bool {
        match self {
            EventFilter::All => true,
            EventFilter::Only(events) => event == EventType::Ping || events.contains(&event),
        }
    }
}

/// Bytes of key material in a generated secret.
const SECRET_BYTES: usize = 24;

/// A signing secret, `whsec_<base64 of the key>` as Standard Webhooks writes it. Its `Debug`
/// hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(String);

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(whsec_...)")
    }
}

impl WebhookSecret {
    pub fn generate(rng: &mut impl rand::RngCore) -> Self {
        let mut key = [0u8; SECRET_BYTES];
        rng.fill_bytes(&mut key);
        Self(format!("whsec_{}", BASE64.encode(key)))
    }

    /// A secret as stored: `whsec_` and base64 of at least 16 bytes.
    pub fn parse(raw: String) -> Result<Self, Rule> {
        let key = raw
            .strip_prefix("whsec_")
            .and_then(|b64| BASE64.decode(b64).ok())
            .ok_or_else(|| Rule::new("must be whsec_ followed by base64"))?;
        if key.len() < 16 {
            return Err(Rule::new("must hold at least 16 bytes of key"));
        }
        Ok(Self(raw))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    fn key(&self) -> Vec<u8> {
        BASE64
            .decode(&self.0["whsec_".len()..])
            .expect("checked when the secret was made")
    }

    /// The `webhook-signature` header value: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
    pub fn sign(&self, id: DeliveryId, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key()).expect("HMAC takes any key");
        mac.update(id.to_string().as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

/// A configured endpoint.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: WebhookId,
    pub url: WebhookUrl,
    pub events: EventFilter,
    /// Only this project's commands; `None` is every project.
    pub project_id: Option<ProjectId>,
    pub description: String,
    pub secret: WebhookSecret,
    pub enabled: bool,
    /// Why the server disabled it (a `410 Gone`), when it did.
    pub disabled_reason: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Waiting for its next attempt (or being attempted under a lease).
    Pending,
    Delivered,
    /// Out of attempts, or its endpoint answered `410 Gone`.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, Rule> {
        match raw {
            "pending" => Ok(DeliveryStatus::Pending),
            "delivered" => Ok(DeliveryStatus::Delivered),
            "failed" => Ok(DeliveryStatus::Failed),
            other => Err(Rule::new(format!("unknown delivery status `{other}`"))),
        }
    }
}

/// One event on its way to one endpoint.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: DeliveryId,
    pub webhook_id: WebhookId,
    pub event_type: String,
    /// The exact body sent: `{"type", "timestamp", "data"}`.
    pub payload: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_at: Option<OffsetDateTime>,
    pub last_status_code: Option<u16>,
    pub last_latency_ms: Option<u64>,
    pub last_error: Option<String>,
    pub created_at: OffsetDateTime,
    pub delivered_at: Option<OffsetDateTime>,
}

/// One attempt of a delivery, as the log shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub number: u32,
    pub at: OffsetDateTime,
    pub status_code: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
}

/// The body of a ping delivery.
pub fn ping_payload(webhook: WebhookId, at: OffsetDateTime) -> String {
    let timestamp = at
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a UTC time formats as RFC 3339");
    serde_json::json!({
        "type": EventType::Ping.as_str(),
        "timestamp": timestamp,
        "data": {"webhook_id": webhook.as_uuid()},
    })
    .to_string()
}

/// The waits between attempts: after attempt `n` fails, the next comes after `delays[n-1]`
/// (with jitter); after the last one the delivery fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

impl RetrySchedule {
    /// 5 s, 30 s, 2 min, 10 min, 1 h, 6 h: seven attempts over about 7 h 13 min.
    pub fn standard() -> Self {
        Self(
            [5, 30, 120, 600, 3600, 6 * 3600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
        )
    }

    pub fn new(delays: Vec<Duration>) -> Self {
        Self(delays)
    }

    pub fn delays(&self) -> &[Duration] {
        &self.0
    }

    /// How many attempts a delivery gets in all.
    pub fn max_attempts(&self) -> u32 {
        self.0.len() as u32 + 1
    }

    /// The wait after failed attempt number `attempts` (1-based), `None` when it was the last.
    /// `jitter` in `[0, 1)` spreads the wait over +-20 % so retries of many deliveries that
    /// failed together do not arrive together.
    pub fn next_delay(&self, attempts: u32, jitter: f64) -> Option<Duration> {
        let base = *self.0.get(attempts.checked_sub(1)? as usize)?;
        Some(base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0)))
    }
}

/// What an attempt's answer means for the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptVerdict {
    Delivered,
    /// `410 Gone`: the receiver asks never to be called again.
    Gone,
    Retry,
}

impl AttemptVerdict {
    /// 2xx delivers, 410 disables the endpoint, anything else (or no answer) retries.
    pub fn of(status: Option<u16>) -> Self {
        match status {
            Some(200..=299) => AttemptVerdict::Delivered,
            Some(410) => AttemptVerdict::Gone,
            _ => AttemptVerdict::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_http_with_a_host_and_no_credentials() {
        assert!(WebhookUrl::parse("https://hooks.example.com/x", false).is_ok());
        assert!(WebhookUrl::parse("ftp://hooks.example.com/x", false).is_err());
        assert!(WebhookUrl::parse("https://user:pw@hooks.example.com/", false).is_err());
        assert!(WebhookUrl::parse("not a url", false).is_err());
        assert!(WebhookUrl::parse("file:///etc/passwd", false).is_err());
    }

    #[test]
    fn literal_private_and_metadata_addresses_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:8080/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://172.16.0.1/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://2130706433/",
        ] {
            assert!(WebhookUrl::parse(url, false).is_err(), "{url} was accepted");
            assert!(
                WebhookUrl::parse(url, true).is_ok(),
                "{url} refused when allowed"
            );
        }
        assert!(WebhookUrl::parse("http://93.184.216.34/", false).is_ok());
        assert!(WebhookUrl::parse("http://[2606:4700::1111]/", false).is_ok());
    }

    #[test]
    fn filters_parse_and_round_trip_through_storage() {
        assert_eq!(EventFilter::parse(&[]).unwrap(), EventFilter::All);
        let only = EventFilter::parse(&["command.failed".into(), "command.queued".into()]).unwrap();
        assert_eq!(only.to_stored(), "command.queued,command.failed");
        assert_eq!(EventFilter::from_stored(&only.to_stored()).unwrap(), only);
        assert!(only.matches(EventType::CommandFailed));
        assert!(!only.matches(EventType::CommandSucceeded));
        assert!(EventFilter::parse(&["command.nope".into()]).is_err());
    }

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The test vector of the Standard Webhooks reference libraries.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()).unwrap();
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let mut mac = Hmac::<Sha256>::new_from_slice(&secret.key()).unwrap();
        mac.update(format!("{id}.1614265330.{{\"test\": 2432232314}}").as_bytes());
        assert_eq!(
            format!("v1,{}", BASE64.encode(mac.finalize().into_bytes())),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn the_schedule_backs_off_with_bounded_jitter_then_gives_up() {
        let schedule = RetrySchedule::standard();
        assert_eq!(schedule.max_attempts(), 7);
        assert_eq!(schedule.next_delay(1, 0.5), Some(Duration::from_secs(5)));
        let low = schedule.next_delay(2, 0.0).unwrap();
        let high = schedule.next_delay(2, 0.999).unwrap();
        assert!(low >= Duration::from_secs(24) && high <= Duration::from_secs(36));
        assert_eq!(schedule.next_delay(7, 0.5), None);
    }

    #[test]
    fn verdicts() {
        assert_eq!(AttemptVerdict::of(Some(204)), AttemptVerdict::Delivered);
        assert_eq!(AttemptVerdict::of(Some(410)), AttemptVerdict::Gone);
        assert_eq!(AttemptVerdict::of(Some(500)), AttemptVerdict::Retry);
        assert_eq!(AttemptVerdict::of(Some(301)), AttemptVerdict::Retry);
        assert_eq!(AttemptVerdict::of(None), AttemptVerdict::Retry);
    }
}
