//! Health.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Health answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}
