//! The configuration stage's contract (SPEC §2): the example validates, invalid configurations
//! are refused with the field path, and the helpers the other stages use.

use std::path::Path;

use serde_json::{Value, json};
use streamdest::config::{Auth, Config, ConfigError, Destination, parse_json};
use streamdest_operators::plan::{self, AudienceKind, Stitching};

fn example_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

fn example_value() -> Value {
    serde_json::from_str(&example_text()).expect("examples/config.json is JSON")
}

/// Sets (or, with `None`, removes) the value at a JSON pointer.
fn edit(mut v: Value, pointer: &str, new: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    let target = v
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("no {parent}"));
    match (target, new) {
        (Value::Object(map), Some(new)) => {
            map.insert(key.to_owned(), new);
        }
        (Value::Object(map), None) => {
            map.remove(key);
        }
        (Value::Array(items), Some(new)) => {
            let i: usize = key.parse().expect("index");
            if i == items.len() {
                items.push(new);
            } else {
                items[i] = new;
            }
        }
        (Value::Array(items), None) => {
            items.remove(key.parse::<usize>().expect("index"));
        }
        _ => panic!("{parent} is not a container"),
    }
    v
}

fn load(v: &Value) -> Result<Config, ConfigError> {
    Config::from_json_str(&v.to_string())
}

#[test]
fn the_example_validates() {
    let config =
        Config::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config.json"))
            .expect("the SPEC example validates");
    assert_eq!(config.merge_policies.len(), 2);
    assert_eq!(config.audiences.len(), 2);
    let d = &config.destinations[0];
    assert!(matches!(d.auth, Auth::Oauth2ClientCredentials { .. }));
    assert_eq!(d.delivery.retry_on, vec![408, 429, 500, 502, 503, 504]);
    assert_eq!(
        d.request_url(),
        "https://collector.example.com/v1/profiles?source=aep&env=prod"
    );
    assert_eq!(
        d.parsed_headers().unwrap(),
        vec![
            ("x-api-version".into(), "2".into()),
            ("x-team".into(), "growth".into())
        ]
    );
}

#[test]
fn a_missing_file_is_an_error_at_its_path() {
    let err = Config::from_file(Path::new("/nonexistent/streamdest.json")).unwrap_err();
    assert_eq!(err.path, "/nonexistent/streamdest.json");
}

#[test]
fn json_syntax_errors_name_line_and_column() {
    let err = Config::from_json_str("{\n  \"audiences\": [,]\n}").unwrap_err();
    assert!(err.to_string().starts_with("line 2 column "), "{err}");
    let err = Config::from_json_str("{} x").unwrap_err();
    assert!(err.to_string().starts_with("line 1 column "), "{err}");
    let err = Config::from_json_str("[]").unwrap_err();
    assert_eq!(err.to_string(), "(root): expected a JSON object");
    let err = Config::from_json_str("").unwrap_err();
    assert!(err.to_string().starts_with("line 1 column 0: EOF"), "{err}");
}

