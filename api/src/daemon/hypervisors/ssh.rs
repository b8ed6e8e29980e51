//! Logging in to a `qemu+ssh://` hypervisor with a key file and a known-hosts file
//! (`ssh_key`, `ssh_known_hosts`): the URI libvirt opens (its libssh transport, which takes
//! a known-hosts file; `+ssh` runs the `ssh` binary, which cannot be given one), and the
//! connection error as logs and the API show it (no key path, a refused host key named with
//! what to check). It does not read the configuration (`daemon::config`) nor connect.

use std::path::{Path, PathBuf};

use proxy::hypervisor::Error as HvError;

use crate::daemon::error::chain;

/// How the proxy logs in to a `qemu+ssh://` hypervisor (`ssh_key`, `ssh_known_hosts`):
/// libvirt's libssh transport with this key only, the host's key checked against this file
/// (an unknown or changed key is refused, never accepted or asked about). Never the `ssh`
/// binary, an agent or the service's `~/.ssh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshLogin {
    /// The private key (no passphrase: nobody is there to type it).
    pub key: PathBuf,
    /// The known-hosts file holding the hypervisor's host key.
    pub known_hosts: PathBuf,
}

/// Query parameters of the libssh URI that Sluice sets from [`SshLogin`]; a configured URI
/// must not set them.
pub const SSH_PARAMS: [&str; 4] = ["keyfile", "known_hosts", "known_hosts_verify", "sshauth"];

/// Whether `uri`'s transport is ssh (`DRIVER+ssh://` or `DRIVER+libssh://`); its driver.
pub fn ssh_driver(uri: &str) -> Option<&str> {
    let (scheme, _) = uri.split_once("://")?;
    scheme
        .strip_suffix("+ssh")
        .or_else(|| scheme.strip_suffix("+libssh"))
}

/// The URI libvirt opens for an ssh login: `qemu+ssh://USER@HOST[:PORT]/system[?Q]` becomes
/// `qemu+libssh://USER@HOST[:PORT]/system?[Q&]keyfile=K&known_hosts=F&known_hosts_verify=normal&sshauth=privkey`.
/// libvirt's libssh transport (unlike `+ssh`, which runs the `ssh` binary) takes the
/// known-hosts file; `normal` refuses a changed key and, with no one to ask (the daemon
/// gives libvirt no callback), an unknown one; `privkey` uses the key file alone. The
/// parameters come last, so they win over any of the same name. Paths are
/// percent-encoded.
pub fn libssh_uri(uri: &str, login: &SshLogin) -> String {
    let (scheme, rest) = uri.split_once("://").unwrap_or(("qemu+ssh", uri));
    let driver = ssh_driver(uri).unwrap_or(scheme);
    let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
    let ours = format!(
        "keyfile={}&known_hosts={}&known_hosts_verify=normal&sshauth=privkey",
        percent_encode(&login.key),
        percent_encode(&login.known_hosts)
    );
    let query = if query.is_empty() {
        ours
    } else {
        format!("{query}&{ours}")
    };
    format!("{driver}+libssh://{base}?{query}")
}

