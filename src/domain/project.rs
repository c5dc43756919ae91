//! Projects: where commands run (a pod's container or a local directory) and with what limits.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::DomainError;
use super::audit::ChangedFields;
use super::ids::ProjectId;
use super::validation::{Checked, Rule, Validation};

pub const MAX_CONCURRENCY: u32 = 64;
pub const MAX_TIMEOUT_SECS: u32 = 24 * 60 * 60;
pub const MAX_ENV_VARS: usize = 128;
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

macro_rules! string_value {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_value!(
    /// A project name: a DNS-1123 label starting with a letter, so it can name Kubernetes objects.
    ProjectName
);

impl ProjectName {
    pub fn parse(raw: String) -> Result<Self, Rule> {
        if is_dns_label(&raw) && raw.starts_with(|c: char| c.is_ascii_lowercase()) {
            Ok(Self(raw))
        } else {
            Err(Rule::new(
                "must be 1-63 lowercase letters, digits or '-', start with a letter and end with a letter or digit",
            ))
        }
    }
}

string_value!(
    /// A Kubernetes namespace or container name: a DNS-1123 label.
    KubeLabelName
);

impl KubeLabelName {
    pub fn parse(raw: String) -> Result<Self, Rule> {
        if is_dns_label(&raw) {
            Ok(Self(raw))
        } else {
            Err(Rule::new(
                "must be a DNS-1123 label: 1-63 lowercase letters, digits or '-', alphanumeric at both ends",
            ))
        }
    }
}

string_value!(
    /// A pod name: a DNS-1123 subdomain (dot-separated labels, at most 253 characters).
    PodName
);

impl PodName {
    pub fn parse(raw: String) -> Result<Self, Rule> {
        if raw.len() <= 253 && raw.split('.').all(is_dns_label) {
            Ok(Self(raw))
        } else {
            Err(Rule::new(
                "must be a DNS-1123 subdomain: dot-separated labels of lowercase letters, digits or '-'",
            ))
        }
    }
}

string_value!(
    /// An equality-based label selector such as `app=web,tier=backend`.
    LabelSelector
);

impl LabelSelector {
    pub fn parse(raw: String) -> Result<Self, Rule> {
        let valid_part = |part: &str| {
            part.split_once('=').is_some_and(|(k, v)| {
                let key_ok = !k.is_empty()
                    && k.len() <= 253
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
                let value_ok = v.len() <= 63
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                key_ok && value_ok
            })
        };
        if !raw.is_empty() && raw.len() <= 1024 && raw.split(',').all(valid_part) {
            Ok(Self(raw))
        } else {
            Err(Rule::new(
                "must be a label selector like `app=web,tier=backend`",
            ))
        }
    }
}

string_value!(
    /// An absolute, normalised directory path: starts with '/', no '.', '..' or empty segments.
    Workdir
);

impl Workdir {
    pub fn parse(raw: String) -> Result<Self, Rule> {
        if !raw.starts_with('/') {
            return Err(Rule::new("must be an absolute path"));
        }
        if raw.len() > 4096 || raw.contains('\0') {
            return Err(Rule::new("must be at most 4096 bytes without NUL"));
        }
        if raw != "/" {
            let segments = raw[1..].split('/');
            for segment in segments {
                match segment {
                    "" => {
                        return Err(Rule::new(
                            "must not contain empty segments or a trailing '/'",
                        ));
                    }
                    "." | ".." => return Err(Rule::new("must not contain '.' or '..' segments")),
                    _ => {}
                }
            }
        }
        Ok(Self(raw))
    }
}

string_value!(
    /// An environment variable name: a letter or '_', then letters, digits or '_'.
    EnvVarName
);

impl EnvVarName {
    pub fn parse(raw: String) -> Result<Self, Rule> {
        let ok = (1..=256).contains(&raw.len())
            && raw.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ok {
            Ok(Self(raw))
        } else {
            Err(Rule::new(format!(
                "`{raw}` is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
            )))
        }
    }
}

/// Environment variables, validated as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvVars(BTreeMap<EnvVarName, String>);

impl EnvVars {
    /// Checks every entry, reporting each bad one under `pointer/<name>`.
    pub fn parse(
        raw: BTreeMap<String, String>,
        pointer: &str,
        v: &mut Validation,
    ) -> Checked<Self> {
        if raw.len() > MAX_ENV_VARS {
            return v.refuse(pointer, format!("at most {MAX_ENV_VARS} variables"));
        }
        let mut vars = Checked::given(BTreeMap::new());
        for (name, value) in raw {
            let here = format!("{pointer}/{}", escape_pointer(&name));
            let value = if value.len() > MAX_ENV_VALUE_BYTES || value.contains('\0') {
                v.refuse(
                    &here,
                    format!("values are at most {MAX_ENV_VALUE_BYTES} bytes, without NUL"),
                )
            } else {
                Checked::given(value)
            };
            let entry = v.check(&here, EnvVarName::parse(name)).and(value);
            vars = vars.and(entry).map(|(mut vars, (name, value))| {
                vars.insert(name, value);
                vars
            });
        }
        vars.map(Self)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What an update did, by name only (values can be credentials): `set` names are new or
    /// have a new value, `removed` names are gone. `None` when nothing changed.
    pub fn changed_names(&self, after: &EnvVars) -> Option<serde_json::Value> {
        let set: Vec<&str> = after
            .0
            .iter()
            .filter(|(name, value)| self.0.get(*name) != Some(*value))
            .map(|(name, _)| name.as_str())
            .collect();
        let removed: Vec<&str> = self
            .0
            .keys()
            .filter(|name| !after.0.contains_key(*name))
            .map(EnvVarName::as_str)
            .collect();
        (!set.is_empty() || !removed.is_empty())
            .then(|| serde_json::json!({"set": set, "removed": removed}))
    }

    /// The stored form, a JSON object.
    pub fn to_json(&self) -> String {
        let map: BTreeMap<&str, &str> = self.iter().collect();
        serde_json::to_string(&map).expect("a string map always serializes")
    }

    /// Reads the stored form back; it was validated when written.
    pub fn from_trusted_json(json: &str) -> Result<Self, serde_json::Error> {
        let raw: BTreeMap<String, String> = serde_json::from_str(json)?;
        Ok(Self(
            raw.into_iter().map(|(k, v)| (EnvVarName(k), v)).collect(),
        ))
    }
}

/// RFC 6901 escaping of one pointer segment.
pub fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Which executor runs a project's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    Kube,
    Local,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Kube => "kube",
            ExecutorKind::Local => "local",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, Rule> {
        match raw {
            "kube" => Ok(Self::Kube),
            "local" => Ok(Self::Local),
            other => Err(Rule::new(format!(
                "unknown executor `{other}`: expected kube or local"
            ))),
        }
    }
}

/// The executors a server runs commands with (`RDEV_EXECUTORS`): a server setting, so that a
/// project can only ask for what the operator enabled. Never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnabledExecutors {
    kube: bool,
    local: bool,
}

