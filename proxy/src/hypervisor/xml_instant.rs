//! libvirt domain XML for instant recovery: a backup's saved definition rewritten for a copy
//! that runs straight from Sluice's NBD exports, its character devices renamed for the copy,
//! and the NBD sources of a domain read back (to recognise the copy later). Pure functions
//! over text, unit-tested below; `crate::restore::instant` decides when to call them.
//!
//! The rewrite edits the saved text at positions found by parsing it (roxmltree), so
//! everything not listed here is kept byte for byte:
//! - `<name>` becomes the new name; `<uuid>` is dropped (libvirt generates a new one);
//! - each `<disk device='disk'>` becomes a network disk on its export:
//!   `<disk type='network' device='disk'><driver name='qemu' type='raw'/><source
//!   protocol='nbd' name='EXPORT' tls='yes'><host name='HOST' port='PORT'/></source>…`
//!   (`tls='yes'` only when the NBD server speaks TLS); its `<driver>`, `<source>` and
//!   `<backingStore>` are replaced, its target, address, boot order, serial and the rest kept;
//! - `<mac>` inside `<interface>` is dropped, so libvirt gives the copy new MAC addresses;
//! - `<nvram>` in `<os>` is dropped: the copy must not share the original's UEFI variable
//!   store, and libvirt makes the copy its own from the loader's template;
//! - other devices (cdrom, floppy, ...) are kept as they are.
//!
//! Every `device='disk'` disk must have an export: a copy sharing the original's disk would
//! corrupt it. Errors are [`ErrorKind::InvalidInput`].

use std::path::Path;

use roxmltree::Node;

use super::xml::escape;
use super::xml_restore::{
    apply, child, device_edits, identity_edits, invalid, parse, Edits, CHARDEVS,
};
use super::Result;

/// One disk of the copy: its guest target (`vda`) and the NBD export that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdDisk<'a> {
    pub target: &'a str,
    /// The export name the NBD server knows it by.
    pub export: &'a str,
    /// What QEMU on the hypervisor dials (a name or address the server certificate carries).
    pub host: &'a str,
    pub port: u16,
    /// Whether QEMU must speak TLS (`tls='yes'`).
    pub tls: bool,
}

/// `domain_xml` (a backup's saved definition) rewritten for a copy named `new_name` whose
/// disks are the NBD exports `disks` (see the module header). Names are not checked here.
pub fn instant_domain_xml(domain_xml: &str, new_name: &str, disks: &[NbdDisk]) -> Result<String> {
    let doc = parse("saved domain definition", domain_xml)?;
    let root = doc.root_element();
    let mut edits = identity_edits(root, new_name)?;
    if let Some(nvram) = child(root, "os").and_then(|os| child(os, "nvram")) {
        edits.push((nvram.range(), String::new()));
    }
    let devices =
        child(root, "devices").ok_or_else(|| invalid("saved domain has no <devices>".into()))?;
    let to = |d: &NbdDisk| d.target.to_string();
    device_edits(
        devices,
        disks,
        to,
        ("export", "exported disk"),
        disk_edits,
        &mut edits,
    )?;
    Ok(apply(domain_xml, edits))
}

fn disk_edits(disk: Node, to: &NbdDisk, edits: &mut Edits) -> Result<()> {
    let first = disk
        .first_child()
        .ok_or_else(|| invalid(format!("disk {} of the saved domain is empty", to.target)))?;
    let tls = if to.tls { " tls='yes'" } else { "" };
    let open = format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <source protocol='nbd' name='{}'{tls}><host name='{}' port='{}'/></source>",
        escape(to.export),
        escape(to.host),
        to.port
    );
    edits.push((disk.range().start..first.range().start, open));
    for c in disk.children().filter(|c| {
        c.has_tag_name("driver") || c.has_tag_name("source") || c.has_tag_name("backingStore")
    }) {
        edits.push((c.range(), String::new()));
    }
    Ok(())
}

