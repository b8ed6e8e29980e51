//! libvirt domain XML for restores: a backup's saved definition rewritten for a copy (new
//! name, restored disks) and a copy's character devices moved to its own files. Pure
//! functions over text, unit-tested below; `crate::restore::{domain, volume}` decide when to
//! call them.
//!
//! The rewrite edits the saved text at positions found by parsing it (roxmltree), so
//! everything not listed here is kept byte for byte:
//! - `<name>` becomes the new name; `<uuid>` is dropped (libvirt generates a new one);
//! - each `<disk device='disk'>` is opened anew on its restored disk ([`CopySource`]):
//!   `type='file'` with `<source file>`, `type='block'` with `<source dev>` or
//!   `type='volume'` with `<source pool volume>`; its `<driver>` becomes
//!   `<driver name='qemu' type='raw|qcow2'/>` and its `<backingStore>` is dropped (the
//!   restored image is flat); its target, address, boot order, serial and the rest are kept;
//! - `<mac>` inside `<interface>` is dropped, so libvirt gives the copy new MAC addresses;
//! - `<nvram>` under `<os>` loses its path (keeping a `template`), so libvirt makes the
//!   copy its own UEFI variable store instead of sharing the original's;
//! - other devices (cdrom, floppy, ...) are kept as they are.
//!
//! Every `device='disk'` disk must have a restored file: a copy sharing the original's disk
//! would corrupt it. Errors are [`ErrorKind::InvalidInput`].

use std::ops::Range;
use std::path::Path;

use roxmltree::{Document, Node};

use super::xml::escape;
use super::{Error, ErrorKind, Result};

/// One disk of the copy: its guest target (`vda`), restored disk and image format (`raw`,
/// `qcow2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyDisk<'a> {
    pub target: &'a str,
    pub source: CopySource<'a>,
    pub format: &'a str,
}

/// Where a disk of the copy lives on the hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopySource<'a> {
    /// An image file (a restored file, or a volume of a file pool by its path).
    File(&'a Path),
    /// A block device (a volume of a logical or disk pool by its path).
    Block(&'a Path),
    /// A volume libvirt resolves itself (any other pool type).
    Volume { pool: &'a str, volume: &'a str },
}

/// `domain_xml` (a backup's saved definition) rewritten for a copy named `new_name` on the
/// image files of `disks` (see the module header). Names are not checked here.
pub fn copy_domain_xml(domain_xml: &str, new_name: &str, disks: &[CopyDisk]) -> Result<String> {
    let doc = parse("saved domain definition", domain_xml)?;
    let root = doc.root_element();
    let mut edits = identity_edits(root, new_name)?;
    if let Some(devices) = child(root, "devices") {
        let to = |d: &CopyDisk| d.target.to_string();
        let names = ("restored file", "restored disk");
        device_edits(devices, disks, to, names, disk_edits, &mut edits)?;
    }
    if let Some(nvram) = child(root, "os").and_then(|os| child(os, "nvram")) {
        let kept = match nvram.attribute("template") {
            Some(t) => format!("<nvram template='{}'/>", escape(t)),
            None => String::new(),
        };
        edits.push((nvram.range(), kept));
    }
    Ok(apply(domain_xml, edits))
}

/// Character devices whose `<source path=…>` names a host file or socket.
pub(super) const CHARDEVS: [&str; 4] = ["serial", "console", "channel", "parallel"];

/// `domain_xml` with the `<source path>` of every `unix` or `file` serial, console, channel
/// and parallel device moved into `dir` (same file name; `.2`, `.3`… appended when two
/// different paths share one). A console that names its serial's path keeps sharing it.
pub fn relocate_chardevs(domain_xml: &str, dir: &Path) -> Result<String> {
    move_chardevs(domain_xml, |old, moved| relocated(old, dir, moved))
}

/// `domain_xml` with the `<source path>` of every `unix` or `file` serial, console, channel
/// and parallel device renamed to `PREFIX-NAME` in its own directory (`/x/agent.sock` becomes
/// `/x/PREFIX-agent.sock`): a directory the original's QEMU already uses on its hypervisor,
/// so the copy needs no directory made for it there. A console that names its serial's path
/// keeps sharing it.
pub fn prefix_chardevs(domain_xml: &str, prefix: &str) -> Result<String> {
    move_chardevs(domain_xml, |old, _| {
        let p = Path::new(old);
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| invalid(format!("character device path {old:?} has no file name")))?;
        let new = p.with_file_name(format!("{prefix}-{name}"));
        new.to_str()
            .map(str::to_string)
            .ok_or_else(|| invalid(format!("character device path {old:?} is not utf-8")))
    })
}