#[test]
fn invalid_configs_name_the_field_path() {
    let base = example_value();
    let d0 = "/destinations/0";
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "missing clientSecret",
            edit(base.clone(), &format!("{d0}/auth/clientSecret"), None),
            "destinations[0].auth.clientSecret: missing",
        ),
        (
            "missing auth type",
            edit(base.clone(), &format!("{d0}/auth/type"), None),
            "destinations[0].auth.type: missing",
        ),
        (
            "unknown auth type",
            edit(base.clone(), &format!("{d0}/auth/type"), Some(json!("foo"))),
            "destinations[0].auth.type: unknown variant `foo`",
        ),
        (
            "ill-typed clientId",
            edit(base.clone(), &format!("{d0}/auth/clientId"), Some(json!(5))),
            "destinations[0].auth.clientId: invalid type",
        ),
        (
            "ill-typed secret",
            edit(
                base.clone(),
                &format!("{d0}/auth/clientSecret"),
                Some(json!(5)),
            ),
            "destinations[0].auth.clientSecret: expected a string or",
        ),
        (
            "empty secret env var",
            edit(
                base.clone(),
                &format!("{d0}/auth/clientSecret"),
                Some(json!({"env": ""})),
            ),
            "destinations[0].auth.clientSecret.env: ",
        ),
        (
            "bad clientCredentialsType",
            edit(
                base.clone(),
                &format!("{d0}/auth/clientCredentialsType"),
                Some(json!("x")),
            ),
            "destinations[0].auth.clientCredentialsType: unknown variant",
        ),
        (
            "bad accessTokenUrl",
            edit(
                base.clone(),
                &format!("{d0}/auth/accessTokenUrl"),
                Some(json!("/token")),
            ),
            "destinations[0].auth.accessTokenUrl: ",
        ),
        (
            "empty clientId",
            edit(
                base.clone(),
                &format!("{d0}/auth/clientId"),
                Some(json!("")),
            ),
            "destinations[0].auth.clientId: must not be empty",
        ),
        (
            "bearer without token",
            edit(
                base.clone(),
                &format!("{d0}/auth"),
                Some(json!({"type": "bearer"})),
            ),
            "destinations[0].auth.token: missing",
        ),
        (
            "oauth2Password without username",
            edit(
                base.clone(),
                &format!("{d0}/auth"),
                Some(
                    json!({"type": "oauth2Password", "accessTokenUrl": "https://a/t",
                            "clientId": "c", "clientSecret": "s", "password": "p"}),
                ),
            ),
            "destinations[0].auth.username: missing",
        ),
        (
            "oauth2Password with empty username",
            edit(
                base.clone(),
                &format!("{d0}/auth"),
                Some(
                    json!({"type": "oauth2Password", "accessTokenUrl": "https://a/t",
                            "clientId": "c", "clientSecret": "s", "username": " ", "password": "p"}),
                ),
            ),
            "destinations[0].auth.username: must not be empty",
        ),
        (
            "bad header name",
            edit(
                base.clone(),
                &format!("{d0}/headers"),
                Some(json!("x-ok:1,bad name:2")),
            ),
            "destinations[0].headers: header 2",
        ),
        (
            "header value with CR LF",
            edit(
                base.clone(),
                &format!("{d0}/headers"),
                Some(json!("x-a:v\r\nInjected: 1")),
            ),
            "destinations[0].headers: header 1 (x-a): the value contains CR, LF",
        ),
        (
            "header value with NUL",
            edit(
                base.clone(),
                &format!("{d0}/headers"),
                Some(json!("x-a:v\u{0}w")),
            ),
            "destinations[0].headers: header 1",
        ),
        (
            "header without colon",
            edit(base.clone(), &format!("{d0}/headers"), Some(json!("x-a"))),
            "destinations[0].headers: header 1 has no ':'",
        ),
        (
            "header with empty name",
            edit(
                base.clone(),
                &format!("{d0}/headers"),
                Some(json!("x-a:1, :2")),
            ),
            "destinations[0].headers: header 2 has an empty name",
        ),
        (
            "Authorization header beside oauth2",
            edit(
                base.clone(),
                &format!("{d0}/headers"),
                Some(json!("authorization: Basic x")),
            ),
            "destinations[0].headers: header 1: an Authorization header",
        ),
        (
            "Authorization header beside bearer",
            edit(
                edit(
                    base.clone(),
                    &format!("{d0}/auth"),
                    Some(json!({"type": "bearer", "token": "t"})),
                ),
                &format!("{d0}/headers"),
                Some(json!("x-a:1,Authorization:Bearer other")),
            ),
            "destinations[0].headers: header 2: an Authorization header cannot be set beside auth type \"bearer\"",
        ),
        (
            "space in a query parameter",
            edit(
                base.clone(),
                &format!("{d0}/queryParameters"),
                Some(json!("a=1&b=x y")),
            ),
            "destinations[0].queryParameters: parameter 2",
        ),
        (
            "# in a query parameter",
            edit(
                base.clone(),
                &format!("{d0}/queryParameters"),
                Some(json!("a=1#x")),
            ),
            "destinations[0].queryParameters: parameter 1",
        ),
        (
            "empty query parameter name",
            edit(
                base.clone(),
                &format!("{d0}/queryParameters"),
                Some(json!("a=1&=2")),
            ),
            "destinations[0].queryParameters: parameter 2 has an empty name",
        ),
        (
            "bad percent escape",
            edit(
                base.clone(),
                &format!("{d0}/queryParameters"),
                Some(json!("a=%zz")),
            ),
            "destinations[0].queryParameters: parameter 1: '%'",
        ),
        (
            "unknown audience in a mapping",
            edit(
                base.clone(),
                &format!("{d0}/audiences/0/id"),
                Some(json!("nope")),
            ),
            "destinations[0].audiences[0].id: unknown audience \"nope\"",
        ),
        (
            "audience mapped twice",
            edit(
                base.clone(),
                &format!("{d0}/audiences/1"),
                Some(json!({"id": "5b998cb9-9488-4ec3-8d95-fa8338ced490"})),
            ),
            "destinations[0].audiences[1].id: audience \"5b998cb9-9488-4ec3-8d95-fa8338ced490\" is mapped twice",
        ),
        (
            "bad rule",
            edit(
                base.clone(),
                "/audiences/0/rule",
                Some(json!("person.name = = 1")),
            ),
            "audiences[0].rule: audience \"5b998cb9-9488-4ec3-8d95-fa8338ced490\": column 15: ",
        ),
        (
            "unknown merge policy",
            edit(
                base.clone(),
                "/audiences/1/mergePolicy",
                Some(json!("mp-nope")),
            ),
            "audiences[1].mergePolicy: unknown merge policy \"mp-nope\"",
        ),
        (
            "audience with neither rule nor source",
            edit(base.clone(), "/audiences/1/source", None),
            "audiences[1].rule: missing",
        ),
        (
            "audience with both rule and source",
            edit(base.clone(), "/audiences/0/source", Some(json!("upload"))),
            "audiences[0].source: ",
        ),
        (
            "audience with another source",
            edit(base.clone(), "/audiences/1/source", Some(json!("csv"))),
            "audiences[1].source: unknown source \"csv\"",
        ),
        (
            "duplicate audience id",
            edit(
                base.clone(),
                "/audiences/1/id",
                Some(json!("5b998cb9-9488-4ec3-8d95-fa8338ced490")),
            ),
            "audiences[1].id: duplicate id",
        ),
        (
            "duplicate merge policy id",
            edit(base.clone(), "/mergePolicies/1/id", Some(json!("mp-time"))),
            "mergePolicies[1].id: duplicate id \"mp-time\"",
        ),
        (
            "duplicate destination id",
            {
                let d = base.pointer(d0).cloned().unwrap();
                edit(base.clone(), "/destinations/1", Some(d))
            },
            "destinations[1].id: duplicate id \"analytics\"",
        ),
        (
            "empty id",
            edit(base.clone(), "/mergePolicies/0/id", Some(json!(""))),
            "mergePolicies[0].id: must not be empty",
        ),
        (
            "missing id",
            edit(base.clone(), "/mergePolicies/0/id", None),
            "mergePolicies[0].id: missing",
        ),
        (
            "unknown attribute merge",
            edit(
                base.clone(),
                "/mergePolicies/0/attributeMerge",
                Some(json!("newest")),
            ),
            "mergePolicies[0].attributeMerge: unknown attribute merge \"newest\"",
        ),
        (
            "empty dataset precedence",
            edit(
                base.clone(),
                "/mergePolicies/1/attributeMerge",
                Some(json!({"datasetPrecedence": []})),
            ),
            "mergePolicies[1].attributeMerge.datasetPrecedence: ",
        ),
        (
            "ill-typed dataset precedence",
            edit(
                base.clone(),
                "/mergePolicies/1/attributeMerge",
                Some(json!({"datasetPrecedence": ["a", 1]})),
            ),
            "mergePolicies[1].attributeMerge.datasetPrecedence[1]: invalid type",
        ),
        (
            "ill-typed attribute merge",
            edit(
                base.clone(),
                "/mergePolicies/1/attributeMerge",
                Some(json!(3)),
            ),
            "mergePolicies[1].attributeMerge: invalid type",
        ),
        (
            "unknown identity stitching",
            edit(
                base.clone(),
                "/mergePolicies/1/identityStitching",
                Some(json!("graph")),
            ),
            "mergePolicies[1].identityStitching: unknown variant `graph`",
        ),
        (
            "bad retryOn",
            edit(
                base.clone(),
                &format!("{d0}/delivery/retryOn"),
                Some(json!([500, 600])),
            ),
            "destinations[0].delivery.retryOn[1]: 600",
        ),
        (
            "negative retryOn",
            edit(
                base.clone(),
                &format!("{d0}/delivery/retryOn"),
                Some(json!([-1])),
            ),
            "destinations[0].delivery.retryOn[0]: invalid value",
        ),
        (
            "too many retries",
            edit(
                base.clone(),
                &format!("{d0}/delivery/maxRetries"),
                Some(json!(11)),
            ),
            "destinations[0].delivery.maxRetries: must be at most 10",
        ),
        (
            "zero timeout",
            edit(
                base.clone(),
                &format!("{d0}/delivery/timeoutMs"),
                Some(json!(0)),
            ),
            "destinations[0].delivery.timeoutMs: ",
        ),
        (
            "zero maxInFlight",
            edit(
                base.clone(),
                &format!("{d0}/delivery/maxInFlight"),
                Some(json!(0)),
            ),
            "destinations[0].delivery.maxInFlight: ",
        ),
        (
            "relative endpoint",
            edit(
                base.clone(),
                &format!("{d0}/endpoint"),
                Some(json!("/v1/profiles")),
            ),
            "destinations[0].endpoint: ",
        ),
        (
            "ftp endpoint",
            edit(
                base.clone(),
                &format!("{d0}/endpoint"),
                Some(json!("ftp://example.com/x")),
            ),
            "destinations[0].endpoint: the scheme must be http or https",
        ),
        (
            "missing endpoint",
            edit(base.clone(), &format!("{d0}/endpoint"), None),
            "destinations[0].endpoint: missing",
        ),
        (
            "ill-typed endpoint",
            edit(base.clone(), &format!("{d0}/endpoint"), Some(json!(1))),
            "destinations[0].endpoint: invalid type",
        ),
        (
            "attribute path with an empty segment",
            edit(
                base.clone(),
                &format!("{d0}/attributes/1"),
                Some(json!("person..name")),
            ),
            "destinations[0].attributes[1]: ",
        ),
        (
            "attribute path with a space",
            edit(
                base.clone(),
                &format!("{d0}/attributes/0"),
                Some(json!("person.first name")),
            ),
            "destinations[0].attributes[0]: ",
        ),
        (
            "empty attribute path",
            edit(base.clone(), &format!("{d0}/attributes/0"), Some(json!(""))),
            "destinations[0].attributes[0]: must not be empty",
        ),
        (
            "ill-typed include flag",
            edit(
                base.clone(),
                &format!("{d0}/includeSegmentNames"),
                Some(json!("yes")),
            ),
            "destinations[0].includeSegmentNames: invalid type",
        ),
    ];
    let mut failures = Vec::new();
    for (name, value, expected) in cases {
        match load(&value) {
            Ok(_) => failures.push(format!("{name}: accepted, expected {expected}")),
            Err(err) if !err.to_string().starts_with(expected) => {
                failures.push(format!("{name}: got {err:?}, expected prefix {expected:?}"))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// SPEC §2 (amended): an unknown field is an error naming its path and the closest known field,
/// and every problem of the document is reported, not only the first.
#[test]
fn unknown_fields_are_errors_with_a_suggestion_and_all_are_reported() {
    let v = edit(
        example_value(),
        "/destinations/0/atributes",
        Some(json!(["x"])),
    );
    let v = edit(v, "/destinations/0/delivery", Some(json!({"maxRetrys": 1})));
    let v = edit(v, "/mergePolicies/0/zzzzzzzzzzzz", Some(json!(true)));
    let v = edit(v, "/audiences/0/mergePolicy", Some(json!("nope")));
    let err = load(&v).unwrap_err();
    let lines: Vec<String> = err.all().iter().map(|e| e.to_string()).collect();
    assert!(
        lines.contains(
            &"destinations[0].atributes: unknown field, did you mean \"attributes\"?".to_string()
        ),
        "{lines:#?}"
    );
    assert!(
        lines.contains(
            &"destinations[0].delivery.maxRetrys: unknown field, did you mean \"maxRetries\"?"
                .to_string()
        ),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l
            .starts_with("mergePolicies[0].zzzzzzzzzzzz: unknown field (known fields: id, name,")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("audiences[0].mergePolicy: unknown merge policy")),
        "{lines:#?}"
    );
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert_eq!(err.to_string().lines().count(), 4);
}

/// A destination needs a name and at least one audience; credentials in its endpoint URL are
/// refused and never echoed.
#[test]
fn destinations_need_a_name_an_audience_and_no_credentials_in_the_url() {
    let v = edit(example_value(), "/destinations/0/name", None);
    assert_eq!(
        load(&v).unwrap_err().to_string(),
        "destinations[0].name: missing"
    );
    let v = edit(
        example_value(),
        "/destinations/0/audiences",
        Some(json!([])),
    );
    assert_eq!(
        load(&v).unwrap_err().to_string(),
        "destinations[0].audiences: a destination maps at least one audience"
    );
    let v = edit(
        example_value(),
        "/destinations/0/endpoint",
        Some(json!("https://user:hunter2@collector.example.com/v1")),
    );
    let err = load(&v).unwrap_err().to_string();
    assert_eq!(
        err,
        "destinations[0].endpoint: credentials in the URL are not allowed; use `auth`"
    );
    assert!(!err.contains("hunter2"));
}

/// A secret `{"env": "VAR"}` whose variable is unset is an error naming the field and the
/// variable (checked where delivery needs it: `validate`, a delivering `replay`).
#[test]
fn unset_environment_secrets_are_reported() {
    let v = edit(
        example_value(),
        "/destinations/0/auth/clientSecret",
        Some(json!({"env": "STREAMDEST_TEST_SURELY_UNSET_1"})),
    );
    let config = load(&v).expect("the document itself is valid");
    assert_eq!(
        config.unset_secrets().unwrap_err().to_string(),
        "destinations[0].auth.clientSecret.env: the environment variable STREAMDEST_TEST_SURELY_UNSET_1 is not set"
    );
    let v = edit(
        v,
        "/destinations/0/auth/clientSecret",
        Some(json!("literal")),
    );
    assert!(load(&v).unwrap().unset_secrets().is_ok());
}

#[test]
fn defaults_are_filled() {
    let config = Config::from_json_str(
        r#"{"mergePolicies":[{"id":"p","attributeMerge":"timestampOrdered","identityStitching":"none"}],
            "audiences":[{"id":"a","mergePolicy":"p","rule":"exists x"}],
            "destinations":[{"id":"d","name":"D","endpoint":"http://localhost:9/x","audiences":[{"id":"a"}]}]}"#,
    )
    .unwrap();
    let d = &config.destinations[0];
    assert_eq!(d.auth, Auth::None);
    assert_eq!(d.delivery.max_retries, 2);
    assert_eq!(d.delivery.timeout_ms, 2000);
    assert_eq!(d.delivery.max_in_flight, 256);
    assert_eq!(d.delivery.retry_on, vec![408, 429, 500, 502, 503, 504]);
    assert_eq!(d.parsed_headers().unwrap(), vec![]);
    assert_eq!(d.request_url(), "http://localhost:9/x");

    let shown = config.redacted_json();
    assert_eq!(shown["destinations"][0]["name"], "D");
    assert_eq!(shown["destinations"][0]["auth"], json!({"type": "none"}));
    assert_eq!(shown["destinations"][0]["delivery"]["maxRetries"], 2);
    assert_eq!(shown["destinations"][0]["includeSegmentNames"], false);
    assert_eq!(shown["audiences"][0]["name"], "a");
    assert_eq!(shown["mergePolicies"][0]["name"], "p");
}

fn destination(endpoint: &str, query: &str) -> Destination {
    parse_json(&json!({"id": "d", "endpoint": endpoint, "queryParameters": query}).to_string())
        .unwrap()
}

#[test]
fn request_url_appends_query_parameters_in_order() {
    let cases = [
        ("https://x/p?a=1", "b=2", "https://x/p?a=1&b=2"),
        ("https://x/p", "b=2", "https://x/p?b=2"),
        ("https://x/p", "b=2&c=3", "https://x/p?b=2&c=3"),
        ("https://x/p", "", "https://x/p"),
        ("https://x/p?a=1", "", "https://x/p?a=1"),
        ("https://x/p?", "b=2", "https://x/p?b=2"),
        ("https://x/p?a=1&", "b=2", "https://x/p?a=1&b=2"),
        ("https://x/p#frag", "b=2", "https://x/p?b=2"),
        ("https://x/p?a=1#frag", "b=2", "https://x/p?a=1&b=2"),
        ("https://x/p#frag", "", "https://x/p"),
        ("https://x", "b=2", "https://x/?b=2"),
        (
            "http://x:8080/p",
            "q=%20x&flag",
            "http://x:8080/p?q=%20x&flag",
        ),
        ("https://x/p", "a='x'", "https://x/p?a='x'"),
    ];
    for (endpoint, query, expected) in cases {
        assert_eq!(
            destination(endpoint, query).request_url(),
            expected,
            "{endpoint} + {query}"
        );
    }
}

#[test]
fn parsed_headers_trims_names_and_values() {
    let mut d = destination("https://x/", "");
    d.headers = "  x-a :  1 ,x-b:two words ,\tx-c:\t,X-Empty:".into();
    assert_eq!(
        d.parsed_headers().unwrap(),
        vec![
            ("x-a".into(), "1".into()),
            ("x-b".into(), "two words".into()),
            ("x-c".into(), "".into()),
            ("X-Empty".into(), "".into()),
        ]
    );
    d.headers = "x-time: 10:30".into();
    assert_eq!(
        d.parsed_headers().unwrap(),
        vec![("x-time".into(), "10:30".into())]
    );
    d.headers = "Authorization: Basic abc".into();
    assert_eq!(
        d.parsed_headers().unwrap(),
        vec![("Authorization".into(), "Basic abc".into())]
    );
    d.headers = "".into();
    assert_eq!(d.parsed_headers().unwrap(), vec![]);
    d.headers = "x-a:1\n".into();
    assert_eq!(d.parsed_headers().unwrap_err().path, "headers");
}

#[test]
fn plan_resolves_indices_and_defaults() {
    let text = r#"{
      "mergePolicies":[
        {"id":"p0","attributeMerge":"timestampOrdered","identityStitching":"privateGraph"},
        {"id":"p1","attributeMerge":{"datasetPrecedence":["crm","web"]},"identityStitching":"none"}],
      "audiences":[
        {"id":"a0","mergePolicy":"p1","rule":"exists person.name","createdAt":5},
        {"id":"a1","name":"Uploaded","mergePolicy":"p0","source":"upload"},
        {"id":"a2","mergePolicy":"p1","rule":"true","createdAt":1,"updatedAt":2}],
      "destinations":[
        {"id":"d0","name":"D0","endpoint":"https://x/","audiences":[{"id":"a2"},{"id":"a0","mappingCreatedAt":7}],
         "attributes":["person.name","loyalty.points"],"includeSegmentNames":true},
        {"id":"d1","name":"D1","endpoint":"https://y/","audiences":[{"id":"a1"}],"attributes":["person.name"]}]}"#;
    let config = Config::from_json_str(text).unwrap();
    let p = config.plan(1_000);
    assert_eq!(p.policies.len(), 2);
    assert_eq!(p.policies[0].id, "p0");
    assert_eq!(p.policies[0].stitching, Stitching::PrivateGraph);
    assert_eq!(p.policies[0].merge, plan::AttributeMerge::TimestampOrdered);
    assert_eq!(p.policies[1].stitching, Stitching::None);
    assert_eq!(
        p.policies[1].merge,
        plan::AttributeMerge::DatasetPrecedence(vec!["crm".into(), "web".into()])
    );

    assert_eq!(p.audiences.len(), 3);
    let a0 = &p.audiences[0];
    assert_eq!(
        (a0.id.as_str(), a0.name.as_str(), a0.policy),
        ("a0", "a0", 1)
    );
    assert_eq!((a0.created_at, a0.updated_at), (5, 5));
    assert!(matches!(a0.kind, AudienceKind::Rule(_)));
    let a1 = &p.audiences[1];
    assert_eq!((a1.name.as_str(), a1.policy), ("Uploaded", 0));
    assert_eq!((a1.created_at, a1.updated_at), (1_000, 1_000));
    assert!(matches!(a1.kind, AudienceKind::Upload));
    assert_eq!(
        (p.audiences[2].created_at, p.audiences[2].updated_at),
        (1, 2)
    );

    let d0 = &p.destinations[0];
    assert_eq!(d0.id, "d0");
    assert!(d0.include_segment_names && !d0.include_segment_timestamps);
    assert_eq!(d0.mappings.len(), 2);
    assert_eq!(
        (
            d0.mappings[0].audience,
            d0.mappings[0].created_at,
            d0.mappings[0].updated_at
        ),
        (2, 1_000, 1_000)
    );
    assert_eq!(
        (
            d0.mappings[1].audience,
            d0.mappings[1].created_at,
            d0.mappings[1].updated_at
        ),
        (0, 7, 7)
    );
    assert_eq!(p.destinations[1].id, "d1");
    assert_eq!(
        p.mapped_paths,
        vec!["loyalty.points".to_owned(), "person.name".to_owned()]
    );
}

