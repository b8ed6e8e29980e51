//! Instant recovery: a backup booted as a new domain straight from Sluice's NBD exports of
//! its disks, before any byte is copied. This module owns the rules of that copy (a valid
//! new name no existing domain has, an export for every disk, character devices of its own);
//! the XML itself is `crate::hypervisor::xml_instant`'s, the exports are
//! [`super::RepoExport`]s (writable: the guest's writes land in their overlays, never in the
//! repository), and defining, starting and ending the domain is the libvirt adapter's
//! (`LibvirtHypervisor::{define_and_start, domain_state, end_instant_domain}`).

use std::path::Path;

use super::domain::check_new_name;
use super::error::{Error, Result};
use crate::hypervisor::xml_instant::{self, NbdDisk};

/// Where QEMU on the hypervisor reaches Sluice's NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdAddress {
    /// A name or address the server's certificate carries.
    pub host: String,
    pub port: u16,
    /// Whether the server speaks TLS (QEMU then must: `tls='yes'`).
    pub tls: bool,
}

/// One disk of the instant-recovery domain: its guest target and the export serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstantDisk {
    /// Guest target, as in `<target dev='vda'/>`.
    pub target: String,
    /// The export's name on Sluice's NBD server.
    pub export: String,
}

/// The domain XML that boots `domain_xml` (a backup's saved definition) as a new domain
/// `new_name` from the exports `disks` at `at`, its file and socket character devices
/// renamed `NEW_NAME.FILE` in `chardev_dir` (a directory on the hypervisor; none: beside the
/// original's). Refused with [`ErrorKind::Refused`] when `new_name` is in `existing`, with
/// [`ErrorKind::InvalidInput`] for a bad name, unparsable XML, a disk with no export or an
/// export for no disk.
pub fn instant_domain(
    domain_xml: &str,
    new_name: &str,
    disks: &[InstantDisk],
    at: &NbdAddress,
    chardev_dir: Option<&Path>,
    existing: &[String],
) -> Result<String> {
    check_new_name(new_name, existing)?;
    let nbd: Vec<NbdDisk> = disks
        .iter()
        .map(|d| NbdDisk {
            target: &d.target,
            export: &d.export,
            host: &at.host,
            port: at.port,
            tls: at.tls,
        })
        .collect();
    let what = || format!("instant-recovery domain {new_name}");
    let xml = xml_instant::instant_domain_xml(domain_xml, new_name, &nbd)
        .map_err(|e| Error::hypervisor(what(), e))?;
    xml_instant::rename_chardevs(&xml, new_name, chardev_dir)
        .map_err(|e| Error::hypervisor(what(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::xml_restore::tests::SAVED;
    use crate::restore::error::ErrorKind;

    fn disks() -> Vec<InstantDisk> {
        ["vda", "vdb"]
            .iter()
            .map(|t| InstantDisk {
                target: t.to_string(),
                export: format!("sluice-instant-3/{t}"),
            })
            .collect()
    }

    fn at() -> NbdAddress {
        NbdAddress {
            host: "10.0.3.9".into(),
            port: 10809,
            tls: true,
        }
    }

    #[test]
    fn the_copy_boots_from_the_exports_and_never_takes_a_name() {
        let xml = instant_domain(SAVED, "web-1-instant", &disks(), &at(), None, &[]).unwrap();
        assert!(xml.contains("<name>web-1-instant</name>"), "{xml}");
        assert!(xml.contains(
            "<source protocol='nbd' name='sluice-instant-3/vdb' tls='yes'><host name='10.0.3.9' port='10809'/></source>"
        ), "{xml}");
        let e =
            instant_domain(SAVED, "web-1", &disks(), &at(), None, &["web-1".into()]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        assert!(e.to_string().contains("web-1 already exists"), "{e}");
        for bad in ["", "a/b", "a\nb"] {
            let e = instant_domain(SAVED, bad, &disks(), &at(), None, &[]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
        let e = instant_domain(SAVED, "n", &disks()[..1], &at(), None, &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }
}
