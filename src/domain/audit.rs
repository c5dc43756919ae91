//! The audit trail: append-only events chained by SHA-256 so that an edited or deleted row shows.

use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ids::{ApiKeyId, AuditEventId};

/// The `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who did something, from where, in which request. Every audited change carries one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditContext {
    pub actor: Option<ApiKeyId>,
    pub client_ip: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
}

impl AuditContext {
    /// The server itself (bootstrap, reaper): no key, no request.
    pub fn system() -> Self {
        Self::default()
    }
}

/// Whether the audited action took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }
}

/// An event about to be appended; the log assigns its sequence number and hashes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEvent {
    pub id: AuditEventId,
    pub at: OffsetDateTime,
    pub context: AuditContext,
    pub action: &'static str,
    pub target_type: &'static str,
    pub target_id: String,
    pub outcome: Outcome,
    pub details: Value,
}

impl NewAuditEvent {
    pub fn new(
        context: &AuditContext,
        at: OffsetDateTime,
        action: &'static str,
        target: (&'static str, String),
        details: Value,
    ) -> Self {
        Self {
            id: AuditEventId::new(),
            // Stored timestamps keep microseconds; hashing what is stored keeps `verify` exact.
            at: truncate_to_micros(at),
            context: context.clone(),
            action,
            target_type: target.0,
            target_id: target.1,
            outcome: Outcome::Success,
            details,
        }
    }

    /// Seals the event onto the chain after `prev_hash`, as entry number `seq`.
    pub fn seal(&self, seq: i64, prev_hash: &str) -> AuditEvent {
        let mut event = AuditEvent {
            seq,
            id: self.id,
            at: self.at,
            actor: self.context.actor,
            client_ip: self.context.client_ip.clone(),
            request_id: self.context.request_id.clone(),
            trace_id: self.context.trace_id.clone(),
            action: self.action.to_owned(),
            target_type: self.target_type.to_owned(),
            target_id: self.target_id.clone(),
            outcome: self.outcome.as_str().to_owned(),
            details: self.details.to_string(),
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
        };
        event.hash = event.compute_hash();
        event
    }
}

pub fn truncate_to_micros(at: OffsetDateTime) -> OffsetDateTime {
    let micros = at.microsecond();
    at.replace_microsecond(micros)
        .expect("microseconds from a valid time are valid")
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub seq: i64,
    pub id: AuditEventId,
    pub at: OffsetDateTime,
    pub actor: Option<ApiKeyId>,
    pub client_ip: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub outcome: String,
    /// JSON text, hashed exactly as stored.
    pub details: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEvent {
    /// SHA-256 over every field but `hash`, each length-prefixed so no two events collide by
    /// moving characters between fields.
    pub fn compute_hash(&self) -> String {
        let mut hasher = Sha256::new();
        let at = self
            .at
            .to_offset(time::UtcOffset::UTC)
            .format(&Rfc3339)
            .unwrap_or_default();
        let seq = self.seq.to_string();
        let id = self.id.to_string();
        let actor = self.actor.map(|a| a.to_string());
        let fields: [Option<&str>; 12] = [
            Some(&seq),
            Some(&id),
            Some(&at),
            actor.as_deref(),
            self.client_ip.as_deref(),
            self.request_id.as_deref(),
            self.trace_id.as_deref(),
            Some(&self.action),
            Some(&self.target_type),
            Some(&self.target_id),
            Some(&self.outcome),
            Some(&self.details),
        ];
        for field in fields {
            match field {
                Some(text) => {
                    hasher.update((text.len() as u64).to_be_bytes());
                    hasher.update(text.as_bytes());
                }
                None => hasher.update(u64::MAX.to_be_bytes()),
            }
        }
        hasher.update(self.prev_hash.as_bytes());
        hex::encode(hasher.finalize())
    }
}

/// The outcome of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    pub checked: u64,
    pub first_broken: Option<BrokenLink>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub seq: i64,
    pub reason: &'static str,
}

/// Walks events in sequence order; feed it every row, then [`ChainVerifier::finish`].
#[derive(Debug)]
pub struct ChainVerifier {
    expected_prev: String,
    last_seq: Option<i64>,
    checked: u64,
    first_broken: Option<BrokenLink>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            expected_prev: GENESIS_HASH.to_owned(),
            last_seq: None,
            checked: 0,
            first_broken: None,
        }
    }
}

impl ChainVerifier {
    pub fn push(&mut self, event: &AuditEvent) {
        self.checked += 1;
        if self.first_broken.is_some() {
            return;
        }
        let reason = if event.hash != event.compute_hash() {
            Some("row contents do not match its hash (edited)")
        } else if event.prev_hash != self.expected_prev {
            Some(
                "row does not follow the previous row's hash (a row before it was deleted or edited)",
            )
        } else if self.last_seq.is_some_and(|last| event.seq != last + 1) {
            Some("sequence gap (a row before it was deleted)")
        } else {
            None
        };
        if let Some(reason) = reason {
            self.first_broken = Some(BrokenLink {
                seq: event.seq,
                reason,
            });
        }
        self.expected_prev = event.hash.clone();
        self.last_seq = Some(event.seq);
    }

    pub fn finish(self) -> ChainReport {
        ChainReport {
            checked: self.checked,
            first_broken: self.first_broken,
        }
    }
}

/// Action names, stable because clients filter on them.
pub mod action {
    pub const API_KEY_CREATED: &str = "api_key.created";
    pub const API_KEY_UPDATED: &str = "api_key.updated";
    pub const API_KEY_REVOKED: &str = "api_key.revoked";
    pub const API_KEY_ROTATED: &str = "api_key.rotated";
    pub const PROJECT_CREATED: &str = "project.created";
    pub const PROJECT_UPDATED: &str = "project.updated";
    pub const PROJECT_DELETED: &str = "project.deleted";
    pub const COMMAND_SUBMITTED: &str = "command.submitted";
    pub const COMMAND_CANCEL_REQUESTED: &str = "command.cancel_requested";
    pub const COMMAND_FINISHED: &str = "command.finished";
    pub const POD_RESTARTED: &str = "pod.restarted";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: usize) -> Vec<AuditEvent> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n as i64)
            .map(|seq| {
                let event = NewAuditEvent::new(
                    &AuditContext::system(),
                    OffsetDateTime::now_utc(),
                    action::PROJECT_CREATED,
                    ("project", format!("p{seq}")),
                    json!({"n": seq}),
                )
                .seal(seq, &prev);
                prev = event.hash.clone();
                event
            })
            .collect()
    }

    fn verify(events: &[AuditEvent]) -> ChainReport {
        let mut verifier = ChainVerifier::default();
        events.iter().for_each(|e| verifier.push(e));
        verifier.finish()
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let report = verify(&chain(5));
        assert_eq!(report.checked, 5);
        assert_eq!(report.first_broken, None);
    }

    #[test]
    fn an_edited_row_is_found() {
        let mut events = chain(5);
        events[2].details = r#"{"n":99}"#.into();
        assert_eq!(verify(&events).first_broken.unwrap().seq, 3);
    }

    #[test]
    fn a_deleted_row_is_found() {
        let mut events = chain(5);
        events.remove(1);
        assert_eq!(verify(&events).first_broken.unwrap().seq, 3);
    }

    #[test]
    fn hashes_are_sensitive_to_field_boundaries() {
        let mut a = chain(1).remove(0);
        let mut b = a.clone();
        a.target_type = "ab".into();
        a.target_id = "c".into();
        b.target_type = "a".into();
        b.target_id = "bc".into();
        assert_ne!(a.compute_hash(), b.compute_hash());
    }
}