impl EnabledExecutors {
    /// One executor alone.
    pub fn only(kind: ExecutorKind) -> Self {
        Self {
            kube: kind == ExecutorKind::Kube,
            local: kind == ExecutorKind::Local,
        }
    }

    /// A comma-separated list: `kube`, `local`, `kube,local`.
    pub fn parse(raw: &str) -> Result<Self, Rule> {
        let mut enabled = Self {
            kube: false,
            local: false,
        };
        for name in raw.split(',').map(str::trim) {
            match ExecutorKind::parse(name)? {
                ExecutorKind::Kube => enabled.kube = true,
                ExecutorKind::Local => enabled.local = true,
            }
        }
        Ok(enabled)
    }

    pub fn allows(self, kind: ExecutorKind) -> bool {
        match kind {
            ExecutorKind::Kube => self.kube,
            ExecutorKind::Local => self.local,
        }
    }

    /// The executor of projects that name none, when the operator chose none: the pod executor
    /// when it is enabled, since that is what the server is for.
    pub fn preferred(self) -> ExecutorKind {
        if self.kube {
            ExecutorKind::Kube
        } else {
            ExecutorKind::Local
        }
    }
}

impl fmt::Display for EnabledExecutors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kube, self.local) {
            (true, true) => f.write_str("kube,local"),
            (true, false) => f.write_str("kube"),
            _ => f.write_str("local"),
        }
    }
}

/// How the pod of a project is found: by name, or by label selector (first ready pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRef {
    Name(PodName),
    Selector(LabelSelector),
}

/// The container commands run in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeTarget {
    pub namespace: KubeLabelName,
    pub pod: PodRef,
    pub container: Option<KubeLabelName>,
}

impl KubeTarget {
    /// The audit form.
    pub fn to_json(&self) -> serde_json::Value {
        let (kind, pod) = match &self.pod {
            PodRef::Name(name) => ("pod", name.as_str()),
            PodRef::Selector(selector) => ("selector", selector.as_str()),
        };
        serde_json::json!({
            "namespace": self.namespace.as_str(),
            kind: pod,
            "container": self.container.as_ref().map(KubeLabelName::as_str),
        })
    }
}

/// Bounded integer settings.
pub fn parse_bounded(raw: i64, min: u32, max: u32) -> Result<u32, Rule> {
    u32::try_from(raw)
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| Rule::new(format!("must be between {min} and {max}")))
}

/// A free-text description of at most 1000 characters.
pub fn parse_description(raw: String) -> Result<String, Rule> {
    if raw.chars().count() > 1000 || raw.contains('\0') {
        Err(Rule::new("must be at most 1000 characters, without NUL"))
    } else {
        Ok(raw)
    }
}

