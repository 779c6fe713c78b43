//! SPEC §2 merge policies, end to end through `streamdest replay --dry-run`: identity stitching
//! (`privateGraph`, `none`) and attribute merge (`timestampOrdered`, `datasetPrecedence`).
//!
//! Every expected payload is worked out by hand from SPEC §1–3 and §5, not copied from the
//! binary's output. Conventions: a mapped attribute path selects a leaf or every leaf under an
//! object; identity ids are sorted by code point; exports of one epoch come in destination
//! config order, then by profile name.

#[path = "data/triggers/replay.rs"]
mod replay;

use replay::*;
use serde_json::{Value, json};

/// One merge policy `policy` and audience `audience` (rule `rule`) mapped to destination `d`,
/// which maps `person.name` (an object path) and `personalEmail.address`. Flags off.
fn config(policy: Value, rule: &str) -> Value {
    let policy_id = policy["id"].clone();
    json!({
        "mergePolicies": [policy],
        "audiences": [
            {"id": "all", "name": "Audience", "mergePolicy": policy_id, "rule": rule,
             "createdAt": 1000, "updatedAt": 2000}
        ],
        "destinations": [
            {"id": "d", "name": "D", "endpoint": "https://collector.example.com/v1/profiles",
             "audiences": [{"id": "all", "mappingCreatedAt": 3000, "mappingUpdatedAt": 4000}],
             "attributes": ["person.name", "personalEmail.address"]}
        ]
    })
}

fn time_graph() -> Value {
    json!({"id": "mp-time", "attributeMerge": "timestampOrdered", "identityStitching": "privateGraph"})
}

/// An export to `d` in the single audience `all`.
fn to_d(profile: &str, attributes: Value, all: Value, identity_map: Value) -> Value {
    let mut payload = attributes.as_object().expect("attributes object").clone();
    payload.insert("segmentMembership".into(), json!({"ups": {"all": all}}));
    payload.insert("identityMap".into(), identity_map);
    export("d", profile, Value::Object(payload))
}

fn person(first: Option<&str>, last: Option<&str>, address: Option<&str>) -> Value {
    let mut attributes = json!({});
    let mut name = serde_json::Map::new();
    if let Some(first) = first {
        name.insert("firstName".into(), json!(first));
    }
    if let Some(last) = last {
        name.insert("lastName".into(), json!(last));
    }
    if !name.is_empty() {
        attributes["person"] = json!({ "name": name });
    }
    if let Some(address) = address {
        attributes["personalEmail"] = json!({ "address": address });
    }
    attributes
}

#[test]
fn two_datasets_joined_by_a_shared_email_are_one_profile() {
    let crm_ids = json!({"crmId": [{"id": "1"}], "email": [{"id": "a@x.com"}]});
    let web_ids = json!({"email": [{"id": "a@x.com"}], "ecid": [{"id": "9"}]});
    let all_ids =
        json!({"crmId": [{"id": "1"}], "ecid": [{"id": "9"}], "email": [{"id": "a@x.com"}]});
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            crm_ids.clone(),
            json!({"person": {"name": {"firstName": "John", "lastName": "Doe"}, "birthDate": "1980-02-03"},
                   "personalEmail": {"address": "old@x.com"}}),
        ),
        frag(
            "web",
            "w1",
            &t(2),
            web_ids.clone(),
            person(None, Some("Smith"), Some("new@x.com")),
        ),
        // crm/1 (t3) now newer than web/w1 (t2) for lastName; only web has an address.
        frag(
            "crm",
            "1",
            &t(3),
            crm_ids.clone(),
            person(Some("John"), Some("Doe"), None),
        ),
        // A tie at t3: the later-ingested event wins.
        frag(
            "web",
            "w1",
            &t(3),
            web_ids.clone(),
            person(None, Some("Tie"), Some("new@x.com")),
        ),
    ];
    let expected = [
        to_d(
            "crmId:1",
            person(Some("John"), Some("Doe"), Some("old@x.com")),
            realized(&t(1)),
            crm_ids,
        ),
        to_d(
            "crmId:1",
            person(Some("John"), Some("Smith"), Some("new@x.com")),
            realized(&t(1)),
            all_ids.clone(),
        ),
        to_d(
            "crmId:1",
            person(Some("John"), Some("Doe"), Some("new@x.com")),
            realized(&t(1)),
            all_ids.clone(),
        ),
        to_d(
            "crmId:1",
            person(Some("John"), Some("Tie"), Some("new@x.com")),
            realized(&t(1)),
            all_ids.clone(),
        ),
    ];
    let config = config(time_graph(), "exists person.name.firstName");
    assert_exports(&replay(&config, &events, &[]), &expected);

    // Both fragments in one epoch: one profile, one export.
    assert_exports(
        &replay(&config, &events[..2], &["--batch", "2"]),
        &[to_d(
            "crmId:1",
            person(Some("John"), Some("Smith"), Some("new@x.com")),
            realized(&t(2)),
            all_ids,
        )],
    );
}

