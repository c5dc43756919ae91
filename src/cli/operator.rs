//! Operator subcommands that work on the database directly, without a server: `migrate` and
//! `keys create|list|revoke` (through the same key service the API uses, audited alike).

use std::process::ExitCode;

use time::OffsetDateTime;

use super::KeysAction;
use super::remote::print_table;
use crate::app;
use crate::config::DatabaseConfig;
use crate::domain::api_key::{AllowedIps, ApiKey, KeyName, Scopes};
use crate::domain::ids::{ApiKeyId, ProjectId};
use crate::domain::rate_limit::RateLimit;
use crate::services::Caller;
use crate::services::api_keys::NewKey;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
enum OperatorError {
    #[error(transparent)]
    Startup(#[from] app::StartupError),
    #[error(transparent)]
    Service(#[from] crate::services::ServiceError),
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

pub async fn migrate(database: &DatabaseConfig) -> ExitCode {
    match app::migrate(&database.database_url).await {
        Ok(()) => {
            eprintln!("rdev-api: migrations applied");
            ExitCode::SUCCESS
        }
        Err(error) => super::fail(&error),
    }
}

pub async fn keys(database: &DatabaseConfig, action: KeysAction) -> ExitCode {
    let admin = match app::key_admin(&database.database_url).await {
        Ok(admin) => admin,
        Err(error) => return super::fail(&error),
    };
    let result = run_keys(&admin, action).await;
    admin.close().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => super::fail(&error),
    }
}

async fn run_keys(admin: &app::KeyAdmin, action: KeysAction) -> Result<(), OperatorError> {
    let operator = Caller::operator();
    match action {
        KeysAction::Create {
            name,
            scopes,
            project_ids,
            allowed_ips,
            rate_limit,
            expires_in,
        } => {
            let invalid = |field| {
                move |rule: crate::domain::validation::Rule| OperatorError::Invalid {
                    field,
                    message: rule.0,
                }
            };
            let new = NewKey {
                name: KeyName::parse(name).map_err(invalid("--name"))?,
                scopes: Scopes::parse(&scopes).map_err(invalid("--scopes"))?,
                allowed_ips: AllowedIps::parse(&allowed_ips).map_err(invalid("--allowed-ip"))?,
                project_ids: project_ids.into_iter().map(ProjectId::from_uuid).collect(),
                rate_limit: rate_limit
                    .as_deref()
                    .map(RateLimit::parse)
                    .transpose()
                    .map_err(invalid("--rate-limit"))?,
                expires_at: expires_in.map(|d| OffsetDateTime::now_utc() + d),
            };
            let issued = admin.keys.create(&operator, new).await?;
            eprintln!(
                "rdev-api: created key {} ({}); its secret is shown only this once:",
                issued.key.id,
                issued.key.name.as_str()
            );
            println!("{}", issued.secret.expose());
        }
        KeysAction::List => {
            let keys = admin.keys.list(&operator).await?;
            print_table(
                &[
                    "ID",
                    "NAME",
                    "PREFIX",
                    "SCOPES",
                    "PROJECTS",
                    "EXPIRES",
                    "REVOKED",
                    "LAST USED",
                ],
                keys.iter().map(key_row),
            );
        }
        KeysAction::Revoke { id } => {
            let key = admin
                .keys
                .revoke(&operator, ApiKeyId::from_uuid(id))
                .await?;
            println!("{} revoked", key.id);
        }
    }
    Ok(())
}

fn key_row(key: &ApiKey) -> Vec<String> {
    let time = |at: Option<OffsetDateTime>| {
        at.and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
    };
    vec![
        key.id.to_string(),
        key.name.as_str().to_owned(),
        key.prefix.clone(),
        key.scopes.to_csv(),
        if key.project_ids.is_empty() {
            "all".into()
        } else {
            key.project_ids.len().to_string()
        },
        time(key.expires_at),
        time(key.revoked_at),
        time(key.last_used_at),
    ]
}
