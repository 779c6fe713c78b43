//! The configuration stage: parses and validates the user's JSON (SPEC §2), fills defaults,
//! and compiles it into the dataflow's [`Plan`](streamdest_operators::plan::Plan) and the
//! egress's destination settings.
//!
//! TYPES ONLY for now; parsing, validation and compilation are being written.

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// The whole configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    #[serde(default)]
    pub merge_policies: Vec<MergePolicy>,
    #[serde(default)]
    pub audiences: Vec<Audience>,
    #[serde(default)]
    pub destinations: Vec<Destination>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MergePolicy {
    pub id: String,
    /// Defaults to the id.
    pub name: Option<String>,
    pub attribute_merge: AttributeMerge,
    pub identity_stitching: IdentityStitching,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttributeMerge {
    /// `"timestampOrdered"`
    Named(String),
    /// `{"datasetPrecedence":[...]}`
    #[serde(rename_all = "camelCase")]
    DatasetPrecedence { dataset_precedence: Vec<String> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IdentityStitching {
    PrivateGraph,
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Audience {
    pub id: String,
    /// Defaults to the id.
    pub name: Option<String>,
    pub merge_policy: String,
    /// A rule (segment definition); exactly one of `rule` and `source: "upload"`.
    pub rule: Option<String>,
    /// `"upload"` for a custom-upload audience.
    pub source: Option<String>,
    /// Unix ms; defaults to the time the audience was created.
    pub created_at: Option<i64>,
    pub updated_at: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub id: String,
    pub name: Option<String>,
    #[serde(default)]
    pub description: String,
    pub endpoint: String,
    /// `p1=v1&p2=v2`, appended after the endpoint's own query, in order.
    #[serde(default)]
    pub query_parameters: String,
    /// `h1:v1,h2:v2`.
    #[serde(default)]
    pub headers: String,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub include_segment_names: bool,
    #[serde(default)]
    pub include_segment_timestamps: bool,
    #[serde(default)]
    pub audiences: Vec<AudienceMapping>,
    #[serde(default)]
    pub attributes: Vec<String>,
    #[serde(default)]
    pub delivery: Delivery,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AudienceMapping {
    pub id: String,
    pub mapping_created_at: Option<i64>,
    pub mapping_updated_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Auth {
    #[default]
    None,
    Bearer { token: Secret },
    #[serde(rename_all = "camelCase")]
    Oauth2Password {
        access_token_url: String,
        client_id: String,
        client_secret: Secret,
        username: String,
        password: Secret,
    },
    #[serde(rename_all = "camelCase")]
    Oauth2ClientCredentials {
        access_token_url: String,
        client_id: String,
        client_secret: Secret,
        client_credentials_type: ClientCredentialsType,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClientCredentialsType {
    BodyFormEncoded,
    BasicAuthorization,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Delivery {
    pub max_retries: u32,
    pub timeout_ms: u64,
    pub max_in_flight: usize,
    pub retry_on: Vec<u16>,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            max_retries: 2,
            timeout_ms: 2000,
            max_in_flight: 256,
            retry_on: vec![408, 429, 500, 502, 503, 504],
        }
    }
}
