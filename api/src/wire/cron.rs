//! Cron schedules of policies, evaluated in UTC, and the pure "next firing after T" that the
//! scheduler is built on. Parsing and matching are the `croner` crate's: the classic five
//! fields (minute, hour, day of month, month, day of week, with `*`, ranges, steps, lists and
//! three-letter names; weekday 7 is Sunday like 0), the `@hourly`/`@daily`/`@weekly`/
//! `@monthly`/`@yearly` macros, and, as in Vixie cron, a day matching either restricted day
//! field. An optional sixth field in front gives seconds (`*/20 * * * * *`: every 20 s), for
//! short test schedules; the scheduler looks every 15 s, so firings closer than that merge.
//! This module only adapts it to Unix seconds and names what is wrong with a bad one.

use chrono::{DateTime, Utc};
use croner::Cron;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule(Cron);

/// Why a schedule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CronError(pub String);

impl Schedule {
    /// Parses a five-field expression (six with seconds first) or a macro; a schedule that
    /// never fires is refused.
    pub fn parse(expr: &str) -> Result<Schedule, CronError> {
        let expr = expr.trim();
        let fields = expr.split_whitespace().count();
        if !expr.starts_with('@') && !(5..=6).contains(&fields) {
            return Err(CronError(format!(
                "a schedule has 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first; {expr:?} has {fields}"
            )));
        }
        let cron = Cron::new(expr)
            .with_seconds_optional()
            .parse()
            .map_err(|e| CronError(format!("schedule {expr:?}: {}", blame(expr, &e))))?;
        let s = Schedule(cron);
        if s.next_after(0).is_none() {
            return Err(CronError(format!("schedule {expr:?} never fires")));
        }
        Ok(s)
    }

    /// The first firing strictly after `t` (Unix seconds, UTC), at a whole second (a whole
    /// minute for five fields).
    pub fn next_after(&self, t: i64) -> Option<i64> {
        let start = DateTime::<Utc>::from_timestamp(t, 0)?;
        let next = self.0.find_next_occurrence(&start, false).ok()?;
        Some(next.timestamp())
    }
}

const FIELDS: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day of month",
    "month",
    "day of week",
];

/// Names the field of `expr` that croner refused (each tried alone, the others `*`), so an
/// operator reads "minute field \"61\": number out of bounds" rather than the bare error.
fn blame(expr: &str, err: &croner::errors::CronError) -> String {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let why = err.to_string();
    let why = why.strip_prefix("Component error: ").unwrap_or(&why);
    let why = why.trim_end_matches('.').to_lowercase();
    let names = &FIELDS[6 - fields.len().clamp(5, 6)..];
    for (i, name) in names.iter().enumerate() {
        let mut alone = vec!["*"; names.len()];
        alone[i] = fields.get(i).copied().unwrap_or("*");
        if Cron::new(&alone.join(" "))
            .with_seconds_optional()
            .parse()
            .is_err()
        {
            return format!("{name} field {:?}: {why}", alone[i]);
        }
    }
    why
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_utc(t: i64) -> String {
    DateTime::<Utc>::from_timestamp(t, 0).map_or_else(
        || format!("@{t}"),
        |d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// Whether a schedule last run (or applied) at `since` has a firing in `(since, now]`.
pub fn is_due(schedule: &Schedule, since: i64, now: i64) -> bool {
    schedule.next_after(since).is_some_and(|t| t <= now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::retention::civil_from_days;

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
        // A seconds field in front.
        assert_eq!(next("*/20 * * * * *", t), "2026-11-22T09:07:20Z");
        assert_eq!(next("30 0 2 * * *", t), "2026-11-23T02:00:30Z");
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
        assert!(e("* * * * * * *").contains("or 6 with seconds first"));
        assert!(e("61 * * * * *").contains("second field \"61\": number out of bounds"));
        assert!(e("0 61 * * * *").contains("minute field \"61\""));
        assert!(e("61 * * * *").contains("minute field \"61\": number out of bounds"));
        assert!(e("* * * foo *").contains("month field \"foo\": invalid number"));
        assert!(e("*/0 * * * *").contains("minute field \"*/0\": step cannot be zero"));
        assert!(e("5-1 * * * *").contains("minute field \"5-1\": range out of bounds"));
        assert!(e("0 0 31 2 *").contains("never fires"));
        assert!(
            e("@fortnightly").contains("@fortnightly"),
            "{}",
            e("@fortnightly")
        );
    }
}
