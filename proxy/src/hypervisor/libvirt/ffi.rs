//! A small safe wrapper over the libvirt calls `virt` 0.5.0 does not wrap: backup jobs,
//! checkpoints, filesystem freeze, block info and holes on a sparse stream. Every function must run on the libvirt
//! worker thread (libvirt's last-error slot is thread-local).

use std::ffi::{c_char, CStr, CString};

use virt::domain::Domain;
use virt::error::Error as VirtError;
use virt::sys;

/// A checkpoint handle, freed on drop.
pub struct Checkpoint {
    ptr: sys::virDomainCheckpointPtr,
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a valid checkpoint reference we own (from a lookup, create or list)
        // and is released exactly once, here.
        unsafe {
            sys::virDomainCheckpointFree(self.ptr);
        }
    }
}

fn cstring(text: &str) -> Result<CString, VirtError> {
    Ok(CString::new(text)?)
}

/// Takes ownership of a libvirt-allocated string.
fn owned_string(ptr: *mut c_char) -> Result<String, VirtError> {
    if ptr.is_null() {
        return Err(VirtError::last_error());
    }
    // SAFETY: libvirt returned a non-null, NUL-terminated string that the caller must free.
    let text = unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: the string was allocated by libvirt with malloc and is not used after this.
    unsafe { libc::free(ptr.cast()) };
    Ok(text)
}

fn check(ret: i32) -> Result<i32, VirtError> {
    if ret < 0 {
        Err(VirtError::last_error())
    } else {
        Ok(ret)
    }
}

impl Checkpoint {
    fn from_ptr(ptr: sys::virDomainCheckpointPtr) -> Result<Self, VirtError> {
        if ptr.is_null() {
            Err(VirtError::last_error())
        } else {
            Ok(Self { ptr })
        }
    }

    pub fn name(&self) -> String {
        // SAFETY: `ptr` is valid; the returned name is owned by the checkpoint object and
        // lives as long as it, so we copy it before returning.
        let name = unsafe { sys::virDomainCheckpointGetName(self.ptr) };
        if name.is_null() {
            return String::new();
        }
        // SAFETY: non-null NUL-terminated string owned by the live checkpoint.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }

    pub fn xml_desc(&self, flags: u32) -> Result<String, VirtError> {
        // SAFETY: `ptr` is valid; the result is a malloc'd string handed to `owned_string`.
        owned_string(unsafe { sys::virDomainCheckpointGetXMLDesc(self.ptr, flags) })
    }

    pub fn delete(&self, flags: u32) -> Result<(), VirtError> {
        // SAFETY: `ptr` is valid; deleting does not free the handle (Drop still does).
        check(unsafe { sys::virDomainCheckpointDelete(self.ptr, flags) }).map(drop)
    }
}

/// Tracing target of every XML document sent to libvirt, at debug level (operators debugging
/// a hypervisor's refusal; the test bed checks that none names a path of an isolated proxy).
pub const SENT_XML_TARGET: &str = "sluice::sent_xml";

/// Records `xml` as sent to libvirt for `what`.
pub fn sent(what: &str, xml: &str) {
    tracing::debug!(target: SENT_XML_TARGET, what, xml, "xml sent to libvirt");
}

pub fn checkpoint_create(dom: &Domain, xml: &str, flags: u32) -> Result<Checkpoint, VirtError> {
    sent("checkpoint", xml);
    let xml = cstring(xml)?;
    // SAFETY: `dom` is a live domain, `xml` a NUL-terminated string alive across the call.
    Checkpoint::from_ptr(unsafe {
        sys::virDomainCheckpointCreateXML(dom.as_ptr(), xml.as_ptr(), flags)
    })
}

pub fn checkpoint_lookup(dom: &Domain, name: &str) -> Result<Checkpoint, VirtError> {
    let name = cstring(name)?;
    // SAFETY: `dom` is live and `name` is NUL-terminated and alive across the call.
    Checkpoint::from_ptr(unsafe {
        sys::virDomainCheckpointLookupByName(dom.as_ptr(), name.as_ptr(), 0)
    })
}

/// All checkpoints of `dom`, parents before children.
pub fn checkpoint_list(dom: &Domain) -> Result<Vec<Checkpoint>, VirtError> {
    let mut array: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
    let flags = sys::VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL;
    // SAFETY: `dom` is live; libvirt fills `array` with `n` owned references.
    let n = check(unsafe { sys::virDomainListAllCheckpoints(dom.as_ptr(), &mut array, flags) })?;
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: `array` holds `n` valid pointers; each reference is moved into a guard once.
        let ptr = unsafe { *array.add(i) };
        out.push(Checkpoint { ptr });
    }
    if !array.is_null() {
        // SAFETY: the array itself was malloc'd by libvirt; its elements now belong to `out`.
        unsafe { libc::free(array.cast()) };
    }
    Ok(out)
}

