//! Checks of the names requests and configuration give (VMs, hypervisors, tokens, exports).

use crate::daemon::error::ApiError;

/// Longest name accepted, bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Refuses empty, overlong, traversing or control-character names.
pub fn validate_name(what: &str, name: &str) -> Result<(), ApiError> {
    let bad = |why: &str| Err(ApiError::bad_request(format!("{what} {name:?} {why}")));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ApiError::bad_request(format!(
            "{what} is longer than {MAX_NAME_LEN} bytes"
        )));
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("contains a control character");
    }
    if name.contains('/') || name.contains('\\') || name.contains("..") {
        return bad("contains a path separator or `..`");
    }
    Ok(())
}