#[test]
fn dataset_precedence_prefers_listed_datasets_then_the_newest() {
    let policy = json!({"id": "mp-crm", "attributeMerge": {"datasetPrecedence": ["crm", "web"]},
                        "identityStitching": "privateGraph"});
    let events = [
        // An unlisted dataset alone.
        frag(
            "app",
            "1",
            &t(5),
            email("a"),
            person(Some("App"), Some("AppL"), Some("app@x.com")),
        ),
        // web outranks app although older.
        frag(
            "web",
            "1",
            &t(1),
            email("a"),
            person(Some("Web"), None, Some("web@x.com")),
        ),
        // crm outranks web although older.
        frag(
            "crm",
            "1",
            &t(0),
            email("a"),
            person(Some("Crm"), None, None),
        ),
        // Within web, the newest wins...
        frag(
            "web",
            "2",
            &t(2),
            email("a"),
            person(None, None, Some("web2@x.com")),
        ),
        // ...and an older web value loses, but its write is still exported.
        frag(
            "web",
            "3",
            &t(0),
            email("a"),
            person(None, None, Some("web-old@x.com")),
        ),
        // Unlisted datasets share the last rank: the newest of them wins.
        frag(
            "other",
            "1",
            &t(9),
            email("a"),
            person(None, Some("OtherL"), None),
        ),
        frag(
            "other",
            "2",
            &t(4),
            email("a"),
            person(None, Some("Other2L"), None),
        ),
    ];
    let expect = |first: &str, last: &str, address: &str| {
        to_d(
            "email:a",
            person(Some(first), Some(last), Some(address)),
            realized(&t(5)),
            email("a"),
        )
    };
    let expected = [
        expect("App", "AppL", "app@x.com"),
        expect("Web", "AppL", "web@x.com"),
        expect("Crm", "AppL", "web@x.com"),
        expect("Crm", "AppL", "web2@x.com"),
        expect("Crm", "AppL", "web2@x.com"),
        expect("Crm", "OtherL", "web2@x.com"),
        expect("Crm", "OtherL", "web2@x.com"),
    ];
    assert_exports(&replay(&config(policy, "true"), &events, &[]), &expected);
}

/// Two profiles merged by a linking fragment and split again by its delete: each part keeps the
/// history of the merged profile (realized since its earliest qualification).
#[test]
fn split_after_deleting_the_linking_fragment() {
    let both = json!({"ecid": [{"id": "1"}], "email": [{"id": "a"}]});
    let ecid = json!({"ecid": [{"id": "1"}]});
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            person(Some("Ann"), None, Some("ann@crm.com")),
        ),
        frag(
            "web",
            "1",
            &t(2),
            ecid.clone(),
            person(None, None, Some("e@web.com")),
        ),
        frag("link", "1", &t(3), both.clone(), json!({})),
        delete("link", "1", &t(4)),
        // The parts stay apart: only email:a is touched.
        frag(
            "crm",
            "1",
            &t(5),
            email("a"),
            person(Some("Ann"), None, Some("ann@crm.com")),
        ),
    ];
    let ann = person(Some("Ann"), None, Some("ann@crm.com"));
    let web = person(None, None, Some("e@web.com"));
    let expected = [
        to_d("email:a", ann.clone(), realized(&t(1)), email("a")),
        to_d("ecid:1", web.clone(), realized(&t(2)), ecid.clone()),
        // Merged: web/1 (t2) is newer than crm/1 (t1) for the address.
        to_d(
            "ecid:1",
            person(Some("Ann"), None, Some("e@web.com")),
            realized(&t(1)),
            both,
        ),
        // Split, by profile name.
        to_d("ecid:1", web, realized(&t(1)), ecid),
        to_d("email:a", ann.clone(), realized(&t(1)), email("a")),
        to_d("email:a", ann, realized(&t(1)), email("a")),
    ];
    assert_exports(
        &replay(&config(time_graph(), "true"), &events, &[]),
        &expected,
    );
}

