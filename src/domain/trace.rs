//! W3C Trace Context: the `traceparent` a request arrives with, and the one sent onwards
//! (webhooks). A value that breaks the format is ignored, never an error: tracing must not
//! refuse a request.

use std::fmt;

/// A parsed `traceparent` (`version-traceid-parentid-flags`, lowercase hex). The trace id
/// (32 hex digits) and the parent id (16) are not all zeros; version `ff` is invalid; a
/// version above `00` may carry more fields after the flags, which are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: String,
    parent_id: String,
    flags: u8,
}

fn lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn all_zeros(text: &str) -> bool {
    text.bytes().all(|b| b == b'0')
}

impl TraceParent {
    /// The header value, if it follows the format.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let mut parts = header.splitn(5, '-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let parent_id = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        let version_ok = lower_hex(version, 2) && version != "ff";
        // Version 00 has exactly four fields; later versions may append more.
        let length_ok = match rest {
            None => true,
            Some(_) => version != "00",
        };
        let ids_ok = lower_hex(trace_id, 32)
            && !all_zeros(trace_id)
            && lower_hex(parent_id, 16)
            && !all_zeros(parent_id);
        if !(version_ok && length_ok && ids_ok && lower_hex(flags, 2)) {
            return None;
        }
        Some(Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// A `traceparent` naming span `span_id` of trace `trace_id` (both lowercase hex, as an
    /// OpenTelemetry span context prints them) as the parent of what is sent with it.
    pub fn new(trace_id: &str, span_id: &str, sampled: bool) -> Option<Self> {
        Self::parse(&format!(
            "00-{trace_id}-{span_id}-{:02x}",
            u8::from(sampled)
        ))
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    pub fn parent_id(&self) -> &str {
        &self.parent_id
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    pub fn flags(&self) -> u8 {
        self.flags
    }
}

/// The header value, version `00`.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    #[test]
    fn a_well_formed_header_gives_its_ids_and_flags() {
        let parsed = TraceParent::parse(&format!("00-{TRACE}-{PARENT}-01")).unwrap();
        assert_eq!(parsed.trace_id(), TRACE);
        assert_eq!(parsed.parent_id(), PARENT);
        assert!(parsed.sampled());
        assert_eq!(parsed.to_string(), format!("00-{TRACE}-{PARENT}-01"));
    }

    #[test]
    fn malformed_headers_are_ignored() {
        for bad in [
            String::new(),
            format!("00-{TRACE}-{PARENT}"),
            format!("00-{}-{PARENT}-01", TRACE.to_uppercase()),
            format!("00-{}-{PARENT}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{PARENT}-01"),
            format!("00-{TRACE}-{PARENT}-01-extra"),
            format!("00-{}-{PARENT}-01", &TRACE[..31]),
            format!("00-{}x-{PARENT}-01", &TRACE[..31]),
            format!("0-{TRACE}-{PARENT}-01"),
            format!("00-{TRACE}-{PARENT}-1"),
        ] {
            assert_eq!(TraceParent::parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn a_later_version_may_carry_more_fields() {
        let parsed = TraceParent::parse(&format!("01-{TRACE}-{PARENT}-00-what-ever")).unwrap();
        assert_eq!(parsed.trace_id(), TRACE);
        assert!(!parsed.sampled());
    }

    #[test]
    fn new_round_trips_through_the_header() {
        let made = TraceParent::new(TRACE, PARENT, true).unwrap();
        assert_eq!(TraceParent::parse(&made.to_string()), Some(made));
        assert_eq!(TraceParent::new("xyz", PARENT, true), None);
    }
}
