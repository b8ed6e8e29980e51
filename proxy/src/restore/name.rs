//! Export names: `VM/DISK@BACKUP`, parsed and validated before anything is opened.
//!
//! Owns the naming rules (no NUL or control characters, no `..`, one `/` and one `@`, bounded
//! length) so that names from clients and APIs can be used in logs and file names safely.

use std::fmt;

use catalog::BackupId;

use super::error::{Error, Result};

/// Longest export name accepted (the NBD protocol's limit for names).
pub const MAX_EXPORT_NAME: usize = 4096;
/// Longest VM name or disk target accepted.
pub const MAX_PART: usize = 255;

/// A restore point of one disk: `VM/DISK@BACKUP`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExportName {
    /// VM name as recorded in the backup's manifest.
    pub vm: String,
    /// Disk target (`vda`).
    pub disk: String,
    /// The backup.
    pub backup: BackupId,
}

impl ExportName {
    /// A validated name from its parts.
    pub fn new(vm: &str, disk: &str, backup: &BackupId) -> Result<Self> {
        check_part("vm name", vm)?;
        check_part("disk target", disk)?;
        Ok(ExportName {
            vm: vm.to_string(),
            disk: disk.to_string(),
            backup: backup.clone(),
        })
    }

    /// Parse `VM/DISK@BACKUP`.
    pub fn parse(s: &str) -> Result<Self> {
        if s.len() > MAX_EXPORT_NAME {
            return Err(Error::invalid(format!(
                "export name of {} bytes is longer than {MAX_EXPORT_NAME}",
                s.len()
            )));
        }
        let bad = || Error::invalid(format!("export name {s:?} is not VM/DISK@BACKUP"));
        let (left, backup) = s.rsplit_once('@').ok_or_else(bad)?;
        let (vm, disk) = left.split_once('/').ok_or_else(bad)?;
        let backup = BackupId::parse(backup)
            .map_err(|e| Error::invalid(format!("export name {s:?}")).with_source(e))?;
        ExportName::new(vm, disk, &backup)
    }

    /// A string usable inside a local file name (`/` and `@` replaced).
    pub fn file_stem(&self) -> String {
        self.to_string()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

impl fmt::Display for ExportName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.vm, self.disk, self.backup)
    }
}

fn check_part(what: &str, s: &str) -> Result<()> {
    let reason = if s.is_empty() {
        Some("is empty")
    } else if s.len() > MAX_PART {
        Some("is too long")
    } else if s.chars().any(char::is_control) {
        Some("holds a control character")
    } else if s.contains("..") {
        Some("holds \"..\"")
    } else if s.contains(['/', '@', '\\']) {
        Some("holds '/', '@' or '\\'")
    } else {
        None
    };
    match reason {
        Some(r) => Err(Error::invalid(format!("{what} {s:?} {r}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        let n = ExportName::parse("web-1/vda@20240101T000000Z-0000abcd").unwrap();
        assert_eq!((n.vm.as_str(), n.disk.as_str()), ("web-1", "vda"));
        assert_eq!(n.to_string(), "web-1/vda@20240101T000000Z-0000abcd");
        assert_eq!(n.file_stem(), "web-1_vda_20240101T000000Z-0000abcd");
        for bad in [
            "",
            "vm/vda",
            "vm@x",
            "/vda@b1",
            "vm/@b1",
            "vm/vda@",
            "vm/../x@b1",
            "vm/a/b@b1",
            "v\0m/vda@b1",
            "vm/vda@b/1",
            "..//vda@b1",
        ] {
            assert!(ExportName::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}/vda@b1", "x".repeat(MAX_PART + 1));
        assert!(ExportName::parse(&long).is_err());
        assert!(ExportName::parse(&"y".repeat(MAX_EXPORT_NAME + 1)).is_err());
    }
}
