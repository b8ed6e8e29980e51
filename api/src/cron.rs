//! Cron schedules of policies: the classic five fields (minute, hour, day of month, month,
//! day of week) and the `@hourly`/`@daily`/`@weekly`/`@monthly`/`@yearly` macros, evaluated
//! in UTC, and the pure "next firing after T" that the scheduler is built on.
//!
//! Each field takes `*`, `N`, `A-B`, `*/S`, `A-B/S`, `N/S` and comma lists of those; months
//! and weekdays also take three-letter English names; weekday 7 is Sunday like 0. As in Vixie
//! cron, when both day fields are restricted a day matches if either does.
//!
//! No cron crate was available offline for this toolchain (neither `cron` nor `croner` is in
//! the registry cache), so this is our own, small and unit-tested.

use catalog::retention::civil_from_days;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u32,
    doms: u32,
    months: u16,
    dows: u8,
    dom_any: bool,
    dow_any: bool,
}

/// Why a schedule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CronError(pub String);

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Days searched for a next firing: 28 years, long enough for any Feb 29 on a given weekday.
const SEARCH_DAYS: i64 = 28 * 366;

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &MONTHS,
    },
    Field {
        name: "day of week",
        min: 0,
        max: 7,
        names: &DAYS,
    },
];

impl Schedule {
    /// Parses a five-field expression or a macro.
    pub fn parse(expr: &str) -> Result<Schedule, CronError> {
        let expr = expr.trim();
        let expanded = match expr {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            m if m.starts_with('@') => {
                return Err(CronError(format!("unknown schedule macro {m:?}")))
            }
            other => other,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CronError(format!(
                "a schedule has 5 fields (minute hour day-of-month month day-of-week), {expr:?} has {}",
                parts.len()
            )));
        }
        let mut bits = [0u64; 5];
        for (i, (part, field)) in parts.iter().zip(&FIELDS).enumerate() {
            bits[i] = parse_field(part, field)?;
        }
        // Weekday 7 is Sunday.
        let dows = ((bits[4] | (bits[4] >> 7)) & 0x7f) as u8;
        let s = Schedule {
            minutes: bits[0],
            hours: bits[1] as u32,
            doms: bits[2] as u32,
            months: bits[3] as u16,
            dows,
            dom_any: parts[2] == "*",
            dow_any: parts[4] == "*",
        };
        if s.next_after(0).is_none() {
            return Err(CronError(format!("schedule {expr:?} never fires")));
        }
        Ok(s)
    }

    /// The first firing strictly after `t` (Unix seconds, UTC), at a whole minute.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        let start = t.div_euclid(60) * 60 + 60;
        let first_day = start.div_euclid(86_400);
        for day in first_day..first_day + SEARCH_DAYS {
            if !self.day_matches(day) {
                continue;
            }
            let from = if day == first_day {
                (start - day * 86_400) / 60
            } else {
                0
            };
            if let Some(m) = self.first_minute_from(from as u32) {
                return Some(day * 86_400 + i64::from(m) * 60);
            }
        }
        None
    }

    fn day_matches(&self, day: i64) -> bool {
        let (_, month, dom) = civil_from_days(day);
        if self.months & (1 << month) == 0 {
            return false;
        }
        let dow = (day + 4).rem_euclid(7) as u32;
        let dom_ok = self.doms & (1 << dom) != 0;
        let dow_ok = self.dows & (1 << dow) != 0;
        if self.dom_any || self.dow_any {
            dom_ok && dow_ok
        } else {
            dom_ok || dow_ok
        }
    }

    /// The first matching minute of the day at or after minute-of-day `from`.
    fn first_minute_from(&self, from: u32) -> Option<u32> {
        (from / 60..24)
            .filter(|h| self.hours & (1 << h) != 0)
            .find_map(|h| {
                let m0 = if h == from / 60 { from % 60 } else { 0 };
                (m0..60)
                    .find(|m| self.minutes & (1 << m) != 0)
                    .map(|m| h * 60 + m)
            })
    }
}

fn parse_field(text: &str, f: &Field) -> Result<u64, CronError> {
    let mut bits = 0u64;
    for item in text.split(',') {
        bits |= parse_item(item, f)
            .map_err(|why| CronError(format!("{} field {text:?}: {why}", f.name)))?;
    }
    Ok(bits)
}