pub fn backup_begin(
    dom: &Domain,
    backup_xml: &str,
    checkpoint_xml: Option<&str>,
) -> Result<(), VirtError> {
    sent("backup", backup_xml);
    if let Some(cp) = checkpoint_xml {
        sent("checkpoint", cp);
    }
    let backup = cstring(backup_xml)?;
    let checkpoint = checkpoint_xml.map(cstring).transpose()?;
    let cp_ptr = checkpoint.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: `dom` is live; both strings (or null for no checkpoint) outlive the call.
    check(unsafe { sys::virDomainBackupBegin(dom.as_ptr(), backup.as_ptr(), cp_ptr, 0) }).map(drop)
}

pub fn backup_xml_desc(dom: &Domain) -> Result<String, VirtError> {
    // SAFETY: `dom` is live; the result is a malloc'd string handed to `owned_string`.
    owned_string(unsafe { sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0) })
}

pub fn abort_job(dom: &Domain) -> Result<(), VirtError> {
    // SAFETY: `dom` is a live domain handle.
    check(unsafe { sys::virDomainAbortJob(dom.as_ptr()) }).map(drop)
}

pub fn fs_freeze(dom: &Domain) -> Result<u32, VirtError> {
    // SAFETY: `dom` is live; a null mount point list with count 0 means "all filesystems".
    check(unsafe { sys::virDomainFSFreeze(dom.as_ptr(), std::ptr::null_mut(), 0, 0) })
        .map(|n| n as u32)
}

pub fn fs_thaw(dom: &Domain) -> Result<u32, VirtError> {
    // SAFETY: `dom` is live; a null mount point list with count 0 means "all filesystems".
    check(unsafe { sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) })
        .map(|n| n as u32)
}

/// Virtual size of a disk (`virt`'s own `block_info` ignores errors, so we do not use it).
pub fn disk_capacity(dom: &Domain, disk: &str) -> Result<u64, VirtError> {
    let disk = cstring(disk)?;
    let mut info = std::mem::MaybeUninit::<sys::virDomainBlockInfo>::zeroed();
    // SAFETY: `dom` is live, `disk` NUL-terminated, `info` a writable struct of the right type.
    check(unsafe {
        sys::virDomainGetBlockInfo(dom.as_ptr(), disk.as_ptr(), info.as_mut_ptr(), 0)
    })?;
    // SAFETY: the call succeeded, so libvirt filled the struct (it was zeroed before anyway).
    Ok(unsafe { info.assume_init() }.capacity)
}

/// Sends a hole of `length` bytes on a stream opened for a sparse upload
/// (`VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM`); `virt` 0.5.0 does not wrap it.
pub fn stream_send_hole(stream: &virt::stream::Stream, length: i64) -> Result<(), VirtError> {
    // SAFETY: `stream` is a live stream handle for the duration of the call; libvirt only
    // reads the length and flags (0: no flags are defined).
    check(unsafe { sys::virStreamSendHole(stream.as_ptr(), length, 0) }).map(drop)
}