/// `domain_xml` with the `<source path>` of every `unix` or `file` serial, console, channel
/// and parallel device renamed for the copy `new_name`: `DIR/NEW_NAME.FILE`, where `DIR` is
/// `dir` if given, else the original's own directory (on the hypervisor), and `FILE` the
/// original's file name (`.2`, `.3`… appended when two different paths would meet). A console
/// that names its serial's path keeps sharing it. Channels without a path (libvirt makes one)
/// and ptys are left alone.
pub fn rename_chardevs(domain_xml: &str, new_name: &str, dir: Option<&Path>) -> Result<String> {
    let doc = parse("domain definition", domain_xml)?;
    let Some(devices) = child(doc.root_element(), "devices") else {
        return Ok(domain_xml.to_string());
    };
    let mut moved: Vec<(String, String)> = Vec::new();
    let mut edits = Vec::new();
    for dev in devices
        .children()
        .filter(|n| CHARDEVS.iter().any(|t| n.has_tag_name(*t)))
    {
        if !matches!(dev.attribute("type"), Some("unix" | "file")) {
            continue;
        }
        let Some(attr) = child(dev, "source").and_then(|s| s.attribute_node("path")) else {
            continue;
        };
        let old = attr.value().to_string();
        let new = match moved.iter().find(|(o, _)| *o == old) {
            Some((_, n)) => n.clone(),
            None => {
                let n = renamed(&old, new_name, dir, &moved)?;
                moved.push((old, n.clone()));
                n
            }
        };
        edits.push((attr.range(), format!("path='{}'", escape(&new))));
    }
    Ok(apply(domain_xml, edits))
}

/// The copy's path for `old`, unique among those already `moved`.
fn renamed(
    old: &str,
    new_name: &str,
    dir: Option<&Path>,
    moved: &[(String, String)],
) -> Result<String> {
    let path = Path::new(old);
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| invalid(format!("character device path {old:?} has no file name")))?;
    let parent = dir.or(path.parent()).unwrap_or(Path::new("/"));
    let base = parent.join(format!("{new_name}.{file}"));
    let base = base
        .to_str()
        .ok_or_else(|| invalid(format!("directory {} is not utf-8", parent.display())))?;
    let mut candidate = base.to_string();
    let mut n = 1;
    while moved.iter().any(|(_, m)| *m == candidate) {
        n += 1;
        candidate = format!("{base}.{n}");
    }
    Ok(candidate)
}

