//! The configuration stage: parses and validates the user's JSON (SPEC §2), fills defaults,
//! and compiles it into the dataflow's [`Plan`] and the egress's destination settings.
//!
//! - [`Config::from_json_str`] and [`Config::from_file`] parse and then [`Config::validate`];
//!   an invalid configuration is refused as a whole with a [`ConfigError`] that names the field
//!   path, e.g. `destinations[0].auth.clientSecret: missing`, `audiences[2].rule: audience
//!   "x": column 7: …`, or `line 3 column 5: …` for JSON syntax. It holds every unknown field
//!   and each object's first problem (`ConfigError::also`), one line each when displayed; a
//!   type error or a missing required field stops the typed parse, so it is reported with the
//!   unknown fields only.
//! - Unknown fields are errors naming the closest known field (`unknown.rs`, SPEC §2); events
//!   keep ignoring theirs.
//! - [`Config::unset_secrets`] reports `{"env": …}` secrets whose variable is not set, for the
//!   commands that deliver.
//! - [`Config::plan`] compiles a validated configuration into the dataflow's [`Plan`];
//!   [`Destination::parsed_headers`] and [`Destination::request_url`] give the egress its
//!   request settings; the `redacted_json` methods give the API's and `validate`'s view of every
//!   object, with defaults filled in and every [`Secret`] redacted.
//! - The objects can also be parsed, validated and changed one by one, as the control API does
//!   ([`parse_json`], [`Config::put_audience`], [`Config::remove_audience`], …); their errors name
//!   paths inside the object (`rule: audience "x": column 7: …`).

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::path::Path;

use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use streamdest_operators::plan::{
    self, AudienceIdx, AudienceKind, AudiencePlan, DestinationIdx, DestinationPlan, MappingPlan,
    Plan, PolicyIdx, PolicyPlan, Stitching,
};
use streamdest_operators::rule::Rule;
use url::Url;

use crate::secret::{Secret, SecretSource};

mod unknown;

/// The only named attribute merge.
pub const TIMESTAMP_ORDERED: &str = "timestampOrdered";

/// How many objects of one kind the dataflow's 16-bit indices can address.
const MAX_OBJECTS: usize = 1 << 16;

/// Headers the egress sets itself; a destination may not set them through `headers`.
const RESERVED_HEADERS: [&str; 6] = [
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "idempotency-key",
];

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a configuration (or one object of it) is invalid: the field path and the reason.
///
/// `path` is `name[0].field` form (`destinations[0].auth.clientSecret`), relative to what was
/// parsed or validated; `line L column C` for a JSON syntax error; the file's path for a file
/// that cannot be read; `(root)` for a problem with the whole document.
///
/// A document with several problems gives one error for the first and the others in `also`, in
/// document order; it displays as one `path: message` line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
    /// Further problems of the same document.
    pub also: Vec<ConfigError>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)?;
        for other in &self.also {
            write!(f, "\n{other}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
            also: Vec::new(),
        }
    }

    /// The same error with `prefix` put before its path: `rule` within `audiences[2]` is
    /// `audiences[2].rule`, `[1]` within `retryOn` is `retryOn[1]`.
    pub fn within(self, prefix: &str) -> Self {
        ConfigError {
            path: join_path(prefix, &self.path),
            message: self.message,
            also: self.also.into_iter().map(|e| e.within(prefix)).collect(),
        }
    }

    /// Every problem, this one first.
    pub fn all(&self) -> Vec<&ConfigError> {
        std::iter::once(self).chain(self.also.iter()).collect()
    }

    /// One error holding all of `errors` (flattened), or `Ok` when there are none.
    pub fn collect(errors: Vec<ConfigError>) -> Result<(), ConfigError> {
        let mut flat = errors.into_iter().flat_map(|mut e| {
            let also = std::mem::take(&mut e.also);
            std::iter::once(e).chain(also)
        });
        match flat.next() {
            None => Ok(()),
            Some(mut first) => {
                first.also = flat.collect();
                Err(first)
            }
        }
    }
}

fn join_path(prefix: &str, path: &str) -> String {
    if prefix.is_empty() || prefix == ROOT {
        path.to_owned()
    } else if path.is_empty() || path == ROOT {
        prefix.to_owned()
    } else if path.starts_with('[') {
        format!("{prefix}{path}")
    } else {
        format!("{prefix}.{path}")
    }
}

const ROOT: &str = "(root)";

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Parses JSON text into any configuration object (a whole [`Config`], or one [`MergePolicy`],
/// [`Audience`] or [`Destination`] for the control API), with errors that name the field path.
/// Does not validate: call the object's `validate` (or use [`Config::from_json_str`]).
/// The text must hold one JSON object.
pub fn parse_json<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(|e| located_error(&e))?;
    parse_value(value)
}

/// [`parse_json`] for an already parsed JSON value, which must be an object.
pub fn parse_value<T: DeserializeOwned>(value: Value) -> Result<T, ConfigError> {
    if !value.is_object() {
        // serde would also build a struct from an array of its fields; refuse that at the top.
        return Err(ConfigError::new(ROOT, "expected a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(path_error)
}

/// One object of the control API, parsed strictly: unknown fields are errors (with the closest
/// known field), and every error is reported. Does not validate against the other objects.
pub fn parse_strict<T: DeserializeOwned>(value: Value, kind: ObjectKind) -> Result<T, ConfigError> {
    let kind = match kind {
        ObjectKind::MergePolicy => unknown::Kind::MergePolicy,
        ObjectKind::Audience => unknown::Kind::Audience,
        ObjectKind::Destination => unknown::Kind::Destination,
    };
    let mut errors = Vec::new();
    unknown::unknown_fields(&value, kind, "", &mut errors);
    match parse_value::<T>(value) {
        Ok(object) => {
            ConfigError::collect(errors)?;
            Ok(object)
        }
        Err(e) => {
            errors.push(e);
            ConfigError::collect(errors)?;
            Err(ConfigError::new(ROOT, "invalid object"))
        }
    }
}

/// The kinds of objects of the control API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ObjectKind {
    MergePolicy,
    Audience,
    Destination,
}

impl ObjectKind {
    /// As the API's paths and messages name it.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::MergePolicy => "merge policy",
            ObjectKind::Audience => "audience",
            ObjectKind::Destination => "destination",
        }
    }
}

fn path_error(err: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let path = format_path(err.path());
    let inner = err.inner();
    match inner.classify() {
        serde_json::error::Category::Data => data_error(path, inner),
        _ => located_error(inner),
    }
}

/// `name[0].field` form of a serde path.
fn format_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            // A unit variant's name is the value, not a field: leave it out of the path.
            Segment::Enum { .. } => {}
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// serde_json's message without its ` at line L column C` suffix.
fn bare_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    if e.line() == 0 {
        return full;
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&suffix) {
        Some(bare) => bare.to_owned(),
        None => full,
    }
}

