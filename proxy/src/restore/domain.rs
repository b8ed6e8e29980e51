//! Restore as a new libvirt domain: the domain definition saved in a backup's manifest,
//! rewritten for a new name and the restored disk files.
//!
//! Owns only the XML rewrite; it never talks to libvirt. The caller lists the existing
//! domain names (so an existing domain is never clobbered), restores the disks (see
//! [`crate::restore::restore_disk`]), then defines the returned XML.
//!
//! The rewrite edits the saved text at positions found by parsing it (roxmltree), so
//! everything not listed here is kept byte for byte:
//! - `<name>` becomes the new name; `<uuid>` is dropped (libvirt generates a new one);
//! - each `<disk device='disk'>` becomes `type='file'`, its `<driver>` becomes
//!   `<driver name='qemu' type='raw|qcow2'/>`, its `<source>` points at the restored file,
//!   and its `<backingStore>` is dropped (the restored image is flat); its target, address,
//!   boot order, serial and the rest are kept;
//! - `<mac>` inside `<interface>` is dropped, so libvirt gives the copy new MAC addresses;
//! - other devices (cdrom, floppy, ...) are kept as they are.
//!
//! Every `device='disk'` disk must have a restored file: a copy sharing the original's disk
//! would corrupt it.
//!
//! [`relocate_chardevs`] gives a copy that runs beside the original its own character device
//! files (serial consoles logged to a file, unix sockets): two QEMUs binding one socket path
//! or truncating one log would take them from the original.

use std::ops::Range;
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};

use super::error::{Error, ErrorKind, Result};
use super::file::ImageFormat;

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
    check_name(new_name)?;
    if existing.iter().any(|n| n == new_name) {
        return Err(Error::new(
            ErrorKind::Refused,
            format!("domain {new_name} already exists"),
        ));
    }
    let doc = Document::parse(domain_xml)
        .map_err(|e| invalid("saved domain definition does not parse".into()).with_source(e))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(invalid(
            "saved domain definition has no <domain> root".into(),
        ));
    }
    let mut edits = Vec::new();
    let name = child(root, "name").ok_or_else(|| invalid("saved domain has no <name>".into()))?;
    edits.push((name.range(), format!("<name>{}</name>", esc(new_name))));
    if let Some(uuid) = child(root, "uuid") {
        edits.push((uuid.range(), String::new()));
    }
    if let Some(devices) = child(root, "devices") {
        device_edits(devices, disks, &mut edits)?;
    }
    Ok(apply(domain_xml, edits))
}

/// Character devices whose `<source path=…>` names a host file or socket.
const CHARDEVS: [&str; 4] = ["serial", "console", "channel", "parallel"];

/// `domain_xml` with the `<source path>` of every `unix` or `file` serial, console, channel
/// and parallel device moved into `dir` (same file name; `.2`, `.3`… appended when two
/// different paths share one). A console that names its serial's path keeps sharing it.
pub fn relocate_chardevs(domain_xml: &str, dir: &Path) -> Result<String> {
    let doc = Document::parse(domain_xml)
        .map_err(|e| invalid("domain definition does not parse".into()).with_source(e))?;
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
                let n = relocated(&old, dir, &moved)?;
                moved.push((old, n.clone()));
                n
            }
        };
        edits.push((attr.range(), format!("path='{}'", esc(&new))));
    }
    Ok(apply(domain_xml, edits))
}

/// The new path of `old` in `dir`, unique among those already `moved`.
fn relocated(old: &str, dir: &Path, moved: &[(String, String)]) -> Result<String> {
    let name = Path::new(old)
        .file_name()
        .ok_or_else(|| invalid(format!("character device path {old:?} has no file name")))?;
    let base = dir.join(name);
    let base = base
        .to_str()
        .ok_or_else(|| invalid(format!("directory {} is not utf-8", dir.display())))?;
    let mut candidate = base.to_string();
    let mut n = 1;
    while moved.iter().any(|(_, m)| *m == candidate) {
        n += 1;
        candidate = format!("{base}.{n}");
    }
    Ok(candidate)
}