#[test]
fn redacted_json_never_shows_literal_secrets() {
    let canary = "canary-7b3e-secret";
    let mut v = example_value();
    v = edit(v, "/destinations/0/auth/clientSecret", Some(json!(canary)));
    let bearer = edit(
        edit(
            v.clone(),
            "/destinations/1",
            v.pointer("/destinations/0").cloned(),
        ),
        "/destinations/1/auth",
        Some(json!({"type": "bearer", "token": format!("{canary}-token")})),
    );
    let bearer = edit(bearer, "/destinations/1/id", Some(json!("second")));
    let password = edit(
        bearer,
        "/destinations/2",
        Some(
            json!({"id": "third", "name": "Third", "endpoint": "https://z/",
                    "audiences": [{"id": "5b998cb9-9488-4ec3-8d95-fa8338ced490"}],
                    "auth": {"type": "oauth2Password", "accessTokenUrl": "https://a/t",
                             "clientId": "c", "clientSecret": {"env": "THIRD_SECRET"},
                             "username": "u", "password": format!("{canary}-password")}}),
        ),
    );
    let config = load(&password).unwrap();
    let shown = config.redacted_json().to_string();
    assert!(!shown.contains("canary"), "{shown}");
    assert!(shown.contains("<redacted>"));
    assert!(shown.contains("THIRD_SECRET"));
    for d in &config.destinations {
        assert!(!d.redacted_json().to_string().contains("canary"));
    }
    assert!(!format!("{config:?}").contains("canary"));
}