fn located_error(e: &serde_json::Error) -> ConfigError {
    if e.line() == 0 {
        ConfigError::new(ROOT, bare_message(e))
    } else {
        ConfigError::new(
            format!("line {} column {}", e.line(), e.column()),
            bare_message(e),
        )
    }
}

fn data_error(path: String, e: &serde_json::Error) -> ConfigError {
    let message = bare_message(e);
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return ConfigError::new(join_path(&path, field), "missing");
    }
    let message =
        if message.starts_with("data did not match any variant of untagged enum SecretSource") {
            r#"expected a string or {"env": "VAR"}"#.to_owned()
        } else {
            message
        };
    if path.is_empty() {
        let mut err = located_error(e);
        err.message = message;
        err
    } else {
        ConfigError::new(path, message)
    }
}

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub attribute_merge: AttributeMerge,
    pub identity_stitching: IdentityStitching,
}

/// `"timestampOrdered"` or `{"datasetPrecedence":[...]}`. A name other than
/// `"timestampOrdered"` parses (as `Named`) but does not validate.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AttributeMerge {
    /// `"timestampOrdered"`
    Named(String),
    /// `{"datasetPrecedence":[...]}`
    #[serde(rename_all = "camelCase")]
    DatasetPrecedence { dataset_precedence: Vec<String> },
}

impl<'de> Deserialize<'de> for AttributeMerge {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MergeVisitor;

        impl<'de> Visitor<'de> for MergeVisitor {
            type Value = AttributeMerge;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""timestampOrdered" or {"datasetPrecedence": [...]}"#)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<AttributeMerge, E> {
                Ok(AttributeMerge::Named(v.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AttributeMerge, A::Error> {
                let mut precedence: Option<Vec<String>> = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "datasetPrecedence" {
                        if precedence.is_some() {
                            return Err(de::Error::duplicate_field("datasetPrecedence"));
                        }
                        precedence = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                match precedence {
                    Some(dataset_precedence) => {
                        Ok(AttributeMerge::DatasetPrecedence { dataset_precedence })
                    }
                    None => Err(de::Error::missing_field("datasetPrecedence")),
                }
            }
        }

        deserializer.deserialize_any(MergeVisitor)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IdentityStitching {
    PrivateGraph,
    None,
}

impl IdentityStitching {
    /// The configuration's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityStitching::PrivateGraph => "privateGraph",
            IdentityStitching::None => "none",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Audience {
    pub id: String,
    /// Defaults to the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub merge_policy: String,
    /// A rule (segment definition); exactly one of `rule` and `source: "upload"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `"upload"` for a custom-upload audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Unix ms; defaults to the time the audience was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<i64>,
    /// Unix ms; defaults to `createdAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub id: String,
    /// Defaults to the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// Extra trusted CAs and a client certificate; none: the system's trust store only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AudienceMapping {
    pub id: String,
    /// Unix ms; defaults to the time the mapping was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping_created_at: Option<i64>,
    /// Unix ms; defaults to `mappingCreatedAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping_updated_at: Option<i64>,
}

/// Serialized with its `type` tag; deserialized by hand (through `AuthFields`) so that an
/// unknown `type` is reported at `auth.type` and an ill-typed field at its own path.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Auth {
    #[default]
    None,
    Bearer {
        token: Secret,
    },
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
enum AuthType {
    None,
    Bearer,
    Oauth2Password,
    Oauth2ClientCredentials,
}

/// Every field any auth type has. A field that the chosen type does not use is ignored, but
/// must still have the right type when present.
#[derive(Deserialize)]
#[serde(rename = "Auth", rename_all = "camelCase")]
struct AuthFields {
    #[serde(rename = "type")]
    kind: AuthType,
    token: Option<Secret>,
    access_token_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<Secret>,
    username: Option<String>,
    password: Option<Secret>,
    client_credentials_type: Option<ClientCredentialsType>,
}

impl<'de> Deserialize<'de> for Auth {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        fn need<T, E: de::Error>(value: Option<T>, field: &'static str) -> Result<T, E> {
            value.ok_or_else(|| E::missing_field(field))
        }
        let f = AuthFields::deserialize(deserializer)?;
        Ok(match f.kind {
            AuthType::None => Auth::None,
            AuthType::Bearer => Auth::Bearer {
                token: need(f.token, "token")?,
            },
            AuthType::Oauth2Password => Auth::Oauth2Password {
                access_token_url: need(f.access_token_url, "accessTokenUrl")?,
                client_id: need(f.client_id, "clientId")?,
                client_secret: need(f.client_secret, "clientSecret")?,
                username: need(f.username, "username")?,
                password: need(f.password, "password")?,
            },
            AuthType::Oauth2ClientCredentials => Auth::Oauth2ClientCredentials {
                access_token_url: need(f.access_token_url, "accessTokenUrl")?,
                client_id: need(f.client_id, "clientId")?,
                client_secret: need(f.client_secret, "clientSecret")?,
                client_credentials_type: need(f.client_credentials_type, "clientCredentialsType")?,
            },
        })
    }
}

impl Auth {
    /// The auth's secrets with their field names.
    pub fn secrets(&self) -> Vec<(&'static str, &Secret)> {
        match self {
            Auth::None => Vec::new(),
            Auth::Bearer { token } => vec![("token", token)],
            Auth::Oauth2Password {
                client_secret,
                password,
                ..
            } => vec![("clientSecret", client_secret), ("password", password)],
            Auth::Oauth2ClientCredentials { client_secret, .. } => {
                vec![("clientSecret", client_secret)]
            }
        }
    }

    /// The configuration's spelling of the type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Bearer { .. } => "bearer",
            Auth::Oauth2Password { .. } => "oauth2Password",
            Auth::Oauth2ClientCredentials { .. } => "oauth2ClientCredentials",
        }
    }

    /// Field paths are relative to the `auth` object.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            Auth::None => Ok(()),
            Auth::Bearer { token } => {
                check_secret(token, "token")?;
                if matches!(token.source(), SecretSource::Literal(s) if s.is_empty()) {
                    return Err(ConfigError::new("token", "must not be empty"));
                }
                Ok(())
            }
            Auth::Oauth2Password {
                access_token_url,
                client_id,
                client_secret,
                username,
                password,
            } => {
                check_http_url(access_token_url)
                    .map_err(|m| ConfigError::new("accessTokenUrl", m))?;
                check_non_empty(client_id, "clientId")?;
                check_secret(client_secret, "clientSecret")?;
                check_non_empty(username, "username")?;
                check_secret(password, "password")
            }
            Auth::Oauth2ClientCredentials {
                access_token_url,
                client_id,
                client_secret,
                ..
            } => {
                check_http_url(access_token_url)
                    .map_err(|m| ConfigError::new("accessTokenUrl", m))?;
                check_non_empty(client_id, "clientId")?;
                check_secret(client_secret, "clientSecret")
            }
        }
    }

