//! Backup policies: the policy file format (TOML: which VMs, a cron schedule, a retention, a
//! backup mode), its validation with every error named by line and column, and the store of
//! installed policies (`<data_dir>/policies/<name>.toml`, the source exactly as applied, plus
//! `state.json` with when each was applied and last run).
//!
//! It does not run anything: [`crate::daemon::schedule::scheduler`] decides what is due and starts the jobs.
//!
//! ```toml
//! name = "web"
//! vms = ["web-*", "db-1"]       # names or globs (`*`, `?`)
//! schedule = "0 2 * * *"        # cron, UTC; or @hourly, @daily, ...
//! mode = "auto"                 # or "full"
//! [retention]                   # optional: without it nothing is pruned
//! keep_last = 7
//! keep_daily = 14
//! ```

use std::fmt;
use std::ops::Range;

use catalog::RetentionPolicy;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use utoipa::ToSchema;

use crate::wire::cron::Schedule;
use crate::wire::vms::BackupModeRequest;

/// Longest policy name.
const MAX_POLICY_NAME: usize = 64;
/// Longest VM pattern.
const MAX_PATTERN: usize = 128;

/// How many backups a policy keeps per period (see `catalog::retention`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
}

impl From<Retention> for RetentionPolicy {
    fn from(r: Retention) -> Self {
        RetentionPolicy {
            keep_last: r.keep_last,
            keep_hourly: r.keep_hourly,
            keep_daily: r.keep_daily,
            keep_weekly: r.keep_weekly,
            keep_monthly: r.keep_monthly,
            keep_yearly: r.keep_yearly,
        }
    }
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Policy {
    pub name: String,
    /// VM names or globs (`*`, `?`).
    pub vms: Vec<String>,
    /// Cron expression in UTC: five fields (minute hour day-of-month month day-of-week), or
    /// six with seconds first; or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    pub schedule: String,
    pub mode: BackupModeRequest,
    /// Applied to each VM after each successful scheduled backup; none: nothing is pruned.
    pub retention: Option<Retention>,
    /// A disabled policy is kept but never fires.
    pub enabled: bool,
    pub description: Option<String>,
}

/// The file as written, with positions for error messages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyToml {
    name: Spanned<String>,
    vms: Spanned<Vec<Spanned<String>>>,
    schedule: Spanned<String>,
    #[serde(default)]
    mode: BackupModeRequest,
    retention: Option<Spanned<Retention>>,
    #[serde(default = "yes")]
    enabled: bool,
    description: Option<String>,
}

