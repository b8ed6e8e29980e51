//! libvirt XML: the domain's disks, checkpoint and backup documents. Built and parsed only
//! here; pure functions, unit-tested below.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::{CheckpointDisk, CheckpointInfo, DiskInfo, DiskKind, Error, ErrorKind, Result};

/// A disk as the domain XML describes it (capacity comes from elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    pub target: String,
    pub source: Option<PathBuf>,
    pub format: Option<String>,
    pub kind: DiskKind,
}

impl DomainDisk {
    pub fn into_info(self, capacity: u64) -> DiskInfo {
        DiskInfo {
            target: self.target,
            source: self.source,
            format: self.format,
            kind: self.kind,
            capacity,
        }
    }
}

/// One disk of a running backup, from `virDomainBackupGetXMLDesc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDiskDesc {
    pub disk: String,
    pub export_name: String,
    pub export_bitmap: Option<String>,
}

fn parse<'x>(what: &str, xml: &'x str) -> Result<roxmltree::Document<'x>> {
    roxmltree::Document::parse(xml)
        .map_err(|e| Error::new(ErrorKind::Failed, format!("unparsable {what} xml")).with_source(e))
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

/// The block disks (`device='disk'`) of a domain XML, in document order.
pub fn domain_disks(xml: &str) -> Result<Vec<DomainDisk>> {
    let doc = parse("domain", xml)?;
    let Some(devices) = child(doc.root_element(), "devices") else {
        return Ok(Vec::new());
    };
    let disks = devices
        .children()
        .filter(|n| n.has_tag_name("disk") && n.attribute("device").unwrap_or("disk") == "disk")
        .filter_map(|disk| {
            let target = child(disk, "target")?.attribute("dev")?.to_string();
            let source = child(disk, "source")
                .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
                .map(PathBuf::from);
            let format = child(disk, "driver")
                .and_then(|d| d.attribute("type"))
                .map(str::to_string);
            let kind = match disk.attribute("type").unwrap_or("file") {
                "file" => DiskKind::File,
                "block" => DiskKind::Block,
                "network" => DiskKind::Network,
                _ => DiskKind::Other,
            };
            Some(DomainDisk {
                target,
                source,
                format,
                kind,
            })
        })
        .collect();
    Ok(disks)
}

/// The domain's name and UUID from its XML.
pub fn domain_identity(xml: &str) -> Result<(String, String)> {
    let doc = parse("domain", xml)?;
    let text = |tag| {
        child(doc.root_element(), tag)
            .and_then(|n| n.text())
            .unwrap_or("")
            .to_string()
    };
    Ok((text("name"), text("uuid")))
}

/// Whether the domain XML declares a guest-agent channel, and whether libvirt saw it connect.
pub fn agent_channel(xml: &str) -> Result<Option<bool>> {
    let doc = parse("domain", xml)?;
    let channel = doc
        .descendants()
        .filter(|n| n.has_tag_name("channel"))
        .find_map(|c| {
            let target = child(c, "target")?;
            (target.attribute("name") == Some("org.qemu.guest_agent.0"))
                .then(|| target.attribute("state") == Some("connected"))
        });
    Ok(channel)
}

/// Escapes text for an XML attribute or element.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Checks a checkpoint, bitmap or disk name: 1..=64 of `[A-Za-z0-9._-]`, not starting with
/// a dot or dash (it becomes a qcow2 bitmap name, a file name and a QMP argument).
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(ok_char)
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("invalid {what} name {name:?}"),
        ))
    }
}

/// `<domaincheckpoint>` creating `name` with a bitmap on each disk in `with_bitmap` and none on
/// the rest of `all_disks`.
pub fn checkpoint_xml(name: &str, all_disks: &[String], with_bitmap: &[String]) -> String {
    let mut xml = format!("<domaincheckpoint><name>{}</name><disks>", escape(name));
    for disk in all_disks {
        let mode = if with_bitmap.contains(disk) {
            "bitmap"
        } else {
            "no"
        };
        let _ = write!(xml, "<disk name='{}' checkpoint='{mode}'/>", escape(disk));
    }
    xml.push_str("</disks></domaincheckpoint>");
    xml
}