    /// The auth object with every secret redacted ([`Secret::redacted_json`]).
    pub fn redacted_json(&self) -> Value {
        match self {
            Auth::None => json!({ "type": "none" }),
            Auth::Bearer { token } => json!({ "type": "bearer", "token": token.redacted_json() }),
            Auth::Oauth2Password {
                access_token_url,
                client_id,
                client_secret,
                username,
                password,
            } => json!({
                "type": "oauth2Password",
                "accessTokenUrl": access_token_url,
                "clientId": client_id,
                "clientSecret": client_secret.redacted_json(),
                "username": username,
                "password": password.redacted_json(),
            }),
            Auth::Oauth2ClientCredentials {
                access_token_url,
                client_id,
                client_secret,
                client_credentials_type,
            } => json!({
                "type": "oauth2ClientCredentials",
                "accessTokenUrl": access_token_url,
                "clientId": client_id,
                "clientSecret": client_secret.redacted_json(),
                "clientCredentialsType": client_credentials_type.as_str(),
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClientCredentialsType {
    BodyFormEncoded,
    BasicAuthorization,
}

impl ClientCredentialsType {
    /// The configuration's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientCredentialsType::BodyFormEncoded => "bodyFormEncoded",
            ClientCredentialsType::BasicAuthorization => "basicAuthorization",
        }
    }
}

/// Delivery settings; every field is optional (SPEC §2 defaults).
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

impl Delivery {
    /// The most retries a destination may ask for.
    pub const MAX_RETRIES: u32 = 10;

    /// Field paths are relative to the `delivery` object.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_retries > Self::MAX_RETRIES {
            return Err(ConfigError::new(
                "maxRetries",
                format!(
                    "must be at most {} (got {})",
                    Self::MAX_RETRIES,
                    self.max_retries
                ),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(ConfigError::new("timeoutMs", "must be greater than 0"));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::new("maxInFlight", "must be at least 1"));
        }
        for (i, code) in self.retry_on.iter().enumerate() {
            if !(100..=599).contains(code) {
                return Err(ConfigError::new(
                    format!("retryOn[{i}]"),
                    format!("{code} is not an HTTP status code (100 to 599)"),
                ));
            }
        }
        Ok(())
    }

    pub fn redacted_json(&self) -> Value {
        json!({
            "maxRetries": self.max_retries,
            "timeoutMs": self.timeout_ms,
            "maxInFlight": self.max_in_flight,
            "retryOn": self.retry_on,
        })
    }
}

/// A destination's TLS settings (SPEC §2): PEM files, read when the configuration is
/// validated and again when a connection pool for them is made. Paths are not secrets: they
/// show in the redacted view. Every field is optional; `clientCertFile` and `clientKeyFile`
/// go together.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    /// PEM certificates trusted besides the system's trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The client certificate (PEM, the leaf first, then any intermediates) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
}

/// A client certificate chain and its private key, for mutual TLS.
pub type ClientIdentity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

impl Tls {
    /// No field set: the same as no `tls` object.
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert_file.is_none() && self.client_key_file.is_none()
    }

    /// The same settings with every path made absolute (against the current directory), so
    /// that a dead letter can be re-driven from anywhere.
    pub fn absolute(&self) -> Tls {
        let absolute = |p: &Option<String>| {
            p.as_ref().map(|p| match std::path::absolute(p) {
                Ok(abs) => abs.to_string_lossy().into_owned(),
                Err(_) => p.clone(),
            })
        };
        Tls {
            ca_file: absolute(&self.ca_file),
            client_cert_file: absolute(&self.client_cert_file),
            client_key_file: absolute(&self.client_key_file),
        }
    }

    /// Reads and checks every file; paths are relative to the `tls` object. Every problem is
    /// reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        errors.extend(self.ca_certificates().err());
        errors.extend(self.client_identity().err());
        ConfigError::collect(errors)
    }

    /// The certificates of `caFile` (empty without one), each checked to be usable as a trust
    /// anchor. Errors at `caFile`.
    pub fn ca_certificates(
        &self,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
        let Some(path) = &self.ca_file else {
            return Ok(Vec::new());
        };
        let certs = read_pem_certificates(path).map_err(|m| ConfigError::new("caFile", m))?;
        let mut roots = rustls::RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            roots.add(cert.clone()).map_err(|e| {
                ConfigError::new(
                    "caFile",
                    format!("certificate {} of {path} is not usable as a CA: {e}", i + 1),
                )
            })?;
        }
        Ok(certs)
    }

    /// The client certificate chain and key, when both files are set; an error at the missing
    /// field when only one is, or at the file that cannot be read or does not parse (or at
    /// `clientKeyFile` when the key is not the certificate's).
    pub fn client_identity(&self) -> Result<Option<ClientIdentity>, ConfigError> {
        let (cert_path, key_path) = match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "clientKeyFile",
                    "missing: clientCertFile is set, and mutual TLS needs both",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "clientCertFile",
                    "missing: clientKeyFile is set, and mutual TLS needs both",
                ));
            }
            (Some(c), Some(k)) => (c, k),
        };
        let certs =
            read_pem_certificates(cert_path).map_err(|m| ConfigError::new("clientCertFile", m))?;
        let key = read_pem_key(key_path).map_err(|m| ConfigError::new("clientKeyFile", m))?;
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(certs.clone(), key.clone_key(), &provider).map_err(
            |e| {
                ConfigError::new(
                    "clientKeyFile",
                    match e {
                        rustls::Error::InconsistentKeys(_) => {
                            format!("{key_path} is not the key of the certificate in {cert_path}")
                        }
                        other => format!("{key_path}: unusable private key: {other}"),
                    },
                )
            },
        )?;
        Ok(Some((certs, key)))
    }

    /// The object as the API shows it: the paths as given (they are not secrets).
    pub fn redacted_json(&self) -> Value {
        let mut out = Map::new();
        for (name, value) in [
            ("caFile", &self.ca_file),
            ("clientCertFile", &self.client_cert_file),
            ("clientKeyFile", &self.client_key_file),
        ] {
            if let Some(v) = value {
                out.insert(name.into(), json!(v));
            }
        }
        Value::Object(out)
    }
}

/// A file's bytes, or `cannot read PATH: REASON` (the OS error without its number).
fn read_file(path: &str) -> Result<Vec<u8>, String> {
    if path.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    std::fs::read(path).map_err(|e| {
        let text = e.to_string();
        let text = match text.find(" (os error ") {
            Some(at) => &text[..at],
            None => &text,
        };
        format!("cannot read {path}: {text}")
    })
}