fn parse_item(item: &str, f: &Field) -> Result<u64, String> {
    let (range, step) = match item.split_once('/') {
        Some((r, s)) => {
            let step: u32 = s
                .parse()
                .map_err(|_| format!("step {s:?} is not a number"))?;
            if step == 0 {
                return Err("a step must be at least 1".into());
            }
            (r, step)
        }
        None => (item, 1),
    };
    let (lo, hi) = if range == "*" {
        (f.min, f.max)
    } else if let Some((a, b)) = range.split_once('-') {
        (value(a, f)?, value(b, f)?)
    } else {
        let v = value(range, f)?;
        // `N/S` runs from N to the end of the field.
        (v, if item.contains('/') { f.max } else { v })
    };
    if lo > hi {
        return Err(format!("range {lo}-{hi} runs backwards"));
    }
    Ok((lo..=hi).step_by(step as usize).fold(0, |b, v| b | 1 << v))
}

fn value(text: &str, f: &Field) -> Result<u32, String> {
    let lower = text.to_ascii_lowercase();
    if let Some(i) = f.names.iter().position(|n| *n == lower) {
        return Ok(i as u32 + if f.name == "month" { 1 } else { 0 });
    }
    let v: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if v < f.min || v > f.max {
        return Err(format!("{v} is outside {}-{}", f.min, f.max));
    }
    Ok(v)
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_utc(t: i64) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(86_400));
    let s = t.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn at(y: i64, mo: u32, d: u32, h: i64, mi: i64) -> i64 {
        let days = (0..)
            .find(|&n| civil_from_days(n) == (y, mo, d))
            .expect("date after 1970");
        days * 86_400 + h * 3600 + mi * 60
    }

    fn next(expr: &str, t: i64) -> String {
        format_utc(Schedule::parse(expr).unwrap().next_after(t).unwrap())
    }

    #[test]
    fn civil_dates_and_formatting() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(format_utc(at(2024, 2, 29, 23, 59)), "2024-02-29T23:59:00Z");
    }

    #[test]
    fn next_firings() {
        let t = at(2026, 11, 22, 9, 7); // a Sunday
        assert_eq!(next("* * * * *", t), "2026-11-22T09:08:00Z");
        assert_eq!(next("0 2 * * *", t), "2026-11-23T02:00:00Z");
        assert_eq!(next("*/15 * * * *", t), "2026-11-22T09:15:00Z");
        assert_eq!(next("30 9 * * *", t), "2026-11-22T09:30:00Z");
        assert_eq!(next("0 0 * * mon-fri", t), "2026-11-23T00:00:00Z");
        assert_eq!(next("0 0 * * 6", t), "2026-11-28T00:00:00Z");
        assert_eq!(next("0 0 * * 7", t), "2026-11-29T00:00:00Z");
        assert_eq!(next("@monthly", t), "2026-12-01T00:00:00Z");
        assert_eq!(next("@yearly", t), "2027-01-01T00:00:00Z");
        assert_eq!(next("0 12 29 feb *", t), "2028-02-29T12:00:00Z");
        assert_eq!(next("5,10 1-3/2 * * *", t), "2026-11-23T01:05:00Z");
        assert_eq!(next("10/20 * * * *", t), "2026-11-22T09:10:00Z");
    }

    #[test]
    fn restricted_day_fields_match_either() {
        // The 1st of the month or any Friday.
        let t = at(2026, 11, 22, 9, 7);
        assert_eq!(next("0 0 1 * fri", t), "2026-11-27T00:00:00Z");
        assert_eq!(
            next("0 0 1 * fri", at(2026, 11, 28, 0, 0)),
            "2026-12-01T00:00:00Z"
        );
    }

    #[test]
    fn bad_expressions_are_named() {
        let e = |s: &str| Schedule::parse(s).unwrap_err().to_string();
        assert!(e("* * * *").contains("5 fields"), "{}", e("* * * *"));
        assert!(e("61 * * * *").contains("minute field \"61\": 61 is outside 0-59"));
        assert!(e("* * * foo *").contains("month field"));
        assert!(e("*/0 * * * *").contains("step must be at least 1"));
        assert!(e("5-1 * * * *").contains("backwards"));
        assert!(e("0 0 31 2 *").contains("never fires"));
        assert!(e("@fortnightly").contains("unknown schedule macro"));
    }
}
