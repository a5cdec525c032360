//! Ref, policy and scope parsing against arbitrary input: no panics, typed
//! errors, and only the canonical spelling accepted.

use mediastore_core::{CleanupPolicy, Error, MediaRef, validate_scope};
use proptest::prelude::*;

proptest! {
    #[test]
    fn any_string_parses_to_its_own_spelling_or_a_typed_error(s in ".{0,64}") {
        match s.parse::<MediaRef>() {
            Ok(r) => prop_assert_eq!(r.to_string(), s.clone()),
            Err(e) => {
                let typed = matches!(e, Error::InvalidRef { .. });
                prop_assert!(typed, "{e}");
            }
        }
        match MediaRef::parse_lenient(&s) {
            Ok(r) => {
                let text = r.to_string();
                let same = s == text || text.strip_prefix("media://") == Some(s.as_str());
                prop_assert!(same, "{s:?} parsed leniently as {text}");
            }
            Err(e) => {
                let typed = matches!(e, Error::InvalidRef { .. });
                prop_assert!(typed, "{e}");
            }
        }
    }

    #[test]
    fn near_miss_refs_are_rejected(bytes in any::<[u8; 16]>(), pos in 0usize..36, c in any::<char>()) {
        let good = MediaRef::from_random_bytes(bytes).to_string();
        prop_assert_eq!(good.parse::<MediaRef>().unwrap().to_string(), good.clone());
        // Replace one character of the UUID part: the result either still
        // parses to exactly itself (same character, or another hex digit
        // where any is allowed) or is refused.
        let mut chars: Vec<char> = good.chars().collect();
        chars[8 + pos] = c;
        let mutated: String = chars.into_iter().collect();
        match mutated.parse::<MediaRef>() {
            Ok(r) => prop_assert_eq!(r.to_string(), mutated),
            Err(e) => {
                let typed = matches!(e, Error::InvalidRef { .. });
                prop_assert!(typed, "{e}");
            }
        }
    }

    #[test]
    fn policies_parse_only_their_two_spellings(s in ".{0,24}") {
        match s.parse::<CleanupPolicy>() {
            Ok(p) => prop_assert_eq!(p.as_str(), s.as_str()),
            Err(e) => {
                let typed = matches!(e, Error::InvalidPolicy { .. });
                prop_assert!(typed, "{e}");
            }
        }
    }

    #[test]
    fn scopes_are_refused_exactly_when_empty_long_or_control(s in "\\PC{0,8}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}]?\\PC{0,8}") {
        let bad = s.is_empty() || s.len() > 512 || s.chars().any(char::is_control);
        match validate_scope(&s) {
            Ok(()) => prop_assert!(!bad, "{s:?} accepted"),
            Err(e) => {
                prop_assert!(bad, "{s:?} refused: {e}");
                let typed = matches!(e, Error::InvalidScope { .. });
                prop_assert!(typed, "{e}");
            }
        }
    }
}