/// Every `CERTIFICATE` block of a PEM file (at least one).
fn read_pem_certificates(
    path: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let bytes = read_file(path)?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path} is not a PEM file: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "no certificate in {path} (expected PEM \"BEGIN CERTIFICATE\" blocks)"
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_pem_key(path: &str) -> Result<rustls::pki_types::PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::{self, PemObject};
    let bytes = read_file(path)?;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "no private key in {path} (expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \
             \"EC PRIVATE KEY\" block)"
        ),
        other => format!("{path} is not a PEM file: {other}"),
    })
}

// ---------------------------------------------------------------------------------------------
// Field checks
// ---------------------------------------------------------------------------------------------

fn check_non_empty(value: &str, path: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::new(path, "must not be empty"))
    } else {
        Ok(())
    }
}

fn check_id(id: &str) -> Result<(), ConfigError> {
    check_non_empty(id, "id")?;
    if id.chars().any(char::is_control) {
        return Err(ConfigError::new(
            "id",
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// An `{"env": …}` secret must name a variable that can exist.
fn check_secret(secret: &Secret, path: &str) -> Result<(), ConfigError> {
    if let SecretSource::Env { env } = secret.source() {
        if env.is_empty() {
            return Err(ConfigError::new(format!("{path}.env"), "must not be empty"));
        }
        if env.contains(['=', '\0']) {
            return Err(ConfigError::new(
                format!("{path}.env"),
                "is not a valid environment variable name (contains '=' or NUL)",
            ));
        }
    }
    Ok(())
}

/// An absolute `http` or `https` URL with a host.
fn check_http_url(text: &str) -> Result<Url, String> {
    if text.trim().is_empty() {
        return Err("missing".to_owned());
    }
    let url = Url::parse(text).map_err(|e| format!("not an absolute http(s) URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(format!("the scheme must be http or https, not {other:?}")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_owned());
    }
    Ok(url)
}

/// An attribute path: dotted, non-empty segments, no whitespace or control characters.
fn check_attribute_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{path:?} must not contain spaces or control characters"
        ));
    }
    if path.split('.').any(str::is_empty) {
        return Err(format!("{path:?} has an empty segment"));
    }
    Ok(())
}

/// RFC 9110 `tchar`.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// Characters a URL query may hold unencoded (RFC 3986 `pchar / "/" / "?"`, `%` aside).
fn is_query_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/?".contains(c)
}

fn trim_sp(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// Parses `h1:v1,h2:v2`. Messages name header names, never values (they may hold API keys).
fn parse_headers(text: &str, auth: &Auth) -> Result<Vec<(String, String)>, String> {
    if trim_sp(text).is_empty() {
        return Ok(Vec::new());
    }
    let mut headers = Vec::new();
    for (i, entry) in text.split(',').enumerate() {
        let n = i + 1;
        let Some((name, value)) = entry.split_once(':') else {
            return Err(format!("header {n} has no ':' (expected name:value)"));
        };
        let (name, value) = (trim_sp(name), trim_sp(value));
        if name.is_empty() {
            return Err(format!("header {n} has an empty name"));
        }
        if !name.chars().all(is_tchar) {
            return Err(format!("header {n}: {name:?} is not a valid header name"));
        }
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(format!(
                "header {n} ({name}): the value contains CR, LF or another control character"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if lower == "authorization" && !matches!(auth, Auth::None) {
            return Err(format!(
                "header {n}: an Authorization header cannot be set beside auth type {:?}",
                auth.type_name()
            ));
        }
        if RESERVED_HEADERS.contains(&lower.as_str()) {
            return Err(format!(
                "header {n}: {name} is set by streamdest and cannot be configured"
            ));
        }
        headers.push((name.to_owned(), value.to_owned()));
    }
    Ok(headers)
}

/// Parses `p1=v1&p2=v2` (kept as given: already-encoded text). Messages never echo values.
fn parse_query(text: &str) -> Result<Vec<(String, String)>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut params = Vec::new();
    for (i, entry) in text.split('&').enumerate() {
        let n = i + 1;
        let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
        if name.is_empty() {
            return Err(format!("parameter {n} has an empty name"));
        }
        let mut chars = entry.chars();
        while let Some(c) = chars.next() {
            if c == '%' {
                let hex: String = chars.by_ref().take(2).collect();
                if hex.len() != 2 || !hex.chars().all(|h| h.is_ascii_hexdigit()) {
                    return Err(format!(
                        "parameter {n}: '%' must be followed by two hex digits"
                    ));
                }
            } else if !is_query_char(c) {
                return Err(format!(
                    "parameter {n}: {c:?} is not allowed in a URL query (percent-encode it)"
                ));
            }
        }
        params.push((name.to_owned(), value.to_owned()));
    }
    Ok(params)
}

// ---------------------------------------------------------------------------------------------
// Objects: validation, defaults, redacted views
// ---------------------------------------------------------------------------------------------

impl AttributeMerge {
    pub fn redacted_json(&self) -> Value {
        match self {
            AttributeMerge::Named(name) => Value::String(name.clone()),
            AttributeMerge::DatasetPrecedence { dataset_precedence } => {
                json!({ "datasetPrecedence": dataset_precedence })
            }
        }
    }

    /// The dataflow's form. Call on a validated value: an unknown name compiles as
    /// timestamp-ordered.
    pub fn compile(&self) -> plan::AttributeMerge {
        match self {
            AttributeMerge::Named(_) => plan::AttributeMerge::TimestampOrdered,
            AttributeMerge::DatasetPrecedence { dataset_precedence } => {
                plan::AttributeMerge::DatasetPrecedence(dataset_precedence.clone())
            }
        }
    }
}

impl MergePolicy {
    /// The dataflow's view of this policy.
    pub fn plan(&self) -> PolicyPlan {
        PolicyPlan {
            id: self.id.clone(),
            merge: self.attribute_merge.compile(),
            stitching: match self.identity_stitching {
                IdentityStitching::PrivateGraph => Stitching::PrivateGraph,
                IdentityStitching::None => Stitching::None,
            },
            removed: false,
        }
    }

    /// The name, defaulting to the id.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }

    /// Checks the object on its own; paths are relative to it (`attributeMerge`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id(&self.id)?;
        match &self.attribute_merge {
            AttributeMerge::Named(name) if name == TIMESTAMP_ORDERED => {}
            AttributeMerge::Named(name) => {
                return Err(ConfigError::new(
                    "attributeMerge",
                    format!(
                        r#"unknown attribute merge {name:?}, expected "timestampOrdered" or {{"datasetPrecedence": [...]}}"#
                    ),
                ));
            }
            AttributeMerge::DatasetPrecedence { dataset_precedence } => {
                if dataset_precedence.is_empty() {
                    return Err(ConfigError::new(
                        "attributeMerge.datasetPrecedence",
                        "must list at least one dataset",
                    ));
                }
                for (i, dataset) in dataset_precedence.iter().enumerate() {
                    check_non_empty(dataset, &format!("attributeMerge.datasetPrecedence[{i}]"))?;
                }
            }
        }
        Ok(())
    }

    /// The object as the API shows it, defaults filled in.
    pub fn redacted_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.display_name(),
            "attributeMerge": self.attribute_merge.redacted_json(),
            "identityStitching": self.identity_stitching.as_str(),
        })
    }
}

