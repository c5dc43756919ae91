//! API keys: their presented form, their stored form, scopes, IP allowlists and usability rules.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::audit::ChangedFields;
use super::ids::{ApiKeyId, ProjectId};
use super::rate_limit::RateLimit;
use super::validation::Rule;

/// Characters of the lookup prefix of a key.
pub const PREFIX_LEN: usize = 8;
/// Characters of the secret part of a generated key (about 190 bits).
pub const SECRET_LEN: usize = 32;
const KEY_TAG: &str = "rdev_";

/// What a key may do. `admin` implies `execute`, which implies `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Execute,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Execute => "execute",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = Rule;
    fn from_str(s: &str) -> Result<Self, Rule> {
        match s {
            "read" => Ok(Scope::Read),
            "execute" => Ok(Scope::Execute),
            "admin" => Ok(Scope::Admin),
            other => Err(Rule::new(format!(
                "unknown scope `{other}`: expected read, execute or admin"
            ))),
        }
    }
}

/// A non-empty set of scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scopes(BTreeSet<Scope>);

impl Scopes {
    pub fn parse<S: AsRef<str>>(raw: &[S]) -> Result<Self, Rule> {
        let set = raw
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<BTreeSet<Scope>, Rule>>()?;
        if set.is_empty() {
            return Err(Rule::new("at least one scope is required"));
        }
        Ok(Self(set))
    }

    pub fn admin() -> Self {
        Self(BTreeSet::from([Scope::Admin]))
    }

    /// True when the set grants `wanted`, directly or through a broader scope.
    pub fn allows(&self, wanted: Scope) -> bool {
        self.0.iter().any(|held| *held >= wanted)
    }

    pub fn iter(&self) -> impl Iterator<Item = Scope> + '_ {
        self.0.iter().copied()
    }

    /// The stored form: scope names joined by commas.
    pub fn to_csv(&self) -> String {
        self.iter().map(Scope::as_str).collect::<Vec<_>>().join(",")
    }

    pub fn from_csv(csv: &str) -> Result<Self, Rule> {
        Self::parse(&csv.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>())
    }
}

/// A human label for a key: 1 to 100 printable characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName(String);

impl KeyName {
    pub fn parse(raw: String) -> Result<Self, Rule> {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.chars().count() > 100 {
            return Err(Rule::new("must be 1 to 100 characters"));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(Rule::new("must not contain control characters"));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The client addresses a key may be used from; empty means any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedIps(Vec<IpNet>);

impl AllowedIps {
    /// Accepts CIDRs (`10.0.0.0/8`) and bare addresses (a single host).
    pub fn parse<S: AsRef<str>>(raw: &[S]) -> Result<Self, Rule> {
        if raw.len() > 100 {
            return Err(Rule::new("at most 100 entries"));
        }
        let mut nets = Vec::with_capacity(raw.len());
        for entry in raw {
            let entry = entry.as_ref().trim();
            let net = entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| Rule::new(format!("`{entry}` is not an IP address or CIDR")))?;
            nets.push(canonical_net(net).trunc());
        }
        nets.sort();
        nets.dedup();
        Ok(Self(nets))
    }

    /// Whether `client` may use the key. Clients are compared in canonical form (an
    /// IPv4-mapped IPv6 peer as IPv4), as are the entries.
    pub fn permits(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.0.is_empty() || self.0.iter().any(|net| net.contains(&client))
    }

    pub fn as_slice(&self) -> &[IpNet] {
        &self.0
    }
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it stands for, so
/// that it matches the canonical clients it is compared with.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

/// The hex SHA-256 of a whole presented key; the only form in which a secret is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretHash(String);

impl SecretHash {
    pub fn of(presented: &str) -> Self {
        Self(hex::encode(Sha256::digest(presented.as_bytes())))
    }

    pub fn from_stored(hex: String) -> Self {
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison, so response timing says nothing about how much of a guess matched.
    pub fn matches(&self, presented: &str) -> bool {
        let candidate = Self::of(presented);
        bool::from(self.0.as_bytes().ct_eq(candidate.0.as_bytes()))
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

/// A key as the client presents it: `rdev_<prefix>_<secret>`. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct PresentedKey {
    full: String,
    prefix_end: usize,
}

/// The public part of a presented key (`rdev_<prefix>_<secret>`), for logs and audit rows;
/// anything not shaped like a key shows as `?`, so a secret pasted into the wrong place is not
/// recorded.
pub fn loggable_prefix(presented: &str) -> &str {
    let mut parts = presented.splitn(3, '_');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("rdev"), Some(prefix), Some(_))
            if prefix.len() <= 16 && prefix.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            prefix
        }
        _ => "?",
    }
}

impl PresentedKey {
    pub fn parse(raw: &str) -> Result<Self, Rule> {
        let rest = raw
            .strip_prefix(KEY_TAG)
            .ok_or_else(|| Rule::new("API keys start with `rdev_`"))?;
        let (prefix, secret) = rest
            .split_once('_')
            .ok_or_else(|| Rule::new("API keys look like rdev_<prefix>_<secret>"))?;
        let alnum = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric());
        if prefix.len() != PREFIX_LEN || !alnum(prefix) {
            return Err(Rule::new("the key prefix must be 8 letters or digits"));
        }
        if secret.len() < SECRET_LEN || secret.len() > 128 || !alnum(secret) {
            return Err(Rule::new(
                "the key secret must be 32 to 128 letters or digits",
            ));
        }
        Ok(Self {
            full: raw.to_owned(),
            prefix_end: KEY_TAG.len() + PREFIX_LEN,
        })
    }

    /// A fresh key from a CSPRNG.
    pub fn generate(rng: &mut impl rand::CryptoRng) -> Self {
        let prefix = Alphanumeric.sample_string(rng, PREFIX_LEN);
        let secret = Alphanumeric.sample_string(rng, SECRET_LEN);
        Self::parse(&format!("{KEY_TAG}{prefix}_{secret}")).expect("generated keys are well formed")
    }

    pub fn prefix(&self) -> &str {
        &self.full[KEY_TAG.len()..self.prefix_end]
    }

    pub fn expose(&self) -> &str {
        &self.full
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.full)
    }
}

