//! Webhook endpoints as admins manage them (create, change, rotate the secret, delete), the
//! delivery log, redeliveries and pings. Every change is audited, never with the secret.

use std::sync::Arc;

use serde_json::json;

use crate::domain::FieldError;
use crate::domain::audit::{NewAuditEvent, action};
use crate::domain::ids::ProjectId;
use crate::domain::webhook::{
    Attempt, Delivery, DeliveryId, DeliveryStatus, EventFilter, EventType, Webhook, WebhookId,
    WebhookSecret, WebhookUrl, ping_payload,
};
use crate::ports::{
    Clock, DeliveryFilter, DeliveryQueue, Page, PortError, SendError, WebhookEndpoints,
    WebhookSender,
};

use super::{Caller, ServiceError};

/// A request for a new endpoint; the URL is checked here, where the address rule is known.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub url: String,
    pub events: EventFilter,
    pub project_id: Option<ProjectId>,
    pub description: String,
    pub enabled: bool,
}

/// A partial update; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct WebhookChanges {
    pub url: Option<String>,
    pub events: Option<EventFilter>,
    /// `Some(None)` makes the endpoint receive every project's events.
    pub project_id: Option<Option<ProjectId>>,
    pub description: Option<String>,
    /// Enabling also clears the reason it was disabled.
    pub enabled: Option<bool>,
}

/// An endpoint with its secret: shown on create and rotate only.
#[derive(Debug, Clone)]
pub struct IssuedWebhook {
    pub webhook: Webhook,
}

/// A delivery with its attempt log.
#[derive(Debug, Clone)]
pub struct DeliveryLog {
    pub delivery: Delivery,
    pub attempts: Vec<Attempt>,
}

pub struct WebhookPorts {
    pub endpoints: Arc<dyn WebhookEndpoints>,
    pub deliveries: Arc<dyn DeliveryQueue>,
    pub sender: Arc<dyn WebhookSender>,
    pub clock: Arc<dyn Clock>,
}

pub struct WebhookService {
    ports: WebhookPorts,
    /// `RDEV_WEBHOOK_ALLOW_PRIVATE`: private and loopback destinations are accepted.
    allow_private: bool,
}

impl WebhookService {
    pub fn new(ports: WebhookPorts, allow_private: bool) -> Self {
        Self {
            ports,
            allow_private,
        }
    }

    /// Parses a URL and, unless private addresses are allowed, resolves its host now and
    /// refuses it when it leads to a forbidden address.
    async fn checked_url(&self, raw: &str) -> Result<WebhookUrl, ServiceError> {
        let url = WebhookUrl::parse(raw, self.allow_private)
            .map_err(|rule| ServiceError::Invalid(vec![FieldError::new("/url", rule.0)]))?;
        match self.ports.sender.check_destination(&url).await {
            Ok(()) => Ok(url),
            Err(SendError::Refused(why)) => Err(ServiceError::Invalid(vec![FieldError::new(
                "/url",
                format!("refused: {why}"),
            )])),
            Err(other) => Err(ServiceError::Invalid(vec![FieldError::new(
                "/url",
                other.to_string(),
            )])),
        }
    }

    pub async fn create(
        &self,
        caller: &Caller,
        new: NewWebhook,
    ) -> Result<IssuedWebhook, ServiceError> {
        caller.require_unrestricted_admin()?;
        let url = self.checked_url(&new.url).await?;
        let now = self.ports.clock.now();
        let webhook = Webhook {
            id: WebhookId::new(),
            url,
            events: new.events,
            project_id: new.project_id,
            description: new.description,
            secret: WebhookSecret::generate(&mut rand::rng()),
            enabled: new.enabled,
            disabled_reason: None,
            created_at: now,
            updated_at: now,
        };
        let audit = self.audit(caller, action::WEBHOOK_CREATED, &webhook);
        self.ports
            .endpoints
            .insert(&webhook, audit)
            .await
            .map_err(|e| match e {
                PortError::MissingReference => {
                    ServiceError::Invalid(vec![FieldError::new("/project_id", "no such project")])
                }
                other => other.into(),
            })?;
        Ok(IssuedWebhook { webhook })
    }

    pub async fn list(&self, caller: &Caller) -> Result<Vec<Webhook>, ServiceError> {
        caller.require_unrestricted_admin()?;
        Ok(self.ports.endpoints.list().await?)
    }

    pub async fn get(&self, caller: &Caller, id: WebhookId) -> Result<Webhook, ServiceError> {
        caller.require_unrestricted_admin()?;
        self.find(id).await
    }