impl Audience {
    /// The dataflow's view of this audience, of policy `policy`; missing timestamps are
    /// `now_ms` (a missing `updatedAt` the creation time).
    pub fn plan(&self, policy: PolicyIdx, now_ms: i64) -> AudiencePlan {
        let kind = match self.parsed_rule() {
            Ok(Some(rule)) => AudienceKind::Rule(rule),
            Ok(None) | Err(_) => AudienceKind::Upload,
        };
        let created_at = self.created_at.unwrap_or(now_ms);
        AudiencePlan {
            id: self.id.clone(),
            name: self.display_name().to_owned(),
            policy,
            kind,
            created_at,
            updated_at: self.updated_at.unwrap_or(created_at),
            removed: false,
        }
    }

    /// The name, defaulting to the id.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }

    /// Whether this is a custom-upload audience (`"source": "upload"` and no rule).
    pub fn is_upload(&self) -> bool {
        self.rule.is_none() && self.source.as_deref() == Some("upload")
    }

    /// The parsed rule, or `None` for an upload audience. Errors at `rule`, naming the audience.
    pub fn parsed_rule(&self) -> Result<Option<Rule>, ConfigError> {
        match &self.rule {
            None => Ok(None),
            Some(text) => Rule::parse(text)
                .map(Some)
                .map_err(|e| ConfigError::new("rule", format!("audience {:?}: {e}", self.id))),
        }
    }

    /// Checks the object against the merge policies of `config`; paths are relative to it.
    pub fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        check_id(&self.id)?;
        if !config
            .merge_policies
            .iter()
            .any(|p| p.id == self.merge_policy)
        {
            return Err(ConfigError::new(
                "mergePolicy",
                format!("unknown merge policy {:?}", self.merge_policy),
            ));
        }
        match (&self.rule, self.source.as_deref()) {
            (_, Some(source)) if source != "upload" => {
                return Err(ConfigError::new(
                    "source",
                    format!(r#"unknown source {source:?}, expected "upload""#),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "source",
                    r#"an audience has either a "rule" or "source": "upload", not both"#,
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "rule",
                    r#"missing (an audience needs a "rule" or "source": "upload")"#,
                ));
            }
            _ => {}
        }
        self.parsed_rule()?;
        Ok(())
    }

    /// Sets missing timestamps: `createdAt` to `now_ms`, `updatedAt` to `createdAt`.
    pub fn fill_timestamps(&mut self, now_ms: i64) {
        let created = *self.created_at.get_or_insert(now_ms);
        self.updated_at.get_or_insert(created);
    }

    /// The object as the API shows it: the name filled in; timestamps when set.
    pub fn redacted_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("id".into(), json!(self.id));
        out.insert("name".into(), json!(self.display_name()));
        out.insert("mergePolicy".into(), json!(self.merge_policy));
        if let Some(rule) = &self.rule {
            out.insert("rule".into(), json!(rule));
        }
        if let Some(source) = &self.source {
            out.insert("source".into(), json!(source));
        }
        if let Some(t) = self.created_at {
            out.insert("createdAt".into(), json!(t));
        }
        if let Some(t) = self.updated_at {
            out.insert("updatedAt".into(), json!(t));
        }
        Value::Object(out)
    }
}

impl AudienceMapping {
    pub fn redacted_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("id".into(), json!(self.id));
        if let Some(t) = self.mapping_created_at {
            out.insert("mappingCreatedAt".into(), json!(t));
        }
        if let Some(t) = self.mapping_updated_at {
            out.insert("mappingUpdatedAt".into(), json!(t));
        }
        Value::Object(out)
    }
}

impl Destination {
    /// Errors for every `{"env": …}` secret whose variable is not set.
    pub fn unset_secrets(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        for (field, secret) in self.auth.secrets() {
            if let SecretSource::Env { env } = secret.source()
                && std::env::var_os(env).is_none()
            {
                errors.push(ConfigError::new(
                    format!("auth.{field}.env"),
                    format!("the environment variable {env} is not set"),
                ));
            }
        }
        ConfigError::collect(errors)
    }

    /// The dataflow's view of this destination; `audience` resolves a mapped audience's id
    /// (an unknown one is left out).
    pub fn plan(
        &self,
        audience: impl Fn(&str) -> Option<AudienceIdx>,
        now_ms: i64,
    ) -> DestinationPlan {
        DestinationPlan {
            id: self.id.clone(),
            include_segment_names: self.include_segment_names,
            include_segment_timestamps: self.include_segment_timestamps,
            mappings: self
                .audiences
                .iter()
                .filter_map(|m| {
                    let created_at = m.mapping_created_at.unwrap_or(now_ms);
                    Some(MappingPlan {
                        audience: audience(m.id.as_str())?,
                        created_at,
                        updated_at: m.mapping_updated_at.unwrap_or(created_at),
                    })
                })
                .collect(),
            attributes: self.attributes.clone(),
        }
    }

    /// The name, defaulting to the id.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }

    /// The custom headers, names and values trimmed, in order. Errors at `headers`.
    pub fn parsed_headers(&self) -> Result<Vec<(String, String)>, ConfigError> {
        parse_headers(&self.headers, &self.auth).map_err(|m| ConfigError::new("headers", m))
    }

    /// The query parameters as given (still percent-encoded), in order; a parameter without
    /// `=` has an empty value. Errors at `queryParameters`.
    pub fn parsed_query_parameters(&self) -> Result<Vec<(String, String)>, ConfigError> {
        parse_query(&self.query_parameters).map_err(|m| ConfigError::new("queryParameters", m))
    }

    /// The URL requests go to: the endpoint (normalized, without its fragment) with
    /// `queryParameters` appended after its own query.
    pub fn request_url(&self) -> String {
        let params = self.query_parameters.as_str();
        let (mut out, query) = match Url::parse(&self.endpoint) {
            Ok(mut url) => {
                url.set_fragment(None);
                let query = url.query().map(str::to_owned);
                (String::from(url), query)
            }
            Err(_) => {
                // Not validated: best effort on the raw text.
                let base = self
                    .endpoint
                    .split('#')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let query = base.split_once('?').map(|(_, q)| q.to_owned());
                (base, query)
            }
        };
        if params.is_empty() {
            return out;
        }
        match query {
            None => out.push('?'),
            Some(q) if q.is_empty() || q.ends_with('&') => {}
            Some(_) => out.push('&'),
        }
        out.push_str(params);
        out
    }

