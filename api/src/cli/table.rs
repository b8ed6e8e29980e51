//! What the verbs print: with `--json` the API's JSON as the server sent it (bytes as
//! numbers), else tables and lines for people, with sizes in binary units (`12.0 MiB`) and
//! times in UTC (`2026-11-22T07:39:40Z`).

use std::fmt::Display;

use serde_json::Value;

use crate::cli::client::Reply;
use crate::wire::cron::format_utc;

/// `r`'s JSON with `--json`, else `human(&r.body)`.
pub fn show<T>(r: &Reply<T>, as_json: bool, human: impl FnOnce(&T)) {
    if as_json {
        print_json(&r.json)
    } else {
        human(&r.body)
    }
}

/// `v` as pretty JSON on stdout.
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];

/// `bytes` for people: `512 B`, `1.5 KiB`, `12.0 MiB`, up to TiB, one decimal.
pub fn size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Move up while the value would print as 1024.0 or more.
    while v >= 1023.95 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A time (Unix seconds) in UTC, or `-`.
pub fn when(t: Option<i64>) -> String {
    t.map_or_else(|| "-".into(), format_utc)
}

/// The value, or `-`.
pub fn or_dash<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// `yes` or `no`.
pub fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_are_in_binary_units_with_one_decimal() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(12_598_272), "12.0 MiB");
        assert_eq!(size(16 << 20), "16.0 MiB");
        assert_eq!(size((1 << 20) - 1), "1.0 MiB", "not 1024.0 KiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
        assert_eq!(size(5 << 40), "5.0 TiB");
        assert_eq!(size(2048 << 40), "2048.0 TiB", "TiB is the largest unit");
    }
}