impl fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresentedKey(rdev_{}_..)", self.prefix())
    }
}

/// A stored API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub name: KeyName,
    pub prefix: String,
    pub secret_hash: SecretHash,
    pub scopes: Scopes,
    pub allowed_ips: AllowedIps,
    /// Projects this key may see and use; empty means all.
    pub project_ids: Vec<ProjectId>,
    /// This key's own request rate limit; `None` follows the server's `RDEV_RATE_LIMIT`.
    pub rate_limit: Option<RateLimit>,
    pub created_at: OffsetDateTime,
    pub created_by: Option<ApiKeyId>,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    pub last_used_at: Option<OffsetDateTime>,
}

impl ApiKey {
    /// Every field an update changed, with its new value.
    pub fn changes_since(&self, before: &ApiKey) -> ChangedFields {
        let mut changed = ChangedFields::default();
        changed.field("name", &before.name, &self.name, |v| v.as_str().into());
        changed.field("scopes", &before.scopes, &self.scopes, |v| {
            v.to_csv().into()
        });
        changed.field("allowed_ips", &before.allowed_ips, &self.allowed_ips, |v| {
            v.as_slice().iter().map(ToString::to_string).collect()
        });
        changed.field("project_ids", &before.project_ids, &self.project_ids, |v| {
            v.iter().map(ToString::to_string).collect()
        });
        changed.field("expires_at", &before.expires_at, &self.expires_at, |v| {
            v.and_then(|at| at.format(&Rfc3339).ok()).into()
        });
        changed
    }
}

/// Why a presented key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyRejection {
    #[error("missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")]
    Missing,
    #[error("invalid API key")]
    Invalid,
    #[error("API key has expired")]
    Expired,
    #[error("API key has been revoked")]
    Revoked,
    #[error("API key is not allowed from this client address")]
    AddressNotAllowed,
}

impl KeyRejection {
    /// A short, fixed name (a metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRejection::Missing => "missing",
            KeyRejection::Invalid => "invalid",
            KeyRejection::Expired => "expired",
            KeyRejection::Revoked => "revoked",
            KeyRejection::AddressNotAllowed => "address_not_allowed",
        }
    }
}

impl ApiKey {
    /// Checks a presented key against this stored one, at `now`, from `client`.
    pub fn admit(
        &self,
        presented: &PresentedKey,
        client: IpAddr,
        now: OffsetDateTime,
    ) -> Result<(), KeyRejection> {
        if !self.secret_hash.matches(presented.expose()) {
            return Err(KeyRejection::Invalid);
        }
        self.usable(client, now)
    }

    /// Whether the key may act now from `client`, its secret aside (already proven otherwise, e.g.
    /// by a stream token issued to it).
    pub fn usable(&self, client: IpAddr, now: OffsetDateTime) -> Result<(), KeyRejection> {
        if self.revoked_at.is_some() {
            return Err(KeyRejection::Revoked);
        }
        if self.expires_at.is_some_and(|at| at <= now) {
            return Err(KeyRejection::Expired);
        }
        if !self.allowed_ips.permits(client) {
            return Err(KeyRejection::AddressNotAllowed);
        }
        Ok(())
    }

    pub fn can_access(&self, project: ProjectId) -> bool {
        self.project_ids.is_empty() || self.project_ids.contains(&project)
    }