/// The export names of `domain_xml`'s NBD network disks, in order (how a copy made by
/// [`instant_domain_xml`] is recognised).
pub fn nbd_exports(domain_xml: &str) -> Result<Vec<String>> {
    let doc = parse("domain definition", domain_xml)?;
    let Some(devices) = child(doc.root_element(), "devices") else {
        return Ok(Vec::new());
    };
    Ok(devices
        .children()
        .filter(|n| n.has_tag_name("disk") && n.attribute("type") == Some("network"))
        .filter_map(|d| child(d, "source"))
        .filter(|s| s.attribute("protocol") == Some("nbd"))
        .filter_map(|s| s.attribute("name").map(String::from))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::xml_restore::tests::SAVED;
    use crate::hypervisor::ErrorKind;
    use roxmltree::Document;

    fn exports() -> Vec<NbdDisk<'static>> {
        ["vda", "vdb"]
            .into_iter()
            .zip(["instant-7/vda", "instant-7/v&b"])
            .map(|(target, export)| NbdDisk {
                target,
                export,
                host: "proxy.example",
                port: 10809,
                tls: true,
            })
            .collect()
    }

    fn disk<'a, 'i>(doc: &'a Document<'i>, target: &str) -> Node<'a, 'i> {
        doc.descendants()
            .find(|n| {
                n.has_tag_name("disk")
                    && child(*n, "target").and_then(|t| t.attribute("dev")) == Some(target)
            })
            .unwrap()
    }

    #[test]
    fn every_disk_becomes_an_nbd_source_over_tls_and_the_identity_is_new() {
        let saved = SAVED.replace(
            "<memory",
            "<os><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>\
             <nvram>/var/lib/libvirt/qemu/nvram/web-1_VARS.fd</nvram></os>\n  <memory",
        );
        let xml = instant_domain_xml(&saved, "web-1-instant", &exports()).unwrap();
        let doc = Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(child(root, "name").unwrap().text(), Some("web-1-instant"));
        assert!(child(root, "uuid").is_none());
        assert!(doc.descendants().all(|n| !n.has_tag_name("mac")));
        assert!(doc.descendants().all(|n| !n.has_tag_name("nvram")));
        assert!(xml.contains("OVMF_CODE.fd</loader>"));
        for (target, export) in [("vda", "instant-7/vda"), ("vdb", "instant-7/v&b")] {
            let d = disk(&doc, target);
            assert_eq!(d.attribute("type"), Some("network"));
            assert_eq!(d.attribute("device"), Some("disk"));
            let driver = child(d, "driver").unwrap();
            assert_eq!(driver.attribute("type"), Some("raw"));
            let sources: Vec<_> = d.children().filter(|c| c.has_tag_name("source")).collect();
            assert_eq!(sources.len(), 1);
            let s = sources[0];
            assert_eq!(
                (
                    s.attribute("protocol"),
                    s.attribute("name"),
                    s.attribute("tls")
                ),
                (Some("nbd"), Some(export), Some("yes"))
            );
            let host = child(s, "host").unwrap();
            assert_eq!(host.attribute("name"), Some("proxy.example"));
            assert_eq!(host.attribute("port"), Some("10809"));
            assert!(child(d, "backingStore").is_none());
            assert_eq!(d.children().filter(|c| c.has_tag_name("driver")).count(), 1);
        }
        assert!(child(disk(&doc, "vda"), "boot").is_some());
        assert_eq!(
            child(disk(&doc, "sda"), "source")
                .unwrap()
                .attribute("file"),
            Some("/iso/install.iso")
        );
        assert_eq!(
            nbd_exports(&xml).unwrap(),
            ["instant-7/vda", "instant-7/v&b"]
        );
        assert_eq!(nbd_exports(SAVED).unwrap(), ["x"]);
    }

    #[test]
    fn without_tls_the_source_says_nothing_of_it() {
        let mut d = exports();
        d.iter_mut().for_each(|d| d.tls = false);
        let xml = instant_domain_xml(SAVED, "n", &d).unwrap();
        assert!(!xml.contains("tls="), "{xml}");
    }

    #[test]
    fn unmatched_disks_and_bad_xml_are_refused() {
        let kind = |xml: &str, d: &[NbdDisk]| instant_domain_xml(xml, "n", d).unwrap_err().kind();
        let e = exports();
        assert_eq!(kind(SAVED, &e[..1]), ErrorKind::InvalidInput);
        let mut extra = exports();
        extra.push(NbdDisk {
            target: "vdz",
            ..e[0]
        });
        assert_eq!(kind(SAVED, &extra), ErrorKind::InvalidInput);
        assert_eq!(kind("<domain>", &e), ErrorKind::InvalidInput);
        assert_eq!(kind("<vm><name>a</name></vm>", &e), ErrorKind::InvalidInput);
    }

    #[test]
    fn chardevs_are_renamed_for_the_copy_beside_the_original_or_in_a_directory() {
        let xml = "<domain><name>a</name><devices>
  <serial type='file'><source path='/x/console.log'/><target port='0'/></serial>
  <serial type='unix'><source mode='bind' path='/x/agent.sock'/><target port='1'/></serial>
  <serial type='pty'><source path='/dev/pts/3'/><target port='2'/></serial>
  <console type='file'><source path='/x/console.log'/><target type='serial' port='0'/></console>
  <channel type='unix'><source mode='bind' path='/y/agent.sock'/><target type='virtio'/></channel>
  <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>";
        let paths = |out: &str| -> Vec<String> {
            let doc = Document::parse(out).unwrap();
            doc.descendants()
                .filter(|n| n.has_tag_name("source"))
                .filter_map(|n| n.attribute("path").map(String::from))
                .collect()
        };
        let beside = rename_chardevs(xml, "c", None).unwrap();
        assert_eq!(
            paths(&beside),
            [
                "/x/c.console.log",
                "/x/c.agent.sock",
                "/dev/pts/3",
                "/x/c.console.log",
                "/y/c.agent.sock"
            ]
        );
        let moved = rename_chardevs(xml, "c", Some(Path::new("/run/r"))).unwrap();
        assert_eq!(
            paths(&moved),
            [
                "/run/r/c.console.log",
                "/run/r/c.agent.sock",
                "/dev/pts/3",
                "/run/r/c.console.log",
                "/run/r/c.agent.sock.2"
            ]
        );
        assert!(rename_chardevs("<domain", "c", None).is_err());
    }
}
