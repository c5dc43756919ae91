//! The audit trail: append-only events chained by HMAC-SHA256 under a key the database does not
//! hold ([`AuditKey`]), so an edited or deleted row shows and a database writer cannot re-forge
//! the chain; the head (last `seq` and hash) is published outside the database so a deleted
//! tail shows too.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::digest::Update;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ids::{ApiKeyId, AuditEventId};
use super::validation::Rule;

/// The secret the chain is sealed with (`RDEV_AUDIT_KEY`). Kept out of the database: whoever
/// can write the database but lacks the key cannot compute a row's hash.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditKey(Vec<u8>);

impl AuditKey {
    pub fn new(secret: Vec<u8>) -> Self {
        Self(secret)
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(***)")
    }
}

/// The last entry of the chain, as published outside the database after each append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    pub seq: i64,
    pub hash: String,
}

/// The `prev_hash` of the first event.
/// The fields an update changed and their new values, recorded in its audit row so the log
/// says what happened, not only that something did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangedFields(serde_json::Map<String, Value>);

impl ChangedFields {
    /// Records `name` with `show(after)` when the value differs.
    pub fn field<T: PartialEq>(
        &mut self,
        name: &str,
        before: &T,
        after: &T,
        show: impl FnOnce(&T) -> Value,
    ) {
        if before != after {
            self.insert(name, show(after));
        }
    }

    pub fn insert(&mut self, name: &str, value: Value) {
        self.0.insert(name.to_owned(), value);
    }

    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

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

/// Whether the audited action took effect: changes are recorded as `success`, refused
/// authentications as `denied`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
        }
    }
}

/// Longest text an audit listing filters on.
pub const MAX_FILTER_TEXT_BYTES: usize = 200;

/// Text an audit listing filters on (an action name, a target id): at most
/// [`MAX_FILTER_TEXT_BYTES`] bytes and no NUL, which no stored value has and the database
/// refuses in a query.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct AuditFilterText(String);

impl TryFrom<String> for AuditFilterText {
    type Error = Rule;
    fn try_from(raw: String) -> Result<Self, Rule> {
        if raw.len() > MAX_FILTER_TEXT_BYTES || raw.contains('\0') {
            return Err(Rule::new(format!(
                "must be at most {MAX_FILTER_TEXT_BYTES} characters, without NUL"
            )));
        }
        Ok(Self(raw))
    }
}

impl AuditFilterText {
    pub fn into_inner(self) -> String {
        self.0
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
    pub fn seal(&self, seq: i64, prev_hash: &str, key: &AuditKey) -> AuditEvent {
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
        event.hash = event.compute_hash(key);
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
    /// HMAC-SHA256 under `key` over every field but `hash`, each length-prefixed so no two
    /// events collide by moving characters between fields, then `prev_hash`.
    pub fn compute_hash(&self, key: &AuditKey) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&key.0).expect("HMAC takes keys of any length");
        self.feed(&mut mac);
        hex::encode(mac.finalize().into_bytes())
    }

    /// The unkeyed SHA-256 of chains written before the key existed (read only to migrate them).
    pub fn legacy_hash(&self) -> String {
        let mut hasher = Sha256::new();
        self.feed(&mut hasher);
        hex::encode(hasher.finalize())
    }

    fn feed(&self, hasher: &mut impl Update) {
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
                    hasher.update(&(text.len() as u64).to_be_bytes());
                    hasher.update(text.as_bytes());
                }
                None => hasher.update(&u64::MAX.to_be_bytes()),
            }
        }
        hasher.update(self.prev_hash.as_bytes());
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

/// A head published earlier, that the chain must still reach (`head_seq`), with the hash its
/// row had then (`head_hash`, optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpectedHead {
    pub seq: i64,
    pub hash: Option<String>,
}

/// Walks events in sequence order; feed it every row, then [`ChainVerifier::finish`].
#[derive(Debug)]
pub struct ChainVerifier {
    /// `None` checks the unkeyed hashes of a chain written before the key existed.
    key: Option<AuditKey>,
    expected_prev: String,
    last_seq: Option<i64>,
    checked: u64,
    first_broken: Option<BrokenLink>,
    head: Option<ExpectedHead>,
    head_seen: bool,
}

impl ChainVerifier {
    /// Checks a chain sealed with `key`; with `head`, also that the chain still reaches it.
    pub fn keyed(key: AuditKey, head: Option<ExpectedHead>) -> Self {
        Self::with(Some(key), head)
    }

    /// Checks a chain of unkeyed hashes (before migration).
    pub fn legacy() -> Self {
        Self::with(None, None)
    }

    fn with(key: Option<AuditKey>, head: Option<ExpectedHead>) -> Self {
        Self {
            key,
            expected_prev: GENESIS_HASH.to_owned(),
            last_seq: None,
            checked: 0,
            first_broken: None,
            head,
            head_seen: false,
        }
    }

