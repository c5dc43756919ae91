//! Property tests of the parsers we own: whatever a client sends, they answer `Ok` or a rule,
//! never a panic, and what they accept keeps the invariants the rest of the code relies on.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;
use rdev_api::domain::Validation;
use rdev_api::domain::api_key::{AllowedIps, PresentedKey, Scopes, loggable_prefix};
use rdev_api::domain::command::{CommandLine, ResumePoint};
use rdev_api::domain::project::{EnvVars, LabelSelector, ProjectName, Workdir};

/// Text that is mostly near the grammar: separators, dots, NULs, non-ASCII.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9_./=,:-]{0,40}",
        "rdev_[A-Za-z0-9_]{0,50}",
        "/[a-z./\u{0}]{0,30}",
        "[0-9a-f:./-]{0,45}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        // `RDEV_SUITE=long` is the slow variant (docs/operations/guarantees.md).
        cases: if std::env::var("RDEV_SUITE").is_ok_and(|v| v == "long") { 20_000 } else { 2_000 },
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn presented_keys_parse_without_panic_and_keep_their_prefix(raw in hostile_text()) {
        if let Ok(key) = PresentedKey::parse(&raw) {
            prop_assert_eq!(key.expose(), raw.as_str());
            prop_assert_eq!(key.prefix().len(), 8);
            prop_assert_eq!(loggable_prefix(&raw), key.prefix());
        }
        // Logging a presented value never reveals more than a short alphanumeric prefix.
        let logged = loggable_prefix(&raw);
        prop_assert!(logged == "?" || (logged.len() <= 16 && logged.bytes().all(|b| b.is_ascii_alphanumeric())));
        prop_assert!(!logged.is_empty() || raw.starts_with("rdev__"));
    }

    #[test]
    fn generated_keys_always_parse(seed in any::<u64>()) {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let key = PresentedKey::generate(&mut rng);
        prop_assert!(PresentedKey::parse(key.expose()).is_ok());
    }

    #[test]
    fn allowlists_parse_without_panic_and_admit_what_they_list(
        entries in proptest::collection::vec(hostile_text(), 0..5),
        address in any::<IpAddr>(),
    ) {
        let _ = AllowedIps::parse(&entries);
        let single = AllowedIps::parse(&[address.to_string()]).expect("an address is a valid entry");
        prop_assert!(single.permits(address), "{} does not admit itself", address);
        let canonical = address.to_canonical();
        prop_assert!(single.permits(canonical), "{} does not admit {}", address, canonical);
    }

    #[test]
    fn resume_points_are_non_negative_integers(raw in hostile_text(), n in 0..i64::MAX) {
        if let Ok(point) = ResumePoint::parse(&raw) {
            prop_assert!(point.after_seq() >= 0);
        }
        prop_assert_eq!(ResumePoint::parse(&n.to_string()).unwrap().after_seq(), n);
        let negative = format!("-{}", n.max(1));
        prop_assert!(ResumePoint::parse(&negative).is_err());
    }

    #[test]
    fn accepted_workdirs_are_absolute_and_normalised(raw in hostile_text()) {
        if let Ok(workdir) = Workdir::parse(raw.clone()) {
            let path = workdir.as_str();
            prop_assert!(path.starts_with('/'));
            prop_assert!(!path.contains('\0'));
            prop_assert!(path == "/" || !path.ends_with('/'));
            prop_assert!(path.split('/').skip(1).all(|s| path == "/" || !matches!(s, "" | "." | "..")));
        }
    }

    #[test]
    fn accepted_commands_and_names_hold_their_rules(raw in hostile_text()) {
        if let Ok(command) = CommandLine::parse(raw.clone()) {
            prop_assert!(!command.as_str().contains('\0') && !command.as_str().trim().is_empty());
        }
        if let Ok(name) = ProjectName::parse(raw.clone()) {
            let name = name.as_str();
            prop_assert!(name.len() <= 63 && name.starts_with(|c: char| c.is_ascii_lowercase()));
            prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
        let _ = LabelSelector::parse(raw.clone());
        let _ = Scopes::parse(&[raw]);
    }

    #[test]
    fn env_vars_report_every_bad_entry_and_keep_no_nul(
        raw in proptest::collection::btree_map(hostile_text(), hostile_text(), 0..8),
    ) {
        let mut v = Validation::new();
        let parsed = EnvVars::parse(raw.clone(), "/env", &mut v);
        match parsed {
            Some(env) => {
                prop_assert!(v.finish().is_ok());
                for (name, value) in env.iter() {
                    prop_assert!(!value.contains('\0'));
                    prop_assert!(name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'));
                }
                let stored = EnvVars::from_trusted_json(&env.to_json()).unwrap();
                prop_assert_eq!(stored, env);
            }
            None => prop_assert!(v.finish().is_err()),
        }
        let _: BTreeMap<String, String> = raw;
    }
}