/// `domain_xml` with each character device path `old` replaced by `new_path(old, moved)`
/// (`moved`: the `(old, new)` pairs so far); one old path gets one new path.
fn move_chardevs(
    domain_xml: &str,
    new_path: impl Fn(&str, &[(String, String)]) -> Result<String>,
) -> Result<String> {
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
                let n = new_path(&old, &moved)?;
                moved.push((old, n.clone()));
                n
            }
        };
        edits.push((attr.range(), format!("path='{}'", escape(&new))));
    }
    Ok(apply(domain_xml, edits))
}

pub(super) fn parse<'x>(what: &str, xml: &'x str) -> Result<Document<'x>> {
    Document::parse(xml).map_err(|e| invalid(format!("{what} does not parse")).with_source(e))
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

/// Text edits of a saved definition: byte range, replacement.
pub(super) type Edits = Vec<(Range<usize>, String)>;

/// The edits every copy of a saved domain starts with: the new name, and no `<uuid>` (libvirt
/// gives the copy one). Refuses a document whose root is not `<domain>`.
pub(super) fn identity_edits(root: Node, new_name: &str) -> Result<Edits> {
    if !root.has_tag_name("domain") {
        return Err(invalid(
            "saved domain definition has no <domain> root".into(),
        ));
    }
    let name = child(root, "name").ok_or_else(|| invalid("saved domain has no <name>".into()))?;
    let mut edits = vec![(name.range(), format!("<name>{}</name>", escape(new_name)))];
    if let Some(uuid) = child(root, "uuid") {
        edits.push((uuid.range(), String::new()));
    }
    Ok(edits)
}

/// The edits of a copy's `<devices>`: each `device='disk'` disk rewritten by `disk_edits` for
/// the entry of `disks` whose target (`target_of`) it has, and every `<mac>` dropped (libvirt
/// makes new ones). A disk of the definition without an entry, or an entry without a disk, is
/// refused; `names` says what an entry is in those errors (`("export", "exported disk")`).
pub(super) fn device_edits<D>(
    devices: Node,
    disks: &[D],
    target_of: impl Fn(&D) -> String,
    names: (&str, &str),
    disk_edits: impl Fn(Node, &D, &mut Edits) -> Result<()>,
    edits: &mut Edits,
) -> Result<()> {
    let (entry, entry_disk) = names;
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
            .position(|d| target_of(d) == target)
            .ok_or_else(|| invalid(format!("disk {target} of the saved domain has no {entry}")))?;
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
            "{entry_disk} {} is not a disk of the saved domain",
            target_of(&disks[i])
        )));
    }
    Ok(())
}

fn disk_edits(disk: Node, to: &CopyDisk, edits: &mut Edits) -> Result<()> {
    let first = disk
        .first_child()
        .ok_or_else(|| invalid(format!("disk {} of the saved domain is empty", to.target)))?;
    let utf8 = |p: &Path| {
        p.to_str()
            .map(escape)
            .ok_or_else(|| invalid(format!("restored disk {} is not utf-8", p.display())))
    };
    let driver = format!("<driver name='qemu' type='{}'/>", escape(to.format));
    let open = match to.source {
        CopySource::File(p) => format!(
            "<disk type='file' device='disk'>{driver}<source file='{}'/>",
            utf8(p)?
        ),
        CopySource::Block(p) => format!(
            "<disk type='block' device='disk'>{driver}<source dev='{}'/>",
            utf8(p)?
        ),
        CopySource::Volume { pool, volume } => format!(
            "<disk type='volume' device='disk'>{driver}<source pool='{}' volume='{}'/>",
            escape(pool),
            escape(volume)
        ),
    };
    edits.push((disk.range().start..first.range().start, open));
    for c in disk.children().filter(|c| {
        c.has_tag_name("driver") || c.has_tag_name("source") || c.has_tag_name("backingStore")
    }) {
        edits.push((c.range(), String::new()));
    }
    Ok(())
}

/// Applies non-overlapping `(range, replacement)` edits to `text`.
pub(super) fn apply(text: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = text.to_string();
    for (r, with) in edits {
        out.replace_range(r, &with);
    }
    out
}

pub(super) fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