    pub async fn update(
        &self,
        caller: &Caller,
        id: WebhookId,
        changes: WebhookChanges,
    ) -> Result<Webhook, ServiceError> {
        caller.require_unrestricted_admin()?;
        let mut webhook = self.find(id).await?;
        if let Some(raw) = &changes.url {
            webhook.url = self.checked_url(raw).await?;
        }
        if let Some(events) = changes.events {
            webhook.events = events;
        }
        if let Some(project) = changes.project_id {
            webhook.project_id = project;
        }
        if let Some(description) = changes.description {
            webhook.description = description;
        }
        if let Some(enabled) = changes.enabled {
            webhook.enabled = enabled;
            if enabled {
                webhook.disabled_reason = None;
            }
        }
        webhook.updated_at = self.ports.clock.now();
        let audit = self.audit(caller, action::WEBHOOK_UPDATED, &webhook);
        self.ports
            .endpoints
            .save(&webhook, audit)
            .await
            .map_err(|e| match e {
                PortError::MissingReference => {
                    ServiceError::Invalid(vec![FieldError::new("/project_id", "no such project")])
                }
                other => ServiceError::from_port(other, "webhook"),
            })?;
        Ok(webhook)
    }

    /// Replaces the signing secret at once; the new one is returned once.
    pub async fn rotate(
        &self,
        caller: &Caller,
        id: WebhookId,
    ) -> Result<IssuedWebhook, ServiceError> {
        caller.require_unrestricted_admin()?;
        let mut webhook = self.find(id).await?;
        webhook.secret = WebhookSecret::generate(&mut rand::rng());
        webhook.updated_at = self.ports.clock.now();
        let audit = self.audit(caller, action::WEBHOOK_ROTATED, &webhook);
        self.ports
            .endpoints
            .save(&webhook, audit)
            .await
            .map_err(|e| ServiceError::from_port(e, "webhook"))?;
        Ok(IssuedWebhook { webhook })
    }

    pub async fn delete(&self, caller: &Caller, id: WebhookId) -> Result<(), ServiceError> {
        caller.require_unrestricted_admin()?;
        let webhook = self.find(id).await?;
        let audit = self.audit(caller, action::WEBHOOK_DELETED, &webhook);
        self.ports
            .endpoints
            .delete(id, audit)
            .await
            .map_err(|e| ServiceError::from_port(e, "webhook"))
    }

    /// An endpoint's deliveries, newest first.
    pub async fn deliveries(
        &self,
        caller: &Caller,
        id: WebhookId,
        before: Option<DeliveryId>,
        limit: u32,
    ) -> Result<Page<Delivery>, ServiceError> {
        caller.require_unrestricted_admin()?;
        self.find(id).await?;
        Ok(self
            .ports
            .deliveries
            .list(&DeliveryFilter {
                webhook: id,
                before,
                limit,
            })
            .await?)
    }

    /// One delivery with every recorded attempt.
    pub async fn delivery(
        &self,
        caller: &Caller,
        id: WebhookId,
        delivery: DeliveryId,
    ) -> Result<DeliveryLog, ServiceError> {
        caller.require_unrestricted_admin()?;
        let found = self
            .ports
            .deliveries
            .get(id, delivery)
            .await
            .map_err(|e| ServiceError::from_port(e, "delivery"))?;
        let attempts = self.ports.deliveries.attempts(delivery).await?;
        Ok(DeliveryLog {
            delivery: found,
            attempts,
        })
    }

    /// Sends a delivery again (same `webhook-id`), whatever became of it.
    pub async fn redeliver(
        &self,
        caller: &Caller,
        id: WebhookId,
        delivery: DeliveryId,
    ) -> Result<Delivery, ServiceError> {
        caller.require_unrestricted_admin()?;
        self.ports
            .deliveries
            .redeliver(id, delivery)
            .await
            .map_err(|e| ServiceError::from_port(e, "delivery"))
    }

    /// Queues a `ping` event to the endpoint, due at once.
    pub async fn ping(&self, caller: &Caller, id: WebhookId) -> Result<Delivery, ServiceError> {
        caller.require_unrestricted_admin()?;
        self.find(id).await?;
        let now = self.ports.clock.now();
        let delivery = Delivery {
            id: DeliveryId::new(),
            webhook_id: id,
            event_type: EventType::Ping.as_str().to_owned(),
            payload: ping_payload(id, now),
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_attempt_at: Some(now),
            last_status_code: None,
            last_latency_ms: None,
            last_error: None,
            created_at: now,
            delivered_at: None,
        };
        self.ports.deliveries.enqueue(&delivery).await?;
        Ok(delivery)
    }

    async fn find(&self, id: WebhookId) -> Result<Webhook, ServiceError> {
        self.ports
            .endpoints
            .get(id)
            .await
            .map_err(|e| ServiceError::from_port(e, "webhook"))
    }

    /// The audit event of a change: what the endpoint is, never its secret.
    fn audit(&self, caller: &Caller, action: &'static str, webhook: &Webhook) -> NewAuditEvent {
        NewAuditEvent::new(
            &caller.context,
            self.ports.clock.now(),
            action,
            ("webhook", webhook.id.to_string()),
            json!({
                "url": webhook.url.as_str(),
                "events": webhook.events.names(),
                "project_id": webhook.project_id.map(|p| p.as_uuid()),
                "enabled": webhook.enabled,
            }),
        )
    }
}