/// With stitching `none`, fragments with different primary identities stay apart although they
/// share `phone:555`; a fragment with no primary flag is keyed by its smallest identity.
#[test]
fn stitching_none_keeps_different_primary_identities_apart() {
    let policy = json!({"id": "mp-none", "attributeMerge": "timestampOrdered",
                        "identityStitching": "none"});
    let primary =
        |id: &str| json!({"email": [{"id": id, "primary": true}], "phone": [{"id": "555"}]});
    let john = person(Some("John"), None, None);
    let events = [
        frag("crm", "1", &t(1), primary("a"), john.clone()),
        frag("crm", "2", &t(2), primary("b"), john.clone()),
        // No primary flag: primary is phone:555, a third profile.
        frag(
            "web",
            "3",
            &t(3),
            json!({"zzz": [{"id": "1"}], "phone": [{"id": "555"}]}),
            john.clone(),
        ),
        // Primary email:a again: joins the first profile (an identity added).
        frag(
            "web",
            "4",
            &t(4),
            json!({"email": [{"id": "a", "primary": true}], "ecid": [{"id": "9"}]}),
            json!({}),
        ),
        frag(
            "crm",
            "1",
            &t(5),
            primary("a"),
            person(Some("Jack"), None, None),
        ),
    ];
    let first = json!({"ecid": [{"id": "9"}], "email": [{"id": "a"}], "phone": [{"id": "555"}]});
    let expected = [
        to_d(
            "email:a",
            john.clone(),
            realized(&t(1)),
            json!({"email": [{"id": "a"}], "phone": [{"id": "555"}]}),
        ),
        to_d(
            "email:b",
            john.clone(),
            realized(&t(2)),
            json!({"email": [{"id": "b"}], "phone": [{"id": "555"}]}),
        ),
        to_d(
            "phone:555",
            john.clone(),
            realized(&t(3)),
            json!({"phone": [{"id": "555"}], "zzz": [{"id": "1"}]}),
        ),
        // SPEC §5: a `none` profile is named by its primary identity.
        to_d("email:a", john, realized(&t(1)), first.clone()),
        to_d(
            "email:a",
            person(Some("Jack"), None, None),
            exited(&t(5)),
            first,
        ),
    ];
    let config = config(policy, "person.name.firstName = \"John\"");
    assert_exports(&replay(&config, &events, &[]), &expected);
}

/// The export unit is (destination, merge policy, profile): one event, one export per policy,
/// each with that policy's profile and audiences only.
#[test]
fn each_merge_policy_sees_its_own_profile() {
    let config = json!({
        "mergePolicies": [
            {"id": "mp-graph", "attributeMerge": "timestampOrdered", "identityStitching": "privateGraph"},
            {"id": "mp-none", "attributeMerge": "timestampOrdered", "identityStitching": "none"}
        ],
        "audiences": [
            {"id": "john-graph", "mergePolicy": "mp-graph", "rule": "person.name.firstName = \"John\"",
             "createdAt": 1000, "updatedAt": 2000},
            {"id": "john-none", "mergePolicy": "mp-none", "rule": "person.name.firstName = \"John\"",
             "createdAt": 1000, "updatedAt": 2000}
        ],
        "destinations": [
            {"id": "d", "name": "D", "endpoint": "https://collector.example.com/v1/profiles",
             "audiences": [
                 {"id": "john-graph", "mappingCreatedAt": 3000, "mappingUpdatedAt": 4000},
                 {"id": "john-none", "mappingCreatedAt": 3000, "mappingUpdatedAt": 4000}
             ],
             "attributes": ["person.name.firstName"]}
        ]
    });
    let primary =
        |id: &str| json!({"email": [{"id": id, "primary": true}], "phone": [{"id": "555"}]});
    let john = person(Some("John"), None, None);
    let events = [
        frag("crm", "1", &t(1), primary("a"), john.clone()),
        frag("crm", "2", &t(2), primary("b"), john.clone()),
    ];
    let payload = |ups: Value, identity_map: Value| {
        json!({"person": {"name": {"firstName": "John"}}, "segmentMembership": {"ups": ups},
               "identityMap": identity_map})
    };
    let a_ids = json!({"email": [{"id": "a"}], "phone": [{"id": "555"}]});
    let exports = replay(&config, &events, &[]);
    assert_eq!(exports.len(), 4, "{}", pretty(&exports));
    // Epoch 1: both policies' profiles are named email:a, so their order is not fixed.
    assert_exports_unordered(
        &exports[..2],
        &[
            export(
                "d",
                "email:a",
                payload(json!({"john-graph": realized(&t(1))}), a_ids.clone()),
            ),
            export(
                "d",
                "email:a",
                payload(json!({"john-none": realized(&t(1))}), a_ids),
            ),
        ],
    );
    // Epoch 2: privateGraph merges crm/2 in (identity added), none starts email:b.
    assert_exports(
        &exports[2..],
        &[
            export(
                "d",
                "email:a",
                payload(
                    json!({"john-graph": realized(&t(1))}),
                    json!({"email": [{"id": "a"}, {"id": "b"}], "phone": [{"id": "555"}]}),
                ),
            ),
            export(
                "d",
                "email:b",
                payload(
                    json!({"john-none": realized(&t(2))}),
                    json!({"email": [{"id": "b"}], "phone": [{"id": "555"}]}),
                ),
            ),
        ],
    );
}