pub(super) fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidInput, message)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A saved domain definition with a network disk, a file disk on a backing chain, a
    /// CD-ROM and an interface (also the fixture of `restore::domain`'s tests).
    pub(crate) const SAVED: &str = "<domain type='kvm'>
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

    fn restored() -> Vec<CopyDisk<'static>> {
        vec![
            CopyDisk {
                target: "vda",
                source: CopySource::File(Path::new("/r/a&b.raw")),
                format: "raw",
            },
            CopyDisk {
                target: "vdb",
                source: CopySource::File(Path::new("/r/vdb.qcow2")),
                format: "qcow2",
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
        let xml = copy_domain_xml(SAVED, "web-1-restored", &restored()).unwrap();
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
    fn volumes_block_devices_and_nvram_of_the_copy() {
        let saved = SAVED.replace(
            "<memory unit='KiB'>262144</memory>",
            "<memory unit='KiB'>262144</memory><os><type>hvm</type>\
             <loader readonly='yes' type='pflash'>/fw/CODE.fd</loader>\
             <nvram template='/fw/VARS.fd'>/var/lib/libvirt/qemu/nvram/web-1_VARS.fd</nvram></os>",
        );
        let disks = [
            CopyDisk {
                target: "vda",
                source: CopySource::Volume {
                    pool: "ceph",
                    volume: "web-2-vda.raw",
                },
                format: "raw",
            },
            CopyDisk {
                target: "vdb",
                source: CopySource::Block(Path::new("/dev/vg/web-2-vdb")),
                format: "raw",
            },
        ];
        let xml = copy_domain_xml(&saved, "web-2", &disks).unwrap();
        let doc = Document::parse(&xml).unwrap();
        let vda = disk(&doc, "vda");
        assert_eq!(vda.attribute("type"), Some("volume"));
        let src = child(vda, "source").unwrap();
        assert_eq!(src.attribute("pool"), Some("ceph"));
        assert_eq!(src.attribute("volume"), Some("web-2-vda.raw"));
        let vdb = disk(&doc, "vdb");
        assert_eq!(vdb.attribute("type"), Some("block"));
        assert_eq!(
            child(vdb, "source").unwrap().attribute("dev"),
            Some("/dev/vg/web-2-vdb")
        );
        assert!(xml.contains("<nvram template='/fw/VARS.fd'/>"), "{xml}");
        assert!(!xml.contains("web-1_VARS"), "{xml}");
        assert!(xml.contains("<loader readonly='yes' type='pflash'>/fw/CODE.fd</loader>"));
        let bare = saved.replace(" template='/fw/VARS.fd'", "");
        let xml = copy_domain_xml(&bare, "web-2", &disks).unwrap();
        assert!(!xml.contains("nvram"), "{xml}");
    }

    #[test]
    fn prefixed_chardevs_stay_in_their_directories() {
        let xml = "<domain><name>a</name><devices>
  <serial type='file'><source path='/x/console.log'/><target port='0'/></serial>
  <serial type='unix'><source mode='bind' path='/x/agent.sock'/><target port='1'/></serial>
  <serial type='pty'><source path='/dev/pts/3'/><target port='2'/></serial>
  <console type='file'><source path='/x/console.log'/><target type='serial' port='0'/></console>
  <channel type='unix'><source mode='bind' path='/y/agent.sock'/><target type='virtio'/></channel>
</devices></domain>";
        let out = prefix_chardevs(xml, "copy").unwrap();
        let doc = Document::parse(&out).unwrap();
        let paths: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("source"))
            .filter_map(|n| n.attribute("path"))
            .collect();
        assert_eq!(
            paths,
            [
                "/x/copy-console.log",
                "/x/copy-agent.sock",
                "/dev/pts/3",
                "/x/copy-console.log",
                "/y/copy-agent.sock"
            ]
        );
        let e = prefix_chardevs(
            "<domain><devices><serial type='unix'><source path='/'/></serial></devices></domain>",
            "c",
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn bad_xml_and_unmatched_disks_are_refused() {
        let kind =
            |xml: &str, disks: &[CopyDisk]| copy_domain_xml(xml, "n", disks).unwrap_err().kind();
        let r = restored();
        assert_eq!(kind("<domain>", &r), ErrorKind::InvalidInput);
        assert_eq!(kind("<vm><name>a</name></vm>", &r), ErrorKind::InvalidInput);
        // vdb has no restored file: the copy would share the original's disk.
        assert_eq!(kind(SAVED, &r[..1]), ErrorKind::InvalidInput);
        let mut extra = restored();
        extra.push(CopyDisk {
            target: "vdz",
            source: CopySource::File(Path::new("/r/z.raw")),
            format: "raw",
        });
        assert_eq!(kind(SAVED, &extra), ErrorKind::InvalidInput);
    }
}
