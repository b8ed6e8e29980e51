//! Restore as a new libvirt domain: the domain definition saved in a backup's manifest,
//! rewritten for a new name and the restored disk files.
//!
//! Owns the rules of the copy: a valid new name that no existing domain has (an existing
//! domain is never clobbered), and a restored file for every disk. It never talks to
//! libvirt, and the XML itself is read and written only by the adapters' room
//! (`crate::hypervisor::xml_restore`, which says what the rewrite changes). The caller lists
//! the existing domain names, restores the disks (see [`crate::restore::restore_disk`]),
//! then defines the returned XML.
//!
//! [`relocate_chardevs`] gives a copy that runs beside the original its own character device
//! files (serial consoles logged to a file, unix sockets): two QEMUs binding one socket path
//! or truncating one log would take them from the original.

use std::path::{Path, PathBuf};

use super::error::{Error, ErrorKind, Result};
use super::file::ImageFormat;
use crate::hypervisor::xml_restore::{self, CopyDisk, CopySource};

/// Longest domain name accepted.
const MAX_NAME: usize = 255;

/// One restored disk: its guest target (`vda`) and the image file it was restored to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredDisk {
    /// Guest target, as in `<target dev='vda'/>`.
    pub target: String,
    /// The restored image on the host.
    pub path: PathBuf,
    /// The image's format.
    pub format: ImageFormat,
}

/// The domain XML for restoring `domain_xml` (a backup's saved definition) as a new domain
/// named `new_name` with the disks in `disks`. Refused with [`ErrorKind::Refused`] when
/// `new_name` is in `existing` (the names of the domains libvirt already has), and with
/// [`ErrorKind::InvalidInput`] for a bad name, unparsable XML, a disk with no restored
/// file, or a restored file for no disk.
pub fn restore_as_domain(
    domain_xml: &str,
    new_name: &str,
    disks: &[RestoredDisk],
    existing: &[String],
) -> Result<String> {
    check_new_name(new_name, existing)?;
    let copies: Vec<CopyDisk> = disks
        .iter()
        .map(|d| CopyDisk {
            target: &d.target,
            source: CopySource::File(&d.path),
            format: match d.format {
                ImageFormat::Raw => "raw",
                ImageFormat::Qcow2 => "qcow2",
            },
        })
        .collect();
    xml_restore::copy_domain_xml(domain_xml, new_name, &copies)
        .map_err(|e| Error::hypervisor(format!("domain {new_name}"), e))
}

/// `domain_xml` with the `<source path>` of every `unix` or `file` serial, console, channel
/// and parallel device moved into `dir` (same file name; `.2`, `.3`… appended when two
/// different paths share one). A console that names its serial's path keeps sharing it.
pub fn relocate_chardevs(domain_xml: &str, dir: &Path) -> Result<String> {
    xml_restore::relocate_chardevs(domain_xml, dir)
        .map_err(|e| Error::hypervisor(format!("character devices moved to {}", dir.display()), e))
}

/// A valid domain name that none of `existing` has.
pub(super) fn check_new_name(name: &str, existing: &[String]) -> Result<()> {
    check_name(name)?;
    if existing.iter().any(|n| n == name) {
        return Err(Error::new(
            ErrorKind::Refused,
            format!("domain {name} already exists"),
        ));
    }
    Ok(())
}

pub(super) fn check_name(name: &str) -> Result<()> {
    let bad = |c: char| c.is_control() || c == '/';
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(bad) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "domain name {name:?} must be 1-{MAX_NAME} bytes without '/' or control characters"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::hypervisor::xml_restore::tests::SAVED;

    fn restored() -> Vec<RestoredDisk> {
        vec![
            RestoredDisk {
                target: "vda".into(),
                path: "/r/a&b.raw".into(),
                format: ImageFormat::Raw,
            },
            RestoredDisk {
                target: "vdb".into(),
                path: "/r/vdb.qcow2".into(),
                format: ImageFormat::Qcow2,
            },
        ]
    }

    #[test]
    fn the_copy_is_on_the_restored_files_in_their_formats() {
        let xml = restore_as_domain(SAVED, "web-1-restored", &restored(), &[]).unwrap();
        assert!(xml.contains("<name>web-1-restored</name>"), "{xml}");
        assert!(xml.contains("<source file='/r/a&amp;b.raw'/>"), "{xml}");
        assert!(xml.contains("<driver name='qemu' type='qcow2'/><source file='/r/vdb.qcow2'/>"));
        let e = relocate_chardevs("<domain", Path::new("/n")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn existing_names_are_never_clobbered() {
        let e = restore_as_domain(SAVED, "web-2", &restored(), &["web-2".into()]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        assert!(e.to_string().contains("web-2"));
    }

    #[test]
    fn bad_input_is_refused() {
        let kinds = |xml: &str, name: &str, disks: &[RestoredDisk]| {
            restore_as_domain(xml, name, disks, &[]).unwrap_err().kind()
        };
        let r = restored();
        assert_eq!(kinds(SAVED, "", &r), ErrorKind::InvalidInput);
        assert_eq!(kinds(SAVED, "a/b", &r), ErrorKind::InvalidInput);
        assert_eq!(kinds(SAVED, "a\nb", &r), ErrorKind::InvalidInput);
        assert_eq!(kinds(SAVED, &"x".repeat(256), &r), ErrorKind::InvalidInput);
        assert_eq!(kinds("<domain>", "n", &r), ErrorKind::InvalidInput);
        assert_eq!(
            kinds("<vm><name>a</name></vm>", "n", &r),
            ErrorKind::InvalidInput
        );
        // vdb has no restored file: the copy would share the original's disk.
        assert_eq!(kinds(SAVED, "n", &r[..1]), ErrorKind::InvalidInput);
        let mut extra = restored();
        extra.push(RestoredDisk {
            target: "vdz".into(),
            path: "/r/z.raw".into(),
            format: ImageFormat::Raw,
        });
        assert_eq!(kinds(SAVED, "n", &extra), ErrorKind::InvalidInput);
    }
}