/// `path` for a URI's query: every byte but unreserved ones and `/` as `%XX`.
fn percent_encode(path: &Path) -> String {
    use std::fmt::Write as _;
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A cause known only by its text (a libvirt error with the URI and paths taken out).
#[derive(Debug)]
struct Cause(String);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cause {}

/// `e` (from opening `open`) with `open` replaced by `shown` (the URI as logs and the API
/// show it) and, for an ssh login, the key and known-hosts paths by their setting's name: an
/// error may reach the log and the API, which never name the key file.
pub(super) fn redacted(e: &HvError, open: &str, shown: &str, ssh: Option<&SshLogin>) -> HvError {
    let clean = |text: &str| {
        let mut t = text.replace(open, shown);
        if let Some(login) = ssh {
            t = t.replace(&*login.key.to_string_lossy(), "ssh_key");
            t = t.replace(&*login.known_hosts.to_string_lossy(), "ssh_known_hosts");
        }
        t
    };
    let out = HvError::new(e.kind(), clean(e.message()));
    match std::error::Error::source(e) {
        Some(cause) => out.with_source(Cause(clean(&chain(cause)))),
        None => out,
    }
}

/// For an ssh login (to hypervisor `name` at `shown`, its URI without the query) whose host
/// key libvirt refused (changed, or not in the known-hosts file), `e` under a message naming
/// the host and what to check; other errors as they are.
pub(super) fn ssh_refusal(name: &str, shown: &str, ssh: Option<&SshLogin>, e: &HvError) -> HvError {
    let text = chain(e);
    if ssh.is_none() || !text.to_lowercase().contains("host key") {
        return HvError::new(e.kind(), text);
    }
    let authority = shown.split_once("://").map_or("", |(_, r)| r);
    let authority = authority.split('/').next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or(authority);
    HvError::new(
        e.kind(),
        format!(
            "the ssh host key of {host} was refused: it is not the one in the known-hosts file \
             (ssh_known_hosts of hypervisor {name}); compare the host's key fingerprint \
             (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the host) and correct \
             the known-hosts file"
        ),
    )
    .with_source(Cause(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy::hypervisor::ErrorKind as HvErrorKind;

    /// libvirt's error as the adapter reports it, for `open` and libvirt's own `text`.
    fn connect_error(open: &str, text: &str) -> HvError {
        HvError::new(
            HvErrorKind::Failed,
            format!("cannot connect to libvirt at {open}"),
        )
        .with_source(Cause(text.into()))
    }

    #[test]
    fn a_refused_host_key_names_the_host_and_the_file_to_check_but_no_path() {
        let uri = "qemu+ssh://root@127.0.0.1:2299/system";
        let login = SshLogin {
            key: "/etc/sluice/ssh/id_ed25519".into(),
            known_hosts: "/etc/sluice/ssh/known_hosts".into(),
        };
        let open = libssh_uri(uri, &login);
        let refused = |libvirt_says: &str| {
            let e = redacted(
                &connect_error(&open, libvirt_says),
                &open,
                uri,
                Some(&login),
            );
            ssh_refusal("kvm1", uri, Some(&login), &e)
        };
        let changed = "authentication failed: !!! SSH HOST KEY VERIFICATION FAILED !!!: \
            Identity of host '127.0.0.1:2299' differs from stored identity. The key is stored \
            in '/etc/sluice/ssh/known_hosts'.";
        let e = refused(changed);
        let text = chain(&e);
        assert!(
            text.starts_with("the ssh host key of 127.0.0.1:2299 was refused: it is not the one in the known-hosts file (ssh_known_hosts of hypervisor kvm1)"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "cannot connect to libvirt at {uri}: authentication failed"
            )),
            "{text}"
        );
        assert!(text.contains("stored in 'ssh_known_hosts'"), "{text}");
        assert!(
            !text.contains("/etc/sluice") && !text.contains("keyfile"),
            "{text}"
        );
        assert_eq!(e.kind(), HvErrorKind::Failed);

        let unknown = "libssh transport error: No user interaction callback provided: \
            Can't verify the session host key";
        let e = refused(unknown);
        assert!(chain(&e).starts_with("the ssh host key of 127.0.0.1:2299 was refused"));

        let no_key = "authentication failed: error while reading private key \
            '/etc/sluice/ssh/id_ed25519'";
        let e = refused(no_key);
        assert_eq!(
            chain(&e),
            format!("cannot connect to libvirt at {uri}: authentication failed: error while reading private key 'ssh_key'")
        );
    }

    #[test]
    fn a_tls_connection_error_shows_the_uri_without_its_query() {
        let uri = "qemu+tls://h1/system?pkipath=/etc/sluice/pki/h1";
        let shown = "qemu+tls://h1/system";
        let e = redacted(&connect_error(uri, "Connection refused"), uri, shown, None);
        let e = ssh_refusal("h1", shown, None, &e);
        assert_eq!(
            chain(&e),
            "cannot connect to libvirt at qemu+tls://h1/system: Connection refused"
        );
    }
}
