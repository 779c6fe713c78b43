//! Unknown fields: every object of a configuration is checked against the fields its type
//! knows, before typed parsing, so that a misspelt field is an error naming its path and the
//! closest known field (`destinations[0].atributes: unknown field, did you mean
//! "attributes"?`) instead of a silently ignored setting. Every unknown field is reported.

use serde_json::Value;

use super::ConfigError;

/// The kinds of objects in a configuration, and the fields each knows.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    Config,
    MergePolicy,
    AttributeMerge,
    Audience,
    Destination,
    Mapping,
    Auth,
    Secret,
    Delivery,
    Tls,
}

impl Kind {
    fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Config => &["mergePolicies", "audiences", "destinations"],
            Kind::MergePolicy => &["id", "name", "attributeMerge", "identityStitching"],
            Kind::AttributeMerge => &["datasetPrecedence"],
            Kind::Audience => &[
                "id",
                "name",
                "mergePolicy",
                "rule",
                "source",
                "createdAt",
                "updatedAt",
            ],
            Kind::Destination => &[
                "id",
                "name",
                "description",
                "endpoint",
                "queryParameters",
                "headers",
                "auth",
                "includeSegmentNames",
                "includeSegmentTimestamps",
                "audiences",
                "attributes",
                "delivery",
                "tls",
            ],
            Kind::Mapping => &["id", "mappingCreatedAt", "mappingUpdatedAt"],
            Kind::Auth => &[
                "type",
                "token",
                "accessTokenUrl",
                "clientId",
                "clientSecret",
                "username",
                "password",
                "clientCredentialsType",
            ],
            Kind::Secret => &["env"],
            Kind::Delivery => &["maxRetries", "timeoutMs", "maxInFlight", "retryOn"],
            Kind::Tls => &["caFile", "clientCertFile", "clientKeyFile"],
        }
    }

    /// The kind of the object under `field`, if it is an object with known fields.
    fn child(self, field: &str) -> Option<Kind> {
        Some(match (self, field) {
            (Kind::Config, "mergePolicies") => Kind::MergePolicy,
            (Kind::Config, "audiences") => Kind::Audience,
            (Kind::Config, "destinations") => Kind::Destination,
            (Kind::MergePolicy, "attributeMerge") => Kind::AttributeMerge,
            (Kind::Destination, "audiences") => Kind::Mapping,
            (Kind::Destination, "auth") => Kind::Auth,
            (Kind::Destination, "delivery") => Kind::Delivery,
            (Kind::Destination, "tls") => Kind::Tls,
            (Kind::Auth, "token" | "clientSecret" | "password") => Kind::Secret,
            _ => return None,
        })
    }
}

/// Every unknown field in `value` (an object of `kind`, at `path`), in document order.
pub(super) fn unknown_fields(value: &Value, kind: Kind, path: &str, out: &mut Vec<ConfigError>) {
    let Value::Object(map) = value else {
        return; // not an object: typed parsing reports the type
    };
    for (field, inner) in map {
        let at = if path.is_empty() {
            field.clone()
        } else {
            format!("{path}.{field}")
        };
        let known = kind.fields();
        if !known.contains(&field.as_str()) {
            let message = match closest(field, known) {
                Some(near) => format!("unknown field, did you mean {near:?}?"),
                None => format!("unknown field (known fields: {})", known.join(", ")),
            };
            out.push(ConfigError::new(at, message));
            continue;
        }
        let Some(child) = kind.child(field) else {
            continue;
        };
        match inner {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    unknown_fields(item, child, &format!("{at}[{i}]"), out);
                }
            }
            other => unknown_fields(other, child, &at, out),
        }
    }
}

/// The known field nearest to `field` by edit distance (case-insensitive), if near enough to be
/// a likely misspelling.
fn closest<'a>(field: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = field.to_lowercase();
    known
        .iter()
        .map(|k| (distance(&lower, &k.to_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            previous = here;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_nearest_field() {
        assert_eq!(
            closest("atributes", Kind::Destination.fields()),
            Some("attributes")
        );
        assert_eq!(
            closest("Endpoint", Kind::Destination.fields()),
            Some("endpoint")
        );
        assert_eq!(closest("zzzzzzzz", Kind::Destination.fields()), None);
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
