//! API tokens: roles, listings, create requests and the created token.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of a token creation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    pub role: Role,
    /// For `scoped` tokens: VM names or globs.
    #[serde(default)]
    pub vms: Vec<String>,
}

/// A new token: the secret is returned this once and never stored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, tokens included.
    Admin,
    /// Read, back up, cancel, verify.
    Operator,
    /// Read only.
    Auditor,
    /// Only trigger backups of the VMs in its scope and read those jobs.
    Scoped,
}

/// A token as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// VM names or globs (`*`, `?`) a scoped token is limited to.
    pub vms: Vec<String>,
    /// Unix seconds.
    pub created: i64,
}