fn device_edits(
    devices: Node,
    disks: &[RestoredDisk],
    edits: &mut Vec<(Range<usize>, String)>,
) -> Result<()> {
    let mut used = vec![false; disks.len()];
    for disk in devices.children().filter(|n| n.has_tag_name("disk")) {
        if disk.attribute("device").unwrap_or("disk") != "disk" {
            continue;
        }
        let target = child(disk, "target")
            .and_then(|t| t.attribute("dev"))
            .ok_or_else(|| invalid("a disk of the saved domain has no target".into()))?;
        let i = disks
            .iter()
            .position(|d| d.target == target)
            .ok_or_else(|| {
                invalid(format!(
                    "disk {target} of the saved domain has no restored file"
                ))
            })?;
        used[i] = true;
        disk_edits(disk, &disks[i], edits)?;
    }
    for interface in devices.children().filter(|n| n.has_tag_name("interface")) {
        if let Some(mac) = child(interface, "mac") {
            edits.push((mac.range(), String::new()));
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(invalid(format!(
            "restored disk {} is not a disk of the saved domain",
            disks[i].target
        )));
    }
    Ok(())
}

fn disk_edits(
    disk: Node,
    to: &RestoredDisk,
    edits: &mut Vec<(Range<usize>, String)>,
) -> Result<()> {
    let first = disk
        .first_child()
        .ok_or_else(|| invalid(format!("disk {} of the saved domain is empty", to.target)))?;
    let path = to
        .path
        .to_str()
        .ok_or_else(|| invalid(format!("restored file {} is not utf-8", to.path.display())))?;
    let format = match to.format {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
    };
    let mut open = String::from("<disk type='file' device='disk'>");
    open.push_str(&format!("<driver name='qemu' type='{format}'/>"));
    open.push_str(&format!("<source file='{}'/>", esc(path)));
    edits.push((disk.range().start..first.range().start, open));
    for c in disk.children().filter(|c| {
        c.has_tag_name("driver") || c.has_tag_name("source") || c.has_tag_name("backingStore")
    }) {
        edits.push((c.range(), String::new()));
    }
    Ok(())
}

/// Applies non-overlapping `(range, replacement)` edits to `text`.
fn apply(text: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = text.to_string();
    for (r, with) in edits {
        out.replace_range(r, &with);
    }
    out
}

fn check_name(name: &str) -> Result<()> {
    let bad = |c: char| c.is_control() || c == '/';
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(bad) {
        return Err(invalid(format!(
            "domain name {name:?} must be 1-{MAX_NAME} bytes without '/' or control characters"
        )));
    }
    Ok(())
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidInput, message)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "<domain type='kvm'>
  <name>web-1</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='KiB'>262144</memory>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='nbd' name='x'><host transport='unix' socket='/s'/></source>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type=\"file\" device=\"disk\">
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web-1-b.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/base.qcow2'/></backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>";

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

    fn disk<'a, 'i>(doc: &'a Document<'i>, target: &str) -> Node<'a, 'i> {
        doc.descendants()
            .find(|n| {
                n.has_tag_name("disk")
                    && child(*n, "target").and_then(|t| t.attribute("dev")) == Some(target)
            })
            .unwrap()
    }

    #[test]
    fn name_uuid_disks_and_macs_are_rewritten() {
        let xml = restore_as_domain(SAVED, "web-1-restored", &restored(), &[]).unwrap();
        let doc = Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(child(root, "name").unwrap().text(), Some("web-1-restored"));
        assert!(child(root, "uuid").is_none());
        assert_eq!(child(root, "memory").unwrap().text(), Some("262144"));
        assert!(doc.descendants().all(|n| !n.has_tag_name("mac")));
        for (target, file, format) in [
            ("vda", "/r/a&b.raw", "raw"),
            ("vdb", "/r/vdb.qcow2", "qcow2"),
        ] {
            let d = disk(&doc, target);
            assert_eq!(d.attribute("type"), Some("file"));
            let sources: Vec<_> = d.children().filter(|c| c.has_tag_name("source")).collect();
            assert_eq!(sources.len(), 1);
            assert_eq!(sources[0].attribute("file"), Some(file));
            assert_eq!(child(d, "driver").unwrap().attribute("type"), Some(format));
            assert!(child(d, "backingStore").is_none());
        }
        assert!(child(disk(&doc, "vda"), "boot").is_some());
        let cdrom = disk(&doc, "sda");
        assert_eq!(
            child(cdrom, "source").unwrap().attribute("file"),
            Some("/iso/install.iso")
        );
        assert!(xml.contains("<source network='default'/>"));
    }

    #[test]
    fn chardev_paths_move_into_the_new_directory() {
        let xml = "<domain><name>a</name><devices>
  <serial type='file'><source path='/x/console.log'/><target port='0'/></serial>
  <serial type='unix'><source mode='bind' path='/x/agent.sock'/><target port='1'/></serial>
  <serial type='pty'><source path='/dev/pts/3'/><target port='2'/></serial>
  <console type='file'><source path='/x/console.log'/><target type='serial' port='0'/></console>
  <channel type='unix'><source mode='bind' path='/y/agent.sock'/><target type='virtio'/></channel>
  <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>";
        let out = relocate_chardevs(xml, Path::new("/new")).unwrap();
        let doc = Document::parse(&out).unwrap();
        let paths: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("source"))
            .filter_map(|n| n.attribute("path"))
            .collect();
        assert_eq!(
            paths,
            [
                "/new/console.log",
                "/new/agent.sock",
                "/dev/pts/3",
                "/new/console.log",
                "/new/agent.sock.2"
            ]
        );
        assert!(out.contains("mode='bind' path='/new/agent.sock'"));
        assert!(relocate_chardevs("<domain", Path::new("/n")).is_err());
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