    /// Checks the object against the audiences of `config`; paths are relative to it.
    pub fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        check_id(&self.id)?;
        match &self.name {
            None => return Err(ConfigError::new("name", "missing")),
            Some(name) => check_non_empty(name, "name")?,
        }
        let endpoint =
            check_http_url(&self.endpoint).map_err(|m| ConfigError::new("endpoint", m))?;
        if !endpoint.username().is_empty() || endpoint.password().is_some() {
            // The URL is never echoed: it holds a credential.
            return Err(ConfigError::new(
                "endpoint",
                "credentials in the URL are not allowed; use `auth`",
            ));
        }
        if self.audiences.is_empty() {
            return Err(ConfigError::new(
                "audiences",
                "a destination maps at least one audience",
            ));
        }
        self.parsed_query_parameters()?;
        self.parsed_headers()?;
        self.auth.validate().map_err(|e| e.within("auth"))?;
        if let Some(tls) = &self.tls {
            tls.validate().map_err(|e| e.within("tls"))?;
        }
        let mut mapped = HashSet::new();
        for (i, mapping) in self.audiences.iter().enumerate() {
            let at = format!("audiences[{i}].id");
            if !config.audiences.iter().any(|a| a.id == mapping.id) {
                return Err(ConfigError::new(
                    at,
                    format!("unknown audience {:?}", mapping.id),
                ));
            }
            if !mapped.insert(mapping.id.as_str()) {
                return Err(ConfigError::new(
                    at,
                    format!("audience {:?} is mapped twice", mapping.id),
                ));
            }
        }
        for (i, path) in self.attributes.iter().enumerate() {
            check_attribute_path(path)
                .map_err(|m| ConfigError::new(format!("attributes[{i}]"), m))?;
        }
        self.delivery.validate().map_err(|e| e.within("delivery"))
    }

    /// Sets missing mapping timestamps: `mappingCreatedAt` to `now_ms`, `mappingUpdatedAt` to
    /// `mappingCreatedAt`.
    pub fn fill_timestamps(&mut self, now_ms: i64) {
        for mapping in &mut self.audiences {
            let created = *mapping.mapping_created_at.get_or_insert(now_ms);
            mapping.mapping_updated_at.get_or_insert(created);
        }
    }

    /// The object as the API shows it: defaults filled in, every secret redacted.
    pub fn redacted_json(&self) -> Value {
        let mut out = json!({
            "id": self.id,
            "name": self.display_name(),
            "description": self.description,
            "endpoint": self.endpoint,
            "queryParameters": self.query_parameters,
            "headers": self.headers,
            "auth": self.auth.redacted_json(),
            "includeSegmentNames": self.include_segment_names,
            "includeSegmentTimestamps": self.include_segment_timestamps,
            "audiences": self.audiences.iter().map(AudienceMapping::redacted_json).collect::<Vec<_>>(),
            "attributes": self.attributes,
            "delivery": self.delivery.redacted_json(),
        });
        if let (Some(tls), Some(obj)) = (&self.tls, out.as_object_mut()) {
            obj.insert("tls".into(), tls.redacted_json());
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The whole configuration
// ---------------------------------------------------------------------------------------------

impl Config {
    /// Parses and validates a configuration.
    pub fn from_json_str(text: &str) -> Result<Config, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| located_error(&e))?;
        let mut errors = Vec::new();
        unknown::unknown_fields(&value, unknown::Kind::Config, "", &mut errors);
        match parse_value::<Config>(value) {
            Ok(config) => {
                if let Err(e) = config.validate() {
                    errors.push(e);
                }
                ConfigError::collect(errors).map(|()| config)
            }
            Err(e) => {
                errors.push(e);
                ConfigError::collect(errors).map(|()| Config::default())
            }
        }
    }

    /// The secrets given as `{"env": "VAR"}` whose variable is not set, one error each (field
    /// path and variable name; never a value). Delivery needs them; `validate` and the start of
    /// a delivering `replay` check them.
    pub fn unset_secrets(&self) -> Result<(), ConfigError> {
        let errors = self
            .destinations
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                d.unset_secrets()
                    .err()
                    .map(|e| e.within(&format!("destinations[{i}]")))
            })
            .collect();
        ConfigError::collect(errors)
    }

    /// Reads, parses and validates a configuration file. A file that cannot be read is an error
    /// at the file's path.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path.display().to_string(), e.to_string()))?;
        Config::from_json_str(&text)
    }

    /// Checks everything: the error holds every object's first problem, in file order.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_count("mergePolicies", self.merge_policies.len())?;
        check_count("audiences", self.audiences.len())?;
        check_count("destinations", self.destinations.len())?;

        // Each object's first problem, every object checked.
        let mut errors = Vec::new();
        let mut ids = HashMap::new();
        for (i, policy) in self.merge_policies.iter().enumerate() {
            let at = format!("mergePolicies[{i}]");
            errors.extend(policy.validate().map_err(|e| e.within(&at)).err());
            errors.extend(check_unique(&mut ids, &policy.id, &at).err());
        }
        let mut ids = HashMap::new();
        for (i, audience) in self.audiences.iter().enumerate() {
            let at = format!("audiences[{i}]");
            errors.extend(audience.validate(self).map_err(|e| e.within(&at)).err());
            errors.extend(check_unique(&mut ids, &audience.id, &at).err());
        }
        let mut ids = HashMap::new();
        for (i, destination) in self.destinations.iter().enumerate() {
            let at = format!("destinations[{i}]");
            errors.extend(destination.validate(self).map_err(|e| e.within(&at)).err());
            errors.extend(check_unique(&mut ids, &destination.id, &at).err());
        }
        ConfigError::collect(errors)?;
        let paths: HashSet<&str> = self
            .destinations
            .iter()
            .flat_map(|d| d.attributes.iter().map(String::as_str))
            .collect();
        if paths.len() > MAX_OBJECTS {
            return Err(ConfigError::new(
                "destinations",
                format!("at most {MAX_OBJECTS} distinct attribute paths may be mapped"),
            ));
        }
        Ok(())
    }

    /// Validates and compiles.
    pub fn compile(&self, now_ms: i64) -> Result<Plan, ConfigError> {
        self.validate()?;
        Ok(self.plan(now_ms))
    }

    /// Compiles a validated configuration into the dataflow's plan: indices in config order,
    /// names defaulting to ids, missing timestamps set to `now_ms` (updated ones to the created
    /// ones). On an invalid configuration it does not panic, but the plan is unspecified
    /// (an unknown policy resolves to index 0, a rule that does not parse to an upload audience).
    pub fn plan(&self, now_ms: i64) -> Plan {
        let policy_index: HashMap<&str, PolicyIdx> =
            first_indices(self.merge_policies.iter().map(|p| p.id.as_str()));
        let audience_index: HashMap<&str, AudienceIdx> =
            first_indices(self.audiences.iter().map(|a| a.id.as_str()));
        Plan {
            policies: self.merge_policies.iter().map(MergePolicy::plan).collect(),
            audiences: self
                .audiences
                .iter()
                .map(|a| {
                    let policy = policy_index.get(a.merge_policy.as_str()).copied();
                    a.plan(policy.unwrap_or(0), now_ms)
                })
                .collect(),
            destinations: self
                .destinations
                .iter()
                .map(|d| d.plan(|id| audience_index.get(id).copied(), now_ms))
                .collect(),
            ..Plan::default()
        }
        .finish()
    }

    /// Sets every missing audience and mapping timestamp ([`Audience::fill_timestamps`],
    /// [`Destination::fill_timestamps`]), so that later plans do not move them.
    pub fn fill_timestamps(&mut self, now_ms: i64) {
        for audience in &mut self.audiences {
            audience.fill_timestamps(now_ms);
        }
        for destination in &mut self.destinations {
            destination.fill_timestamps(now_ms);
        }
    }

    /// The whole configuration as `validate` and the API show it: defaults filled in, every
    /// secret redacted.
    pub fn redacted_json(&self) -> Value {
        json!({
            "mergePolicies": self.merge_policies.iter().map(MergePolicy::redacted_json).collect::<Vec<_>>(),
            "audiences": self.audiences.iter().map(Audience::redacted_json).collect::<Vec<_>>(),
            "destinations": self.destinations.iter().map(Destination::redacted_json).collect::<Vec<_>>(),
        })
    }

    pub fn merge_policy(&self, id: &str) -> Option<&MergePolicy> {
        self.merge_policies.iter().find(|p| p.id == id)
    }

    pub fn audience(&self, id: &str) -> Option<&Audience> {
        self.audiences.iter().find(|a| a.id == id)
    }

    pub fn destination(&self, id: &str) -> Option<&Destination> {
        self.destinations.iter().find(|d| d.id == id)
    }

    /// Index of a destination in the plan (config order).
    pub fn destination_index(&self, id: &str) -> Option<DestinationIdx> {
        let i = self.destinations.iter().position(|d| d.id == id)?;
        DestinationIdx::try_from(i).ok()
    }

    /// Creates or replaces (by id) a merge policy after validating it; errors name paths inside
    /// the object and leave `self` unchanged. Returns whether it was created.
    pub fn put_merge_policy(&mut self, policy: MergePolicy) -> Result<bool, ConfigError> {
        policy.validate()?;
        match self.merge_policies.iter_mut().find(|p| p.id == policy.id) {
            Some(slot) => {
                *slot = policy;
                Ok(false)
            }
            None => {
                check_count("", self.merge_policies.len() + 1)?;
                self.merge_policies.push(policy);
                Ok(true)
            }
        }
    }

    /// Creates or replaces (by id) an audience after validating it against the merge policies.
    /// A missing `createdAt` keeps the replaced audience's (else `now_ms`); a missing
    /// `updatedAt` is `now_ms` on a replacement, `createdAt` on a creation.
    pub fn put_audience(
        &mut self,
        mut audience: Audience,
        now_ms: i64,
    ) -> Result<bool, ConfigError> {
        audience.validate(self)?;
        match self.audiences.iter_mut().find(|a| a.id == audience.id) {
            Some(slot) => {
                if audience.created_at.is_none() {
                    audience.created_at = Some(slot.created_at.unwrap_or(now_ms));
                }
                audience.updated_at.get_or_insert(now_ms);
                *slot = audience;
                Ok(false)
            }
            None => {
                check_count("", self.audiences.len() + 1)?;
                audience.fill_timestamps(now_ms);
                self.audiences.push(audience);
                Ok(true)
            }
        }
    }

    /// Creates or replaces (by id) a destination after validating it against the audiences.
    /// Missing mapping timestamps of an audience the replaced destination already mapped are
    /// kept from it; the others are `now_ms`.
    pub fn put_destination(
        &mut self,
        mut destination: Destination,
        now_ms: i64,
    ) -> Result<bool, ConfigError> {
        destination.validate(self)?;
        let existing = self
            .destinations
            .iter()
            .position(|d| d.id == destination.id);
        if let Some(old) = existing.and_then(|i| self.destinations.get(i)) {
            for mapping in &mut destination.audiences {
                if let Some(before) = old.audiences.iter().find(|m| m.id == mapping.id) {
                    if mapping.mapping_created_at.is_none() {
                        mapping.mapping_created_at = before.mapping_created_at;
                    }
                    if mapping.mapping_updated_at.is_none() {
                        mapping.mapping_updated_at = before.mapping_updated_at;
                    }
                }
            }
        }
        destination.fill_timestamps(now_ms);
        match existing.and_then(|i| self.destinations.get_mut(i)) {
            Some(slot) => {
                *slot = destination;
                Ok(false)
            }
            None => {
                check_count("", self.destinations.len() + 1)?;
                self.destinations.push(destination);
                Ok(true)
            }
        }
    }

    /// Ids of the audiences that belong to a merge policy.
    pub fn audiences_of_policy(&self, policy_id: &str) -> Vec<&str> {
        self.audiences
            .iter()
            .filter(|a| a.merge_policy == policy_id)
            .map(|a| a.id.as_str())
            .collect()
    }

    /// Ids of the destinations that map an audience.
    pub fn destinations_mapping(&self, audience_id: &str) -> Vec<&str> {
        self.destinations
            .iter()
            .filter(|d| d.audiences.iter().any(|m| m.id == audience_id))
            .map(|d| d.id.as_str())
            .collect()
    }

    /// Deletes a merge policy. `Ok(false)`: no such id. `Err`: an audience still references it
    /// (the error names the audience's `mergePolicy` field); nothing changes.
    pub fn remove_merge_policy(&mut self, id: &str) -> Result<bool, ConfigError> {
        if let Some((i, a)) = self
            .audiences
            .iter()
            .enumerate()
            .find(|(_, a)| a.merge_policy == id)
        {
            return Err(ConfigError::new(
                format!("audiences[{i}].mergePolicy"),
                format!("merge policy {id:?} is used by audience {:?}", a.id),
            ));
        }
        let before = self.merge_policies.len();
        self.merge_policies.retain(|p| p.id != id);
        Ok(self.merge_policies.len() != before)
    }

    /// Deletes an audience. `Ok(false)`: no such id. `Err`: a destination still maps it.
    pub fn remove_audience(&mut self, id: &str) -> Result<bool, ConfigError> {
        for (i, d) in self.destinations.iter().enumerate() {
            if let Some(j) = d.audiences.iter().position(|m| m.id == id) {
                return Err(ConfigError::new(
                    format!("destinations[{i}].audiences[{j}].id"),
                    format!("audience {id:?} is mapped by destination {:?}", d.id),
                ));
            }
        }
        let before = self.audiences.len();
        self.audiences.retain(|a| a.id != id);
        Ok(self.audiences.len() != before)
    }

    /// Deletes a destination; `false` when there was none with this id.
    pub fn remove_destination(&mut self, id: &str) -> bool {
        let before = self.destinations.len();
        self.destinations.retain(|d| d.id != id);
        self.destinations.len() != before
    }
}

