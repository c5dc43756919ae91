//! Property tests of the parsers we own: whatever a client sends, they answer `Ok` or a rule,
//! never a panic, and what they accept keeps the invariants the rest of the code relies on.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use rdev_api::domain::Validation;
use rdev_api::domain::api_key::{AllowedIps, PresentedKey, Scopes, loggable_prefix};
use rdev_api::domain::command::{CommandLine, ResumePoint};
use rdev_api::domain::project::{EnvVars, LabelSelector, ProjectName, Workdir};
use rdev_api::domain::webhook::{WebhookUrl, forbidden_range};

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

/// IPv4 addresses, often in the ranges webhooks may not reach.
fn ipv4_near_private_ranges() -> impl Strategy<Value = Ipv4Addr> {
    let prefix = prop_oneof![
        Just(vec![10]),
        Just(vec![127]),
        Just(vec![0]),
        Just(vec![169, 254]),
        Just(vec![192, 168]),
        (16u8..32).prop_map(|b| vec![172, b]),
        (64u8..128).prop_map(|b| vec![100, b]),
        Just(vec![]),
    ];
    (prefix, any::<[u8; 4]>()).prop_map(|(prefix, mut octets)| {
        octets[..prefix.len()].copy_from_slice(&prefix);
        Ipv4Addr::from(octets)
    })
}

/// The IPv6 forms that carry an IPv4 address to a translator or relay.
fn embeddings(v4: Ipv4Addr, noise: [u16; 4]) -> Vec<(&'static str, Ipv6Addr)> {
    let [a, b, c, d] = v4.octets();
    let (high, low) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
    let [n0, n1, n2, n3] = noise;
    vec![
        ("mapped", v4.to_ipv6_mapped()),
        ("NAT64", Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, high, low)),
        ("6to4", Ipv6Addr::new(0x2002, high, low, n0, n1, n2, n3, 1)),
        // Teredo: the client's address inverted; the server's a public one.
        (
            "Teredo",
            Ipv6Addr::new(0x2001, 0, 0x0808, 0x0808, n0, n1, !high, !low),
        ),
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
    fn ipv6_forms_of_an_ipv4_address_are_judged_as_that_address(
        v4 in ipv4_near_private_ranges(),
        noise in any::<[u16; 4]>(),
    ) {
        let refused = forbidden_range(IpAddr::V4(v4)).is_some();
        for (form, v6) in embeddings(v4, noise) {
            prop_assert_eq!(
                forbidden_range(IpAddr::V6(v6)).is_some(), refused, "{} {} of {}", form, v6, v4
            );
            let parsed = WebhookUrl::parse(&format!("http://[{v6}]/hook"), false);
            prop_assert_eq!(parsed.is_err(), refused, "{} {} of {}", form, v6, v4);
        }
    }

    #[test]
    fn site_local_and_local_use_nat64_are_refused_whole(bits in any::<u128>()) {
        let site_local = Ipv6Addr::from((0xfec0u128 << 112) | (bits >> 10));
        let local_nat64 = Ipv6Addr::from((0x0064_ff9b_0001u128 << 80) | (bits >> 48));
        for v6 in [site_local, local_nat64] {
            prop_assert!(forbidden_range(IpAddr::V6(v6)).is_some(), "{}", v6);
        }
    }

    #[test]
    fn env_vars_report_every_bad_entry_and_keep_no_nul(
        raw in proptest::collection::btree_map(hostile_text(), hostile_text(), 0..8),
    ) {
        let mut v = Validation::new();
        let parsed = EnvVars::parse(raw.clone(), "/env", &mut v);
        match v.finish_with(|valid| valid.open(parsed)) {
            Ok(env) => {
                for (name, value) in env.iter() {
                    prop_assert!(!value.contains('\0'));
                    prop_assert!(name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'));
                }
                let stored = EnvVars::from_trusted_json(&env.to_json()).unwrap();
                prop_assert_eq!(stored, env);
            }
            Err(rdev_api::domain::DomainError::Invalid(errors)) => prop_assert!(
                !errors.is_empty() && errors.iter().all(|e| e.pointer.starts_with("/env"))
            ),
            Err(other) => prop_assert!(false, "{}", other),
        }
        let _: BTreeMap<String, String> = raw;
    }
}