/// `<domaincheckpoint>` to redefine (metadata only) a checkpoint whose bitmaps were added
/// offline at `creation_time` (seconds since the epoch).
pub fn redefine_checkpoint_xml(
    name: &str,
    creation_time: u64,
    all_disks: &[String],
    with_bitmap: &[String],
) -> String {
    let created = format!("<creationTime>{creation_time}</creationTime><disks>");
    checkpoint_xml(name, all_disks, with_bitmap).replacen("<disks>", &created, 1)
}

/// Inputs of a pull-mode `<domainbackup>`.
#[derive(Debug, Clone)]
pub struct PullBackup<'a> {
    pub incremental_from: Option<&'a str>,
    pub socket: &'a std::path::Path,
    /// Serve over TCP with TLS instead of the socket. A disk exported without a scratch
    /// path then gets its scratch file from libvirt, beside its image on the hypervisor
    /// (`IMAGE.CHECKPOINT`); with no such disk read in full in an incremental, the
    /// `<disks>` element is left out altogether (libvirt exports every disk).
    pub tcp: Option<&'a super::TcpServer>,
    pub all_disks: &'a [String],
    /// Disks to export.
    pub export: &'a [ExportDisk],
}

/// One disk a pull-mode backup exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDisk {
    pub name: String,
    /// Its scratch (fleecing) file on the hypervisor; `None`: libvirt's choice (remote only).
    pub scratch: Option<PathBuf>,
    /// Read in full even in an incremental (`backupmode='full'`: it carries no bitmap).
    pub full: bool,
}

/// `<domainbackup mode='pull'>` exporting `export` over a unix socket or TCP with TLS.
pub fn backup_xml(b: &PullBackup<'_>) -> String {
    let mut xml = String::from("<domainbackup mode='pull'>");
    if let Some(cp) = b.incremental_from {
        let _ = write!(xml, "<incremental>{}</incremental>", escape(cp));
    }
    let per_disk = b.incremental_from.is_some() && b.export.iter().any(|e| e.full);
    let default_scratch = b.export.iter().all(|e| e.scratch.is_none());
    match b.tcp {
        Some(t) => {
            let _ = write!(
                xml,
                "<server transport='tcp' name='{}' port='{}' tls='yes'/>",
                escape(&t.listen),
                t.port
            );
            if default_scratch && !per_disk && b.export.len() == b.all_disks.len() {
                xml.push_str("</domainbackup>");
                return xml;
            }
        }
        None => {
            let socket = escape(&b.socket.to_string_lossy());
            let _ = write!(xml, "<server transport='unix' socket='{socket}'/>");
        }
    }
    xml.push_str("<disks>");
    for disk in b.all_disks {
        let Some(e) = b.export.iter().find(|e| &e.name == disk) else {
            let _ = write!(xml, "<disk name='{}' backup='no'/>", escape(disk));
            continue;
        };
        let mode = if e.full && b.incremental_from.is_some() {
            " backupmode='full'"
        } else {
            ""
        };
        let _ = write!(xml, "<disk name='{}'{mode}", escape(disk));
        match &e.scratch {
            Some(scratch) => {
                let scratch = escape(&scratch.to_string_lossy());
                let _ = write!(
                    xml,
                    " backup='yes' type='file'><driver type='qcow2'/><scratch file='{scratch}'/></disk>"
                );
            }
            // `backup='yes'` goes only with `type` and a scratch path (the schema): a disk
            // named without either is backed up, its scratch file placed by libvirt.
            None => xml.push_str("/>"),
        }
    }
    xml.push_str("</disks></domainbackup>");
    xml
}

/// The exports of a running pull-mode backup.
pub fn backup_desc(xml: &str) -> Result<Vec<BackupDiskDesc>> {
    let doc = parse("backup", xml)?;
    let Some(disks) = child(doc.root_element(), "disks") else {
        return Ok(Vec::new());
    };
    let exports = disks
        .children()
        .filter(|n| n.has_tag_name("disk") && n.attribute("backup") == Some("yes"))
        .filter_map(|d| {
            let disk = d.attribute("name")?.to_string();
            Some(BackupDiskDesc {
                export_name: d.attribute("exportname").unwrap_or(&disk).to_string(),
                export_bitmap: d.attribute("exportbitmap").map(str::to_string),
                disk,
            })
        })
        .collect();
    Ok(exports)
}

