//! Typed identifiers: a `CommandId` cannot be passed where a `ProjectId` is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new time-ordered (UUIDv7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }
    };
}

typed_id!(
    /// Identifies an API key (not its secret).
    ApiKeyId
);
typed_id!(
    /// Identifies a project.
    ProjectId
);
typed_id!(
    /// Identifies a submitted command.
    CommandId
);
typed_id!(
    /// Identifies one audit log entry.
    AuditEventId
);
typed_id!(
    /// Identifies a webhook endpoint.
    WebhookId
);
typed_id!(
    /// Identifies one delivery of one event to one endpoint; it is also the `webhook-id` header,
    /// which stays the same across retries so receivers can drop duplicates.
    DeliveryId
);
