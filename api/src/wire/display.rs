//! The wire enums as people read them: the same words as their JSON (`succeeded`, `up`,
//! `operator`, `full`, `qcow2`). Padded like strings, so `{:<10}` lines up table columns.

use std::fmt;

use crate::wire::hypervisors::HvState;
use crate::wire::jobs::JobState;
use crate::wire::restores::RestoreFormat;
use crate::wire::tokens::Role;
use crate::wire::vms::BackupModeRequest;

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        })
    }
}

impl fmt::Display for HvState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            HvState::Unknown => "unknown",
            HvState::Up => "up",
            HvState::Unreachable => "unreachable",
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Scoped => "scoped",
        })
    }
}

impl fmt::Display for BackupModeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            BackupModeRequest::Auto => "auto",
            BackupModeRequest::Full => "full",
        })
    }
}

impl fmt::Display for RestoreFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            RestoreFormat::Qcow2 => "qcow2",
            RestoreFormat::Raw => "raw",
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::wire::hypervisors::HvState;
    use crate::wire::jobs::JobState;
    use crate::wire::restores::RestoreFormat;
    use crate::wire::tokens::Role;
    use crate::wire::vms::BackupModeRequest;

    /// Each word is the one its JSON carries.
    fn same_as_json<T: serde::Serialize + std::fmt::Display>(values: &[T]) {
        for v in values {
            assert_eq!(serde_json::to_value(v).unwrap(), v.to_string());
        }
    }

    #[test]
    fn the_words_are_the_json_ones_and_pad() {
        use JobState::*;
        same_as_json(&[Queued, Running, Succeeded, Failed, Cancelled]);
        same_as_json(&[HvState::Unknown, HvState::Up, HvState::Unreachable]);
        same_as_json(&[Role::Admin, Role::Operator, Role::Auditor, Role::Scoped]);
        same_as_json(&[BackupModeRequest::Auto, BackupModeRequest::Full]);
        same_as_json(&[RestoreFormat::Qcow2, RestoreFormat::Raw]);
        assert_eq!(format!("[{:<6}]", HvState::Up), "[up    ]");
    }
}
