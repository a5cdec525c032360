//! Human units in configuration: durations (`"30m"`, `"7d"`) and sizes
//! (`"50MiB"`, `"1GB"`, `"4096"`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written for humans (`"90s"`, `"30m"`, `"7d"`, `"1h 30m"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parses `"30m"`, `"7d"`, `"1h 30m"`, `"0s"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim())
            .map(Self)
            .map_err(|e| format!("{text:?} is not a duration like \"30m\" or \"7d\": {e}"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A byte count written for humans: a plain number, or a number with a
/// unit, decimal (`kB`, `MB`, `GB`, `TB`) or binary (`KiB`, `MiB`, `GiB`,
/// `TiB`). `B` alone is bytes; units are case-insensitive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"50MiB"`, `"1 GB"`, `"4096"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let bad = || format!("{text:?} is not a size like \"50MiB\", \"1GB\" or \"4096\"");
        let number: f64 = number.parse().map_err(|_| bad())?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        let bytes = number * factor as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(Self(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, size) in UNITS {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Self(n)),
            Raw::Text(t) => Self::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        let cases = [
            ("4096", 4096),
            ("50MiB", 50 << 20),
            ("50 mib", 50 << 20),
            ("1GB", 1_000_000_000),
            ("1.5KiB", 1536),
            ("2TiB", 2 << 40),
            ("0", 0),
            ("7b", 7),
        ];
        for (text, want) in cases {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(want)), "{text}");
        }
        for bad in ["", "MiB", "5 parsecs", "-1MiB", "1e400", "1.2.3"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad} parsed");
        }
        assert_eq!(ByteSize(50 << 20).to_string(), "50MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(
            HumanDuration::parse("30m").unwrap().0,
            Duration::from_secs(1800)
        );
        assert_eq!(
            HumanDuration::parse("7d").unwrap().0,
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(
            HumanDuration::parse("1h 30m").unwrap().0,
            Duration::from_secs(5400)
        );
        assert!(HumanDuration::parse("soon").is_err());
        assert!(HumanDuration::parse("30").is_err());
    }
}