#[test]
fn objects_change_one_by_one() {
    let mut config = Config::from_json_str(&example_text()).unwrap();
    let audience =
        parse_json(r#"{"id":"new","mergePolicy":"mp-crm","rule":"loyalty.points >"}"#).unwrap();
    let err = config.put_audience(audience, 10).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("rule: audience \"new\": column "),
        "{err}"
    );

    let audience =
        parse_json(r#"{"id":"new","mergePolicy":"mp-crm","rule":"loyalty.points > 10"}"#).unwrap();
    assert!(config.put_audience(audience, 10).unwrap());
    assert_eq!(config.audience("new").unwrap().created_at, Some(10));

    let audience =
        parse_json(r#"{"id":"new","mergePolicy":"mp-crm","rule":"loyalty.points > 20"}"#).unwrap();
    assert!(!config.put_audience(audience, 20).unwrap());
    let a = config.audience("new").unwrap();
    assert_eq!((a.created_at, a.updated_at), (Some(10), Some(20)));

    assert!(config.remove_merge_policy("mp-time").is_err());
    assert!(
        config
            .remove_audience("5b998cb9-9488-4ec3-8d95-fa8338ced490")
            .is_err()
    );
    assert_eq!(config.remove_audience("absent"), Ok(false));
    assert!(config.remove_destination("analytics"));
    assert_eq!(
        config.remove_audience("5b998cb9-9488-4ec3-8d95-fa8338ced490"),
        Ok(true)
    );
    config.validate().unwrap();
}
