//! Retention as a pure function: which backups a policy keeps, and why.
//!
//! Owns calendar bucketing (UTC hours, days, ISO-style Monday weeks, months, years) and the
//! keep rules. Each rule walks the backups newest first and keeps the newest backup of each
//! bucket until it has kept its count (rules are independent, as in restic). Protected
//! backups are always kept. A policy with every count zero keeps everything.

use crate::ids::BackupId;
use serde::{Deserialize, Serialize};

/// How many backups to keep per period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// The newest N.
    pub keep_last: u32,
    /// The newest of each of the last N hours that have backups.
    pub keep_hourly: u32,
    /// ... days.
    pub keep_daily: u32,
    /// ... weeks (Monday to Sunday, UTC).
    pub keep_weekly: u32,
    /// ... months.
    pub keep_monthly: u32,
    /// ... years.
    pub keep_yearly: u32,
}

impl RetentionPolicy {
    fn is_empty(&self) -> bool {
        *self == RetentionPolicy::default()
    }
}

/// One backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Backup id.
    pub id: BackupId,
    /// When it was taken, unix seconds.
    pub time: i64,
    /// Never removed.
    pub protected: bool,
}

/// The verdict on one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Backup id.
    pub id: BackupId,
    /// Keep or remove.
    pub keep: bool,
    /// Rules that keep it (`last`, `hourly`, ..., `protected`, `no-policy`; prune adds
    /// `in-use` for a held backup).
    pub reasons: Vec<&'static str>,
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

type Bucket = fn(i64) -> i64;

fn hour(t: i64) -> i64 {
    t.div_euclid(3600)
}
fn day(t: i64) -> i64 {
    t.div_euclid(86400)
}
fn week(t: i64) -> i64 {
    // 1970-01-01 was a Thursday; shift so weeks start on Monday.
    (day(t) + 3).div_euclid(7)
}
fn month(t: i64) -> i64 {
    let (y, m, _) = civil_from_days(day(t));
    y * 12 + m as i64
}
fn year(t: i64) -> i64 {
    civil_from_days(day(t)).0
}
fn each(t: i64) -> i64 {
    t
}

/// Decide for every candidate (order of the input is kept in the output).
pub fn apply(cands: &[Candidate], p: &RetentionPolicy) -> Vec<Decision> {
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by(|&a, &b| (cands[b].time, &cands[b].id).cmp(&(cands[a].time, &cands[a].id)));
    let mut reasons: Vec<Vec<&'static str>> = vec![Vec::new(); cands.len()];
    let rules: [(u32, Bucket, &'static str); 6] = [
        (p.keep_last, each, "last"),
        (p.keep_hourly, hour, "hourly"),
        (p.keep_daily, day, "daily"),
        (p.keep_weekly, week, "weekly"),
        (p.keep_monthly, month, "monthly"),
        (p.keep_yearly, year, "yearly"),
    ];
    for (count, bucket, name) in rules {
        keep_by(cands, &order, count, bucket, name, &mut reasons);
    }
    for (i, c) in cands.iter().enumerate() {
        if c.protected {
            reasons[i].push("protected");
        }
        if p.is_empty() {
            reasons[i].push("no-policy");
        }
    }
    cands
        .iter()
        .zip(reasons)
        .map(|(c, r)| Decision {
            id: c.id.clone(),
            keep: !r.is_empty(),
            reasons: r,
        })
        .collect()
}

fn keep_by(
    cands: &[Candidate],
    order: &[usize],
    count: u32,
    bucket: Bucket,
    name: &'static str,
    reasons: &mut [Vec<&'static str>],
) {
    let (mut kept, mut last) = (0u32, None);
    for &i in order {
        if kept >= count {
            break;
        }
        let b = bucket(cands[i].time);
        if last != Some(b) {
            reasons[i].push(name);
            kept += 1;
            last = Some(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse "YYYY-MM-DD HH:MM" (UTC) to unix seconds.
    fn t(s: &str) -> i64 {
        let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
        let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
        let days = (0..200_000i64)
            .map(|k| k - 100_000)
            .find(|&z| civil_from_days(z) == (y, m as u32, d as u32))
            .unwrap();
        days * 86400 + n(11, 13) * 3600 + n(14, 16) * 60
    }

    fn cands(dates: &[&str]) -> Vec<Candidate> {
        dates
            .iter()
            .enumerate()
            .map(|(i, d)| Candidate {
                id: BackupId::parse(&format!("b{i}")).unwrap(),
                time: t(d),
                protected: false,
            })
            .collect()
    }

    fn kept(c: &[Candidate], p: &RetentionPolicy) -> Vec<usize> {
        apply(c, p)
            .iter()
            .enumerate()
            .filter(|(_, d)| d.keep)
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(week(t("2024-01-01 00:00")), week(t("2024-01-07 23:59"))); // Mon..Sun
        assert_ne!(week(t("2024-01-07 23:59")), week(t("2024-01-08 00:00")));
    }

    // Over 60 lines: one table of policies and what each keeps, one row per policy.
    #[test]
    fn table_daily_weekly_monthly() {
        let c = cands(&[
            "2024-01-01 10:00", // 0 Mon wk1, Jan
            "2024-01-01 22:00", // 1 same day, later
            "2024-01-02 09:00", // 2
            "2024-01-08 09:00", // 3 Mon wk2
            "2024-01-31 23:00", // 4 last of Jan
            "2024-02-01 01:00", // 5 Feb
            "2024-02-01 02:00", // 6 Feb, newest
        ]);
        let table: Vec<(RetentionPolicy, Vec<usize>)> = vec![
            (
                RetentionPolicy {
                    keep_last: 2,
                    ..Default::default()
                },
                vec![5, 6],
            ),
            (
                RetentionPolicy {
                    keep_daily: 3,
                    ..Default::default()
                },
                vec![3, 4, 6],
            ),
            (
                RetentionPolicy {
                    keep_weekly: 3,
                    ..Default::default()
                },
                vec![2, 3, 6],
            ),
            (
                RetentionPolicy {
                    keep_monthly: 5,
                    ..Default::default()
                },
                vec![4, 6],
            ),
            (
                RetentionPolicy {
                    keep_yearly: 1,
                    ..Default::default()
                },
                vec![6],
            ),
            (
                RetentionPolicy {
                    keep_hourly: 2,
                    ..Default::default()
                },
                vec![5, 6],
            ),
            (
                RetentionPolicy {
                    keep_last: 1,
                    keep_monthly: 2,
                    ..Default::default()
                },
                vec![4, 6],
            ),
            (RetentionPolicy::default(), vec![0, 1, 2, 3, 4, 5, 6]),
        ];
        for (p, want) in table {
            assert_eq!(kept(&c, &p), want, "policy {p:?}");
        }
    }

    #[test]
    fn protected_always_kept_and_reasons_named() {
        let mut c = cands(&["2023-05-01 00:00", "2024-05-01 00:00", "2024-06-01 00:00"]);
        c[0].protected = true;
        let p = RetentionPolicy {
            keep_last: 1,
            keep_yearly: 2,
            ..Default::default()
        };
        let d = apply(&c, &p);
        assert_eq!(d[0].reasons, vec!["yearly", "protected"]);
        assert!(!d[1].keep);
        assert_eq!(d[2].reasons, vec!["last", "yearly"]);
    }
}