    /// Replaces the secret; the old one stops working at once.
    pub fn rotate(&mut self, new_key: &PresentedKey) {
        self.prefix = new_key.prefix().to_owned();
        self.secret_hash = new_key.hash();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_public_prefix_of_a_presented_key_is_logged() {
        assert_eq!(
            loggable_prefix("rdev_abc12345_secretsecretsecret"),
            "abc12345"
        );
        assert_eq!(loggable_prefix("a pasted password"), "?");
        assert_eq!(loggable_prefix("rdev_has space_x"), "?");
        assert_eq!(loggable_prefix("rdev_nosecret"), "?");
    }
    use time::Duration;

    fn key_with(allowed: &[&str]) -> (ApiKey, PresentedKey) {
        let presented = PresentedKey::generate(&mut rand::rng());
        let key = ApiKey {
            id: ApiKeyId::new(),
            name: KeyName::parse("ci".into()).unwrap(),
            prefix: presented.prefix().to_owned(),
            secret_hash: presented.hash(),
            scopes: Scopes::parse(&["read"]).unwrap(),
            allowed_ips: AllowedIps::parse(allowed).unwrap(),
            project_ids: vec![],
            rate_limit: None,
            created_at: OffsetDateTime::now_utc(),
            created_by: None,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        };
        (key, presented)
    }

    #[test]
    fn generated_keys_parse_back_with_their_prefix() {
        let key = PresentedKey::generate(&mut rand::rng());
        let again = PresentedKey::parse(key.expose()).unwrap();
        assert_eq!(again.prefix(), key.prefix());
        assert_eq!(key.expose().len(), 5 + PREFIX_LEN + 1 + SECRET_LEN);
        assert!(!format!("{key:?}").contains(&key.expose()[14..]));
    }

    #[test]
    fn malformed_keys_are_refused() {
        for raw in [
            "",
            "rdev_",
            "rdev_abc_def",
            "xdev_abcdefgh_0123456789abcdef0123456789abcdef",
            "rdev_abcdefg!_0123456789abcdef0123456789abcdef",
            "rdev_abcdefgh_short",
            "rdev_abcdefgh_0123456789abcdef0123456789abcde-",
        ] {
            assert!(PresentedKey::parse(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn admin_implies_execute_implies_read() {
        let admin = Scopes::admin();
        assert!(admin.allows(Scope::Read) && admin.allows(Scope::Execute));
        let read = Scopes::parse(&["read"]).unwrap();
        assert!(!read.allows(Scope::Execute));
        assert_eq!(Scopes::from_csv(&admin.to_csv()).unwrap(), admin);
        assert!(Scopes::parse::<&str>(&[]).is_err());
    }

    #[test]
    fn allowlist_accepts_cidrs_and_bare_addresses() {
        let list = AllowedIps::parse(&["10.0.0.0/8", "192.168.1.7", "::1"]).unwrap();
        assert!(list.permits("10.1.2.3".parse().unwrap()));
        assert!(list.permits("192.168.1.7".parse().unwrap()));
        assert!(!list.permits("192.168.1.8".parse().unwrap()));
        assert!(list.permits("::1".parse().unwrap()));
        assert!(AllowedIps::default().permits("8.8.8.8".parse().unwrap()));
        assert!(AllowedIps::parse(&["10.0.0.0/33"]).is_err());
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_rules() {
        let list = AllowedIps::parse(&["127.0.0.0/8"]).unwrap();
        assert!(list.permits("::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn admit_checks_secret_revocation_expiry_and_address() {
        let now = OffsetDateTime::now_utc();
        let local = "127.0.0.1".parse().unwrap();
        let (mut key, presented) = key_with(&["127.0.0.1"]);
        assert_eq!(key.admit(&presented, local, now), Ok(()));
        assert_eq!(
            key.admit(&presented, "10.0.0.1".parse().unwrap(), now),
            Err(KeyRejection::AddressNotAllowed)
        );
        let other = PresentedKey::generate(&mut rand::rng());
        assert_eq!(key.admit(&other, local, now), Err(KeyRejection::Invalid));
        key.expires_at = Some(now - Duration::seconds(1));
        assert_eq!(
            key.admit(&presented, local, now),
            Err(KeyRejection::Expired)
        );
        key.revoked_at = Some(now);
        assert_eq!(
            key.admit(&presented, local, now),
            Err(KeyRejection::Revoked)
        );
    }

    #[test]
    fn rotation_invalidates_the_old_secret() {
        let (mut key, old) = key_with(&[]);
        let new = PresentedKey::generate(&mut rand::rng());
        key.rotate(&new);
        let now = OffsetDateTime::now_utc();
        let ip = "127.0.0.1".parse().unwrap();
        assert_eq!(key.admit(&old, ip, now), Err(KeyRejection::Invalid));
        assert_eq!(key.admit(&new, ip, now), Ok(()));
    }
}
