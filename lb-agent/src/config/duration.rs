//! The one duration grammar of the config: `"250ms"`, `"2s"`, `"1m"` or
//! `"1h"`. Use it with `#[serde(with = "duration")]`, or
//! `#[serde(default, with = "duration::option")]` for an optional one.

use std::time::Duration;

use serde::{de::Error as _, Deserialize, Deserializer};

pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{text:?} is not a duration like \"500ms\", \"2s\" or \"1m\""))?;
    let scale = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    n.checked_mul(scale).map(Duration::from_millis).ok_or_else(|| format!("{text:?} is too long"))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse(&String::deserialize(d)?).map_err(D::Error::custom)
}

pub mod option {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}