    pub fn push(&mut self, event: &AuditEvent) {
        self.checked += 1;
        if let Some(head) = &self.head
            && head.seq == event.seq
        {
            self.head_seen = true;
            if head.hash.as_ref().is_some_and(|hash| *hash != event.hash) {
                self.break_at(event.seq, "row differs from the published head (rewritten)");
            }
        }
        if self.first_broken.is_some() {
            return;
        }
        let expected = match &self.key {
            Some(key) => event.compute_hash(key),
            None => event.legacy_hash(),
        };
        let reason = if event.hash != expected {
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
            self.break_at(event.seq, reason);
        }
        self.expected_prev = event.hash.clone();
        self.last_seq = Some(event.seq);
    }

    fn break_at(&mut self, seq: i64, reason: &'static str) {
        if self.first_broken.is_none() {
            self.first_broken = Some(BrokenLink { seq, reason });
        }
    }

    pub fn finish(mut self) -> ChainReport {
        if self.head.is_some() && !self.head_seen {
            let end = self.last_seq.map_or(1, |last| last + 1);
            self.break_at(
                end,
                "the chain ends before the published head (rows at its end were deleted)",
            );
        }
        ChainReport {
            checked: self.checked,
            first_broken: self.first_broken,
        }
    }
}

/// Action names, stable because clients filter on them.
pub mod action {
    pub const API_KEY_CREATED: &str = "api_key.created";
    /// Refused authentications from one client address with one key prefix, coalesced per
    /// minute.
    pub const AUTH_FAILED: &str = "auth.failed";
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
    pub const WEBHOOK_CREATED: &str = "webhook.created";
    pub const WEBHOOK_UPDATED: &str = "webhook.updated";
    pub const WEBHOOK_DELETED: &str = "webhook.deleted";
    pub const WEBHOOK_ROTATED: &str = "webhook.rotated";
    /// The server disabled an endpoint that answered `410 Gone`.
    pub const WEBHOOK_DISABLED: &str = "webhook.disabled";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> AuditKey {
        AuditKey::new(b"the audit key".to_vec())
    }

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
                .seal(seq, &prev, &key());
                prev = event.hash.clone();
                event
            })
            .collect()
    }

    fn verify_with(events: &[AuditEvent], head: Option<ExpectedHead>) -> ChainReport {
        let mut verifier = ChainVerifier::keyed(key(), head);
        events.iter().for_each(|e| verifier.push(e));
        verifier.finish()
    }

    fn verify(events: &[AuditEvent]) -> ChainReport {
        verify_with(events, None)
    }

    #[test]
    fn a_chain_reforged_without_the_key_is_found() {
        // What a database writer can do: edit a row, and recompute every hash from it on.
        let mut events = chain(5);
        events[2].details = r#"{"n":99}"#.into();
        let mut prev = events[1].hash.clone();
        for event in &mut events[2..] {
            event.prev_hash = prev.clone();
            event.hash = event.compute_hash(&AuditKey::new(b"a guess".to_vec()));
            prev = event.hash.clone();
        }
        assert_eq!(verify(&events).first_broken.unwrap().seq, 3);
    }

    #[test]
    fn a_deleted_tail_is_found_only_against_the_published_head() {
        let mut events = chain(5);
        let head = ExpectedHead {
            seq: 5,
            hash: Some(events[4].hash.clone()),
        };
        events.truncate(3);
        assert_eq!(verify(&events).first_broken, None, "the rest still chains");
        let report = verify_with(&events, Some(head.clone()));
        assert_eq!(report.first_broken.unwrap().seq, 4);
        let full = chain(5);
        let mismatch = ExpectedHead {
            seq: 5,
            hash: Some("0".repeat(64)),
        };
        assert_eq!(
            verify_with(&full, Some(mismatch)).first_broken.unwrap().seq,
            5
        );
    }

    #[test]
    fn a_legacy_chain_verifies_only_as_legacy() {
        let mut events = chain(3);
        let mut prev = GENESIS_HASH.to_owned();
        for event in &mut events {
            event.prev_hash = prev.clone();
            event.hash = event.legacy_hash();
            prev = event.hash.clone();
        }
        let mut legacy = ChainVerifier::legacy();
        events.iter().for_each(|e| legacy.push(e));
        assert_eq!(legacy.finish().first_broken, None);
        assert_eq!(verify(&events).first_broken.unwrap().seq, 1);
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
    fn filter_text_refuses_nul_and_oversized_text() {
        assert!(AuditFilterText::try_from("project.created".to_owned()).is_ok());
        assert!(AuditFilterText::try_from("x".repeat(MAX_FILTER_TEXT_BYTES)).is_ok());
        assert!(AuditFilterText::try_from("x".repeat(MAX_FILTER_TEXT_BYTES + 1)).is_err());
        assert!(AuditFilterText::try_from("a\0b".to_owned()).is_err());
    }

    #[test]
    fn hashes_are_sensitive_to_field_boundaries() {
        let mut a = chain(1).remove(0);
        let mut b = a.clone();
        a.target_type = "ab".into();
        a.target_id = "c".into();
        b.target_type = "a".into();
        b.target_id = "bc".into();
        assert_ne!(a.compute_hash(&key()), b.compute_hash(&key()));
    }
}