/// A registered project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub id: ProjectId,
    pub name: ProjectName,
    pub description: String,
    pub target: Option<KubeTarget>,
    pub workdir: Workdir,
    pub env: EnvVars,
    pub max_concurrency: u32,
    pub default_timeout_secs: u32,
    pub executor: ExecutorKind,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

impl Project {
    /// Every field an update changed, with its new value; the environment by name only.
    pub fn changes_since(&self, before: &Project) -> ChangedFields {
        let mut changed = ChangedFields::default();
        changed.field("name", &before.name, &self.name, |v| v.as_str().into());
        changed.field("description", &before.description, &self.description, |v| {
            v.as_str().into()
        });
        changed.field("target", &before.target, &self.target, |v| {
            v.as_ref()
                .map_or(serde_json::Value::Null, KubeTarget::to_json)
        });
        changed.field("workdir", &before.workdir, &self.workdir, |v| {
            v.as_str().into()
        });
        if let Some(env) = before.env.changed_names(&self.env) {
            changed.insert("env", env);
        }
        changed.field(
            "max_concurrency",
            &before.max_concurrency,
            &self.max_concurrency,
            |v| (*v).into(),
        );
        changed.field(
            "default_timeout_secs",
            &before.default_timeout_secs,
            &self.default_timeout_secs,
            |v| (*v).into(),
        );
        changed.field("executor", &before.executor, &self.executor, |v| {
            v.as_str().into()
        });
        changed
    }

    /// Cross-field rules: a kube project needs a target.
    pub fn check_consistency(&self) -> Result<(), DomainError> {
        let mut v = Validation::new();
        if self.executor == ExecutorKind::Kube && self.target.is_none() {
            v.fail("/target", "a project with executor `kube` needs a target");
        }
        v.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_are_dns_labels_starting_with_a_letter() {
        for ok in ["a", "web", "my-app-2", &"a".repeat(63)] {
            assert!(ProjectName::parse(ok.to_string()).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "-a", "a-", "1abc", "a_b", "a.b", &"a".repeat(64)] {
            assert!(ProjectName::parse(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn workdirs_must_be_absolute_and_normalised() {
        for ok in ["/", "/srv", "/srv/app", "/a/b.c/.hidden"] {
            assert!(Workdir::parse(ok.into()).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "srv",
            "/srv/",
            "/srv//app",
            "/srv/../etc",
            "/./srv",
            "/a/..",
            "/a\0",
        ] {
            assert!(Workdir::parse(bad.into()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_names_are_checked_and_reported_per_entry() {
        let mut v = Validation::new();
        let raw = BTreeMap::from([
            ("GOOD_1".to_string(), "x".to_string()),
            ("1BAD".to_string(), "x".to_string()),
            ("a/b".to_string(), "x".to_string()),
        ]);
        let parsed = EnvVars::parse(raw, "/env", &mut v);
        let Err(DomainError::Invalid(errors)) = v.finish_with(|valid| valid.open(parsed)) else {
            panic!()
        };
        let pointers: Vec<_> = errors.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(pointers, ["/env/1BAD", "/env/a~1b"]);
    }

    #[test]
    fn pod_names_are_subdomains_and_selectors_are_equalities() {
        assert!(PodName::parse("web-0.api".into()).is_ok());
        assert!(PodName::parse("Web".into()).is_err());
        assert!(LabelSelector::parse("app=web,tier=backend".into()).is_ok());
        assert!(LabelSelector::parse("app.kubernetes.io/name=web".into()).is_ok());
        assert!(LabelSelector::parse("app".into()).is_err());
        assert!(LabelSelector::parse("".into()).is_err());
    }

    #[test]
    fn enabled_executors_parse_as_a_list_and_prefer_kube() {
        let both = EnabledExecutors::parse("kube, local").unwrap();
        assert!(both.allows(ExecutorKind::Kube) && both.allows(ExecutorKind::Local));
        assert_eq!(both.to_string(), "kube,local");
        assert_eq!(both.preferred(), ExecutorKind::Kube);
        let local = EnabledExecutors::parse("local").unwrap();
        assert!(!local.allows(ExecutorKind::Kube));
        assert_eq!(local.preferred(), ExecutorKind::Local);
        assert_eq!(local, EnabledExecutors::only(ExecutorKind::Local));
        for bad in ["", "docker", "kube,", "kube,ssh"] {
            assert!(EnabledExecutors::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bounded_numbers_reject_out_of_range() {
        assert_eq!(parse_bounded(4, 1, 64), Ok(4));
        assert!(parse_bounded(0, 1, 64).is_err());
        assert!(parse_bounded(-1, 1, 64).is_err());
        assert!(parse_bounded(65, 1, 64).is_err());
    }
}