fn yes() -> bool {
    true
}

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyError {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

/// Every error of a policy file, as one line per error.
pub fn describe(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// An error at byte range `span` of `text` (its start), with line and column (also used for
/// the daemon's config file).
pub(crate) fn at(
    text: &str,
    span: Option<Range<usize>>,
    message: impl Into<String>,
) -> PolicyError {
    let offset = span.map_or(0, |s| s.start.min(text.len()));
    let before = text.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    PolicyError {
        line,
        column,
        message: message.into(),
    }
}

/// Parses and validates a policy file; on failure, every problem found.
pub fn parse(text: &str) -> Result<Policy, Vec<PolicyError>> {
    let raw: PolicyToml = toml::from_str(text).map_err(|e| {
        let msg = e.message().trim_end().to_string();
        vec![at(text, e.span(), msg)]
    })?;
    let mut errors = Vec::new();
    if let Err(why) = check_policy_name(raw.name.get_ref()) {
        errors.push(at(text, Some(raw.name.span()), why));
    }
    if raw.vms.get_ref().is_empty() {
        errors.push(at(
            text,
            Some(raw.vms.span()),
            "vms lists no VM name or glob",
        ));
    }
    for p in raw.vms.get_ref() {
        if let Err(why) = check_pattern(p.get_ref()) {
            errors.push(at(text, Some(p.span()), why));
        }
    }
    if let Err(e) = Schedule::parse(raw.schedule.get_ref()) {
        errors.push(at(text, Some(raw.schedule.span()), e.0));
    }
    if let Some(r) = &raw.retention {
        if *r.get_ref() == Retention::default() {
            let why = "retention keeps nothing (every keep_* is 0); give at least one keep_* rule or remove [retention]";
            errors.push(at(text, Some(r.span()), why));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Policy {
        name: raw.name.into_inner(),
        vms: raw
            .vms
            .into_inner()
            .into_iter()
            .map(|s| s.into_inner())
            .collect(),
        schedule: raw.schedule.into_inner(),
        mode: raw.mode,
        retention: raw.retention.map(|r| r.into_inner()),
        enabled: raw.enabled,
        description: raw.description,
    })
}

fn check_policy_name(name: &str) -> Result<(), String> {
    check_plain_name("policy name", name, MAX_POLICY_NAME)
}

/// A name of 1 to `max` letters, digits, `-`, `_` and `.` (not first), so it is safe in
/// file names and URLs (policies, hypervisors).
pub(crate) fn check_plain_name(what: &str, name: &str, max: usize) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > max {
        return Err(format!("{what} must be 1 to {max} characters"));
    }
    if !name.chars().all(ok_char) || name.starts_with('.') {
        return Err(format!(
            "{what} {name:?} may only hold letters, digits, `-`, `_` and `.` (not first)"
        ));
    }
    Ok(())
}

fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > MAX_PATTERN {
        return Err(format!("vm pattern must be 1 to {MAX_PATTERN} bytes"));
    }
    if p.chars().any(|c| c.is_control()) || p.contains('/') || p.contains("..") {
        return Err(format!(
            "vm pattern {p:?} holds a control character, `/` or `..`"
        ));
    }
    if let Some(c) = p.chars().find(|c| matches!(c, '[' | ']' | '{' | '}' | '!')) {
        return Err(format!(
            "vm pattern {p:?} uses `{c}`: only `*` and `?` are supported"
        ));
    }
    Ok(())
}

/// An installed policy as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyInfo {
    pub policy: Policy,
    /// The file exactly as applied.
    pub source: String,
    /// Unix seconds.
    pub applied: i64,
    /// Last time the scheduler fired it, Unix seconds.
    pub last_run: Option<i64>,
    /// Next time it fires, Unix seconds (none when disabled).
    pub next_run: Option<i64>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const GOOD: &str = "name = \"web\"\nvms = [\"web-*\", \"db-1\"]\nschedule = \"0 2 * * *\"\n\n[retention]\nkeep_last = 3\nkeep_daily = 7\n";

    #[test]
    fn a_good_file_parses() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.vms, ["web-*", "db-1"]);
        assert_eq!(p.mode, BackupModeRequest::Auto);
        assert!(p.enabled);
        assert_eq!(p.retention.unwrap().keep_daily, 7);
    }

    #[test]
    fn errors_name_their_line_and_column() {
        let text = "name = \"web\"\nvms = [\"ok\", \"web-[1]\"]\nschedule = \"0 25 * * *\"\n[retention]\nkeep_last = 0\n";
        let errs = parse(text).unwrap_err();
        let shown = describe(&errs);
        assert_eq!(errs.len(), 3, "{shown}");
        assert_eq!((errs[0].line, errs[0].column), (2, 14), "{shown}");
        assert!(errs[0].message.contains("only `*` and `?`"), "{shown}");
        assert_eq!((errs[1].line, errs[1].column), (3, 12), "{shown}");
        assert!(errs[1].message.contains("hour field"), "{shown}");
        assert_eq!(errs[2].line, 4, "{shown}");
        assert!(errs[2].message.contains("keeps nothing"), "{shown}");
    }

    #[test]
    fn unknown_fields_and_bad_types_are_named_by_toml() {
        let errs =
            parse("name = \"a\"\nvms = [\"x\"]\nschedule = \"@daily\"\nkeep = 3\n").unwrap_err();
        assert_eq!(errs[0].line, 4, "{}", describe(&errs));
        assert!(
            errs[0].message.contains("unknown field `keep`"),
            "{}",
            describe(&errs)
        );
        let errs = parse(&GOOD.replace("keep_daily = 7", "keep_forever = 1")).unwrap_err();
        assert_eq!(errs[0].line, 7, "{}", describe(&errs));
        assert!(
            errs[0].message.contains("keep_forever"),
            "{}",
            describe(&errs)
        );
        let errs = parse("name = \"a\"\nvms = [\"x\"]\nschedule = \"@daily\"\nmode = \"fast\"\n")
            .unwrap_err();
        assert_eq!(errs[0].line, 4, "{}", describe(&errs));
        let errs = parse("name = \"../etc\"\nvms = []\nschedule = \"@daily\"\n").unwrap_err();
        assert_eq!(errs.len(), 2, "{}", describe(&errs));
    }
}

/// Body of an apply request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyPolicyRequest {
    /// The policy file (TOML).
    pub source: String,
    /// Validate only; install nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Outcome of an apply.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApplyPolicyResponse {
    pub policy: PolicyInfo,
    /// Whether no policy of that name existed before.
    pub created: bool,
    pub dry_run: bool,
}