fn check_count(path: &str, len: usize) -> Result<(), ConfigError> {
    if len > MAX_OBJECTS {
        Err(ConfigError::new(
            if path.is_empty() { ROOT } else { path },
            format!("at most {MAX_OBJECTS} objects of one kind are supported"),
        ))
    } else {
        Ok(())
    }
}

fn check_unique<'a>(
    seen: &mut HashMap<&'a str, String>,
    id: &'a str,
    at: &str,
) -> Result<(), ConfigError> {
    if let Some(first) = seen.get(id) {
        return Err(ConfigError::new(
            format!("{at}.id"),
            format!("duplicate id {id:?} (also {first})"),
        ));
    }
    seen.insert(id, at.to_owned());
    Ok(())
}

fn first_indices<'a>(ids: impl Iterator<Item = &'a str>) -> HashMap<&'a str, u16> {
    let mut index = HashMap::new();
    for (i, id) in ids.enumerate() {
        if let Ok(i) = u16::try_from(i) {
            index.entry(id).or_insert(i);
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_in_name_index_form() {
        assert_eq!(
            ConfigError::new("rule", "x").within("audiences[2]").path,
            "audiences[2].rule"
        );
        assert_eq!(
            ConfigError::new("[1]", "x").within("retryOn").path,
            "retryOn[1]"
        );
        assert_eq!(ConfigError::new("", "x").within("auth").path, "auth");
        assert_eq!(ConfigError::new(ROOT, "x").within("auth").path, "auth");
        assert_eq!(
            ConfigError::new("clientSecret", "missing").to_string(),
            "clientSecret: missing"
        );
    }

    #[test]
    fn query_parameters_are_kept_as_given() {
        assert_eq!(parse_query(""), Ok(vec![]));
        assert_eq!(
            parse_query("a=1&b=&flag&c=x%2Fy=z"),
            Ok(vec![
                ("a".into(), "1".into()),
                ("b".into(), "".into()),
                ("flag".into(), "".into()),
                ("c".into(), "x%2Fy=z".into()),
            ])
        );
        for bad in [
            "a=1 ", "a=é", "a=\t", "a=<x>", "&a=1", "a=1&&b=2", "a=%2", "a=%",
        ] {
            assert!(parse_query(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn header_names_are_tokens_and_values_have_no_controls() {
        let ok = parse_headers("x-a:1,X_B!#$%&'*+.^`|~:v\ta , x-c : é", &Auth::None);
        assert_eq!(
            ok,
            Ok(vec![
                ("x-a".into(), "1".into()),
                ("X_B!#$%&'*+.^`|~".into(), "v\ta".into()),
                ("x-c".into(), "é".into()),
            ])
        );
        for bad in [
            "x(a):1",
            "x\"a:1",
            "x/a:1",
            "é:1",
            "x:a\rb",
            "x:a\u{7f}",
            "x:a\u{85}",
            "x-a:1,",
        ] {
            assert!(parse_headers(bad, &Auth::None).is_err(), "{bad:?}");
        }
        assert!(parse_headers("Content-Type: text/plain", &Auth::None).is_err());
        assert!(parse_headers("Idempotency-Key: 1", &Auth::None).is_err());
        let bearer = Auth::Bearer {
            token: Secret::literal("t"),
        };
        assert!(parse_headers("AUTHORIZATION: x", &bearer).is_err());
        assert!(parse_headers("AUTHORIZATION: x", &Auth::None).is_ok());
    }

    #[test]
    fn a_config_survives_serialization() {
        let text = r#"{"mergePolicies":[{"id":"p","attributeMerge":{"datasetPrecedence":["a"]},"identityStitching":"none"}],
            "audiences":[{"id":"a","mergePolicy":"p","source":"upload"}],
            "destinations":[
              {"id":"d1","name":"D1","endpoint":"https://x/","audiences":[{"id":"a"}],"auth":{"type":"oauth2Password","accessTokenUrl":"https://a/t",
                "clientId":"c","clientSecret":{"env":"S"},"username":"u","password":"pw"}},
              {"id":"d2","name":"D2","endpoint":"https://x/","auth":{"type":"oauth2ClientCredentials","accessTokenUrl":"https://a/t",
                "clientId":"c","clientSecret":"s","clientCredentialsType":"bodyFormEncoded"},
               "audiences":[{"id":"a","mappingCreatedAt":3}]},
              {"id":"d3","name":"D3","endpoint":"https://x/","audiences":[{"id":"a"}],"auth":{"type":"bearer","token":"t"}}]}"#;
        let config = Config::from_json_str(text).unwrap();
        let stored = serde_json::to_string(&config).unwrap();
        assert_eq!(Config::from_json_str(&stored), Ok(config.clone()));
        assert_eq!(config.destinations[0].auth.type_name(), "oauth2Password");
        let shown = config.redacted_json();
        assert_eq!(shown["destinations"][0]["auth"]["password"], "<redacted>");
        assert_eq!(
            shown["destinations"][0]["auth"]["clientSecret"],
            json!({"env": "S"})
        );
        assert_eq!(
            shown["destinations"][1]["auth"]["clientCredentialsType"],
            "bodyFormEncoded"
        );
        assert_eq!(
            shown["destinations"][1]["audiences"][0],
            json!({"id": "a", "mappingCreatedAt": 3})
        );
        assert_eq!(shown["audiences"][0]["source"], "upload");
        assert_eq!(
            shown["mergePolicies"][0]["attributeMerge"],
            json!({"datasetPrecedence": ["a"]})
        );
    }

    #[test]
    fn secrets_naming_impossible_variables_are_refused() {
        let auth = Auth::Bearer {
            token: Secret::from_env("A=B"),
        };
        assert_eq!(auth.validate().unwrap_err().path, "token.env");
        let auth = Auth::Bearer {
            token: Secret::literal(""),
        };
        assert_eq!(auth.validate().unwrap_err().path, "token");
    }

    #[test]
    fn plan_never_panics_on_an_invalid_config() {
        let config = Config {
            audiences: vec![Audience {
                id: "a".into(),
                name: None,
                merge_policy: "missing".into(),
                rule: Some("((".into()),
                source: None,
                created_at: None,
                updated_at: None,
            }],
            ..Config::default()
        };
        assert!(config.validate().is_err());
        assert!(config.compile(0).is_err());
        let plan = config.plan(0);
        assert_eq!(plan.audiences.len(), 1);
        assert!(matches!(plan.audiences[0].kind, AudienceKind::Upload));
    }
}
