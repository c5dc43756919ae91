//! Refused authentications in the audit log, coalesced per client address and key prefix: a
//! client guessing thousands of keys writes one row per flush, not one per guess, and the
//! memory this takes is bounded however many addresses an attacker uses.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::domain::api_key::KeyRejection;
use crate::domain::audit::{AuditContext, NewAuditEvent, Outcome, action};
use crate::ports::{AuditLog, Clock, PortError};

/// Distinct (address, prefix) pairs kept between flushes; failures from further pairs are
/// tallied together in one overflow row.
pub const MAX_TRACKED_SOURCES: usize = 1000;

/// Where refused attempts came from: the client address and the public prefix of the key they
/// presented (`-` for none, `?` for something not shaped like a key).
type Source = (IpAddr, String);

#[derive(Debug, Clone)]
struct Tally {
    count: u64,
    reasons: BTreeMap<&'static str, u64>,
    first_at: OffsetDateTime,
    last_at: OffsetDateTime,
}

impl Tally {
    fn new(at: OffsetDateTime) -> Self {
        Self {
            count: 0,
            reasons: BTreeMap::new(),
            first_at: at,
            last_at: at,
        }
    }

    fn add(&mut self, reason: KeyRejection, at: OffsetDateTime) {
        self.count += 1;
        *self.reasons.entry(reason.as_str()).or_default() += 1;
        self.last_at = at;
    }
}

#[derive(Debug, Default)]
struct Pending {
    by_source: HashMap<Source, Tally>,
    /// Failures from sources past [`MAX_TRACKED_SOURCES`], and how many such sources.
    overflow: Option<(Tally, u64)>,
}

pub struct FailedAuthentications {
    audit: Arc<dyn AuditLog>,
    clock: Arc<dyn Clock>,
    pending: Mutex<Pending>,
}

impl FailedAuthentications {
    pub fn new(audit: Arc<dyn AuditLog>, clock: Arc<dyn Clock>) -> Self {
        Self {
            audit,
            clock,
            pending: Mutex::new(Pending::default()),
        }
    }

    pub fn record(&self, client: IpAddr, key_prefix: &str, reason: KeyRejection) {
        let now = self.clock.now();
        let mut pending = self.pending.lock().expect("tally lock is never poisoned");
        let source = (client, key_prefix.to_owned());
        if let Some(tally) = pending.by_source.get_mut(&source) {
            tally.add(reason, now);
        } else if pending.by_source.len() < MAX_TRACKED_SOURCES {
            let mut tally = Tally::new(now);
            tally.add(reason, now);
            pending.by_source.insert(source, tally);
        } else {
            let (tally, sources) = pending.overflow.get_or_insert_with(|| (Tally::new(now), 0));
            tally.add(reason, now);
            *sources += 1;
        }
    }

    /// Appends one `auth.failed` row per source seen since the last flush. Rows that cannot be
    /// written are kept for the next flush.
    pub async fn flush(&self) -> Result<(), PortError> {
        let Pending {
            by_source,
            overflow,
        } = std::mem::take(&mut *self.pending.lock().expect("tally lock is never poisoned"));
        let mut rows: Vec<(Option<Source>, Tally, u64)> = by_source
            .into_iter()
            .map(|(source, tally)| (Some(source), tally, 1))
            .collect();
        rows.extend(overflow.map(|(tally, sources)| (None, tally, sources)));
        rows.sort_by_key(|(_, tally, _)| tally.first_at);
        let mut rows = rows.into_iter();
        while let Some((source, tally, sources)) = rows.next() {
            let event = self.event(source.as_ref(), &tally, sources);
            if let Err(error) = self.audit.append(event).await {
                self.put_back(source, tally, sources);
                rows.for_each(|(source, tally, sources)| self.put_back(source, tally, sources));
                return Err(error);
            }
        }
        Ok(())
    }

    fn event(&self, source: Option<&Source>, tally: &Tally, sources: u64) -> NewAuditEvent {
        let (client_ip, key_prefix) = match source {
            Some((ip, prefix)) => (ip.to_string(), prefix.as_str()),
            None => ("*".to_owned(), "*"),
        };
        let context = AuditContext {
            client_ip: source.map(|(ip, _)| ip.to_string()),
            ..AuditContext::system()
        };
        let mut event = NewAuditEvent::new(
            &context,
            self.clock.now(),
            action::AUTH_FAILED,
            ("client", client_ip),
            json!({
                "key_prefix": key_prefix,
                "count": tally.count,
                "reasons": tally.reasons,
                "first_at": tally.first_at.format(&Rfc3339).ok(),
                "last_at": tally.last_at.format(&Rfc3339).ok(),
            }),
        );
        if source.is_none() {
            event.details["sources"] = sources.into();
        }
        event.outcome = Outcome::Denied;
        event
    }

    fn put_back(&self, source: Option<Source>, tally: Tally, sources: u64) {
        let mut pending = self.pending.lock().expect("tally lock is never poisoned");
        match source {
            Some(source) => {
                let merged = pending
                    .by_source
                    .entry(source)
                    .or_insert_with(|| Tally::new(tally.first_at));
                merge(merged, tally);
            }
            None => {
                let (merged, known) = pending
                    .overflow
                    .get_or_insert_with(|| (Tally::new(tally.first_at), 0));
                merge(merged, tally);
                *known += sources;
            }
        }
    }
}

fn merge(into: &mut Tally, from: Tally) {
    into.count += from.count;
    for (reason, n) in from.reasons {
        *into.reasons.entry(reason).or_default() += n;
    }
    into.first_at = into.first_at.min(from.first_at);
    into.last_at = into.last_at.max(from.last_at);
}