/// A `<domaincheckpoint>` document.
pub fn checkpoint_info(xml: &str) -> Result<CheckpointInfo> {
    let doc = parse("checkpoint", xml)?;
    let root = doc.root_element();
    let text =
        |node: Option<roxmltree::Node<'_, '_>>| node.and_then(|n| n.text()).map(str::to_string);
    let name = text(child(root, "name"))
        .ok_or_else(|| Error::new(ErrorKind::Failed, "checkpoint xml without a name"))?;
    let parent = text(child(root, "parent").and_then(|p| child(p, "name")));
    let creation_time = text(child(root, "creationTime")).and_then(|t| t.trim().parse().ok());
    let disks = child(root, "disks")
        .map(|d| {
            d.children()
                .filter(|n| n.has_tag_name("disk") && n.attribute("checkpoint") == Some("bitmap"))
                .filter_map(|n| {
                    let disk = n.attribute("name")?.to_string();
                    let bitmap = n.attribute("bitmap").unwrap_or(&name).to_string();
                    Some(CheckpointDisk { disk, bitmap })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CheckpointInfo {
        name,
        parent,
        creation_time,
        disks,
        xml: Some(xml.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='qemu'><name>vm1</name><uuid>1234</uuid><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='/img/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
      <disk type='block' device='disk'><driver name='qemu' type='raw'/>
        <source dev='/dev/sdb'/><target dev='vdb' bus='virtio'/></disk>
      <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
      <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/></channel>
    </devices></domain>"#;

    #[test]
    fn domain_disks_skip_cdroms_and_read_sources() {
        let disks = domain_disks(DOMAIN).unwrap();
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].target, "vda");
        assert_eq!(
            disks[0].source.as_deref(),
            Some(std::path::Path::new("/img/a.qcow2"))
        );
        assert_eq!(disks[0].format.as_deref(), Some("qcow2"));
        assert_eq!(
            disks[1].source.as_deref(),
            Some(std::path::Path::new("/dev/sdb"))
        );
        assert_eq!(
            domain_identity(DOMAIN).unwrap(),
            ("vm1".into(), "1234".into())
        );
        assert_eq!(agent_channel(DOMAIN).unwrap(), Some(false));
    }

    #[test]
    fn bad_xml_is_an_error_not_a_panic() {
        assert!(domain_disks("<domain><devices>").is_err());
        assert!(checkpoint_info("<domaincheckpoint/>").is_err());
    }

    #[test]
    fn backup_xml_escapes_and_marks_unexported_disks() {
        let all = vec!["vda".to_string(), "vdb".to_string()];
        let export = vec![ExportDisk {
            name: "vda".into(),
            scratch: Some(PathBuf::from("/s/a'b.qcow2")),
            full: false,
        }];
        let xml = backup_xml(&PullBackup {
            incremental_from: Some("cp1"),
            socket: std::path::Path::new("/s/nbd.sock"),
            tcp: None,
            all_disks: &all,
            export: &export,
        });
        assert!(xml.contains("<incremental>cp1</incremental>"));
        assert!(xml.contains("<scratch file='/s/a&apos;b.qcow2'/>"));
        assert!(xml.contains("<disk name='vdb' backup='no'/>"));
        roxmltree::Document::parse(&xml).unwrap();
    }

    #[test]
    fn a_remote_backup_names_a_tls_tcp_server_and_no_path() {
        let all = vec!["vda".to_string(), "vdb".to_string()];
        let export: Vec<ExportDisk> = all
            .iter()
            .map(|d| ExportDisk {
                name: d.clone(),
                scratch: None,
                full: false,
            })
            .collect();
        let tcp = super::super::TcpServer {
            listen: "10.0.0.5".into(),
            port: 10901,
        };
        let xml = backup_xml(&PullBackup {
            incremental_from: Some("sluice-1"),
            socket: std::path::Path::new("/proxy/work/job/nbd.sock"),
            tcp: Some(&tcp),
            all_disks: &all,
            export: &export,
        });
        assert_eq!(
            xml,
            "<domainbackup mode='pull'><incremental>sluice-1</incremental>\
             <server transport='tcp' name='10.0.0.5' port='10901' tls='yes'/></domainbackup>"
        );
        assert!(!xml.contains("/proxy"), "no path of the proxy: {xml}");
        roxmltree::Document::parse(&xml).unwrap();
    }

    #[test]
    fn a_disk_without_bitmap_is_read_in_full_in_an_incremental() {
        let all = vec!["vda".to_string(), "vdb".to_string()];
        let export = vec![
            ExportDisk {
                name: "vda".into(),
                scratch: None,
                full: false,
            },
            ExportDisk {
                name: "vdb".into(),
                scratch: None,
                full: true,
            },
        ];
        let tcp = super::super::TcpServer {
            listen: "10.0.0.5".into(),
            port: 10901,
        };
        let mut b = PullBackup {
            incremental_from: Some("sluice-1"),
            socket: std::path::Path::new("/proxy/work/job/nbd.sock"),
            tcp: Some(&tcp),
            all_disks: &all,
            export: &export,
        };
        let xml = backup_xml(&b);
        assert!(
            xml.ends_with(
                "tls='yes'/><disks><disk name='vda'/>\
                 <disk name='vdb' backupmode='full'/></disks></domainbackup>"
            ),
            "{xml}"
        );
        assert!(!xml.contains("/proxy"), "{xml}");
        // A full backup needs no per-disk mode: libvirt's defaults do.
        b.incremental_from = None;
        assert!(!backup_xml(&b).contains("<disks>"));
        roxmltree::Document::parse(&xml).unwrap();
    }

    #[test]
    fn checkpoint_round_trip() {
        let all = vec!["vda".to_string(), "vdb".to_string()];
        let xml = checkpoint_xml("cp1", &all, &all[..1]);
        let info = checkpoint_info(&xml).unwrap();
        assert_eq!(info.name, "cp1");
        assert_eq!(
            info.disks,
            vec![CheckpointDisk {
                disk: "vda".into(),
                bitmap: "cp1".into()
            }]
        );
    }

    #[test]
    fn backup_desc_reads_export_names() {
        let xml = "<domainbackup mode='pull' id='1'><disks>\
            <disk name='vda' backup='yes' type='file' exportname='vda' exportbitmap='backup-vda'/>\
            <disk name='vdb' backup='no'/></disks></domainbackup>";
        let d = backup_desc(xml).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].export_bitmap.as_deref(), Some("backup-vda"));
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("checkpoint", "sluice-20240101.1").is_ok());
        for bad in ["", "../x", "a b", "-x", ".x", &"x".repeat(65)] {
            assert!(validate_name("checkpoint", bad).is_err(), "{bad}");
        }
    }
}

/// The unix socket of a pull-mode backup's NBD server, from `virDomainBackupGetXMLDesc`.
pub fn backup_socket(backup_xml: &str) -> Option<std::path::PathBuf> {
    let doc = roxmltree::Document::parse(backup_xml).ok()?;
    doc.descendants()
        .find(|n| n.has_tag_name("server") && n.attribute("transport") == Some("unix"))
        .and_then(|n| n.attribute("socket"))
        .map(std::path::PathBuf::from)
}

/// The TCP port of a pull-mode backup's NBD server, from `virDomainBackupGetXMLDesc`.
pub fn backup_tcp_port(backup_xml: &str) -> Option<u16> {
    let doc = roxmltree::Document::parse(backup_xml).ok()?;
    doc.descendants()
        .find(|n| n.has_tag_name("server") && n.attribute("transport") == Some("tcp"))
        .and_then(|n| n.attribute("port"))
        .and_then(|p| p.parse().ok())
}

#[cfg(test)]
mod backup_socket_tests {
    #[test]
    fn finds_the_tcp_port_of_a_remote_pull_backup() {
        let x = "<domainbackup mode='pull'><server transport='tcp' name='10.0.0.5' port='10903' tls='yes'/><disks/></domainbackup>";
        assert_eq!(super::backup_tcp_port(x), Some(10903));
        let unix =
            "<domainbackup mode='pull'><server transport='unix' socket='/s'/></domainbackup>";
        assert_eq!(super::backup_tcp_port(unix), None);
        assert_eq!(super::backup_socket(x), None);
    }

    #[test]
    fn finds_the_unix_socket_of_a_pull_backup() {
        let x = "<domainbackup mode='pull'><server transport='unix' socket='/w/job-sluice-1/nbd.sock'/><disks/></domainbackup>";
        assert_eq!(
            super::backup_socket(x),
            Some("/w/job-sluice-1/nbd.sock".into())
        );
        assert_eq!(super::backup_socket("<domainbackup mode='push'/>"), None);
        assert_eq!(super::backup_socket("not xml"), None);
    }
}
