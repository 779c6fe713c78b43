//! SPEC §3 export triggers and non-triggers, end to end through `streamdest replay --dry-run`.
//!
//! Every expected payload below is worked out by hand from SPEC §1–3 and §5, not copied from the
//! binary's output. Conventions (the implementation's choices where SPEC is silent): a mapped
//! attribute path selects a leaf or every leaf under an object; identity ids are sorted by code
//! point; exports of one epoch come in destination config order, then by profile name.

#[path = "data/triggers/replay.rs"]
mod replay;

use replay::*;
use serde_json::{Value, json};

/// One merge policy; `john` and `gold` rule audiences and the `vip` upload audience are mapped to
/// destination `d` (attributes `person.name.firstName`, `personalEmail.address`); `big` is an
/// audience of the same policy that no destination maps. Both include flags off.
fn config() -> Value {
    json!({
        "mergePolicies": [
            {"id": "mp", "attributeMerge": "timestampOrdered", "identityStitching": "privateGraph"}
        ],
        "audiences": [
            {"id": "john", "name": "First name John", "mergePolicy": "mp",
             "rule": "person.name.firstName = \"John\"", "createdAt": 1000, "updatedAt": 2000},
            {"id": "gold", "name": "Gold tier", "mergePolicy": "mp",
             "rule": "loyalty.tier = \"gold\"", "createdAt": 1100, "updatedAt": 2100},
            {"id": "vip", "name": "VIP upload", "mergePolicy": "mp", "source": "upload",
             "createdAt": 1200, "updatedAt": 2200},
            {"id": "big", "name": "Big spender", "mergePolicy": "mp",
             "rule": "loyalty.points > 100", "createdAt": 1300, "updatedAt": 2300}
        ],
        "destinations": [
            {"id": "d", "name": "D", "endpoint": "https://collector.example.com/v1/profiles",
             "audiences": [
                 {"id": "john", "mappingCreatedAt": 3000, "mappingUpdatedAt": 4000},
                 {"id": "gold", "mappingCreatedAt": 3100, "mappingUpdatedAt": 4100},
                 {"id": "vip", "mappingCreatedAt": 3200, "mappingUpdatedAt": 4200}
             ],
             "attributes": ["person.name.firstName", "personalEmail.address"]}
        ]
    })
}

fn first_name(name: &str) -> Value {
    json!({"person": {"name": {"firstName": name}}})
}

/// `firstName` and `personalEmail.address`.
fn name_and_email(name: &str, address: &str) -> Value {
    json!({"person": {"name": {"firstName": name}}, "personalEmail": {"address": address}})
}

/// An export to `d`: `attributes` (an object, possibly empty), then the ups and identity map.
fn to_d(profile: &str, attributes: Value, ups: Value, identity_map: Value) -> Value {
    let mut payload = attributes.as_object().expect("attributes object").clone();
    payload.insert("segmentMembership".into(), json!({ "ups": ups }));
    payload.insert("identityMap".into(), identity_map);
    export("d", profile, Value::Object(payload))
}

// ---------------------------------------------------------------------------------------------
// Trigger 1: status changes.

#[test]
fn trigger1_realized_exited_and_requalified() {
    let events = [
        // Not a member → realized.
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            json!({"person": {"name": {"firstName": "John", "lastName": "Doe"}},
                   "personalEmail": {"address": "a@x.com"}}),
        ),
        // Realized → exited.
        frag(
            "crm",
            "1",
            &t(2),
            email("a"),
            json!({"person": {"name": {"firstName": "Jack", "lastName": "Doe"}},
                   "personalEmail": {"address": "a@x.com"}}),
        ),
        // Exited and in no mapped audience: a mapped write sends nothing.
        frag(
            "web",
            "1",
            &t(3),
            email("a"),
            json!({"personalEmail": {"address": "w@x.com"}}),
        ),
        // Exited → realized; crm/1 (t4) is now newer than web/1 (t3) for the address.
        frag(
            "crm",
            "1",
            &t(4),
            email("a"),
            json!({"person": {"name": {"firstName": "John", "lastName": "Doe"}},
                   "personalEmail": {"address": "a@x.com"}}),
        ),
        // Trigger 3 re-export: the status is unchanged, so it keeps its time (t4).
        frag(
            "crm",
            "1",
            &t(5),
            email("a"),
            name_and_email("John", "a2@x.com"),
        ),
    ];
    let expected = [
        to_d(
            "email:a",
            name_and_email("John", "a@x.com"),
            json!({"john": realized(&t(1))}),
            email("a"),
        ),
        to_d(
            "email:a",
            name_and_email("Jack", "a@x.com"),
            json!({"john": exited(&t(2))}),
            email("a"),
        ),
        to_d(
            "email:a",
            name_and_email("John", "a@x.com"),
            json!({"john": realized(&t(4))}),
            email("a"),
        ),
        to_d(
            "email:a",
            name_and_email("John", "a2@x.com"),
            json!({"john": realized(&t(4))}),
            email("a"),
        ),
    ];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

/// `lastQualificationTime` is the newest timestamp among the epoch's events *for the profile*:
/// not the last one in the file, not another profile's; UTC, fractions dropped.
#[test]
fn trigger1_last_qualification_time_is_the_newest_event_of_the_profile_in_the_epoch() {
    let events = [
        // Epoch 1.
        frag(
            "crm",
            "1",
            "2024-05-01T10:00:10.750Z",
            email("a"),
            first_name("John"),
        ),
        // 10:00:08Z, written with an offset.
        frag(
            "web",
            "1",
            "2024-05-01T12:00:08+02:00",
            email("a"),
            json!({"loyalty": {"tier": "silver"}}),
        ),
        frag("crm", "2", &t(30), email("b"), first_name("Bob")),
        // Epoch 2: web/1 (t40) beats crm/1 (t10): John exits at t40, though web/2 comes later
        // in the file with an older time; email:b turns gold at t50.
        frag("web", "1", &t(40), email("a"), first_name("Jack")),
        frag(
            "web",
            "2",
            &t(20),
            email("a"),
            json!({"loyalty": {"tier": "bronze"}}),
        ),
        frag(
            "crm",
            "2",
            &t(50),
            email("b"),
            json!({"loyalty": {"tier": "gold"}}),
        ),
    ];
    let expected = [
        to_d(
            "email:a",
            first_name("John"),
            json!({"john": realized("2024-05-01T10:00:10Z")}),
            email("a"),
        ),
        to_d(
            "email:a",
            first_name("Jack"),
            json!({"john": exited(&t(40))}),
            email("a"),
        ),
        to_d(
            "email:b",
            json!({}),
            json!({"gold": realized(&t(50))}),
            email("b"),
        ),
    ];
    assert_exports(&replay(&config(), &events, &["--batch", "3"]), &expected);
}

/// An exited audience is sent in the epoch it exits, and not again: later exports list only the
/// changed and the realized audiences.
#[test]
fn trigger1_exited_audience_is_not_repeated_in_later_exports() {
    let attrs =
        |name: &str| json!({"person": {"name": {"firstName": name}}, "loyalty": {"tier": "gold"}});
    let events = [
        frag("crm", "1", &t(1), email("a"), attrs("John")),
        frag("crm", "1", &t(2), email("a"), attrs("Jack")),
        frag("crm", "1", &t(3), email("a"), attrs("Jack")),
    ];
    let expected = [
        to_d(
            "email:a",
            first_name("John"),
            json!({"john": realized(&t(1)), "gold": realized(&t(1))}),
            email("a"),
        ),
        to_d(
            "email:a",
            first_name("Jack"),
            json!({"john": exited(&t(2)), "gold": realized(&t(1))}),
            email("a"),
        ),
        to_d(
            "email:a",
            first_name("Jack"),
            json!({"gold": realized(&t(1))}),
            email("a"),
        ),
    ];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

// ---------------------------------------------------------------------------------------------
// Trigger 2: identity map changes of a realized profile.

#[test]
fn trigger2_identity_added_and_removed() {
    let events = [
        frag("crm", "1", &t(1), email("amy@x.com"), first_name("John")),
        // A new fragment adds ecid:111 and writes only an unmapped path.
        frag(
            "web",
            "9",
            &t(2),
            json!({"email": [{"id": "amy@x.com"}], "ecid": [{"id": "111"}]}),
            json!({"loyalty": {"tier": "silver"}}),
        ),
        // Same identities, unmapped write: nothing.
        frag(
            "web",
            "9",
            &t(3),
            json!({"email": [{"id": "amy@x.com"}], "ecid": [{"id": "111"}]}),
            json!({"loyalty": {"tier": "bronze"}}),
        ),
        // ecid:111 removed, email Zoe@x.com added ('Z' < 'a' by code point).
        frag(
            "web",
            "9",
            &t(4),
            json!({"email": [{"id": "amy@x.com"}, {"id": "Zoe@x.com"}]}),
            json!({"loyalty": {"tier": "bronze"}}),
        ),
    ];
    let expected = [
        to_d(
            "email:amy@x.com",
            first_name("John"),
            json!({"john": realized(&t(1))}),
            email("amy@x.com"),
        ),
        to_d(
            "ecid:111",
            first_name("John"),
            json!({"john": realized(&t(1))}),
            json!({"ecid": [{"id": "111"}], "email": [{"id": "amy@x.com"}]}),
        ),
        to_d(
            "email:Zoe@x.com",
            first_name("John"),
            json!({"john": realized(&t(1))}),
            json!({"email": [{"id": "Zoe@x.com"}, {"id": "amy@x.com"}]}),
        ),
    ];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

/// Two realized profiles merged by a linking fragment give one export, named by the smallest
/// identity, realized since the earliest of their qualification times.
#[test]
fn trigger2_merge_by_a_linking_fragment() {
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            name_and_email("John", "a@crm.com"),
        ),
        frag(
            "web",
            "2",
            &t(2),
            json!({"ecid": [{"id": "222"}]}),
            name_and_email("John", "w@web.com"),
        ),
        frag(
            "link",
            "3",
            &t(3),
            json!({"email": [{"id": "a"}], "ecid": [{"id": "222"}]}),
            json!({}),
        ),
    ];
    let both = json!({"ecid": [{"id": "222"}], "email": [{"id": "a"}]});
    let expected = [
        to_d(
            "email:a",
            name_and_email("John", "a@crm.com"),
            json!({"john": realized(&t(1))}),
            email("a"),
        ),
        to_d(
            "ecid:222",
            name_and_email("John", "w@web.com"),
            json!({"john": realized(&t(2))}),
            json!({"ecid": [{"id": "222"}]}),
        ),
        // web/2 (t2) is newer than crm/1 (t1) for the address.
        to_d(
            "ecid:222",
            name_and_email("John", "w@web.com"),
            json!({"john": realized(&t(1))}),
            both,
        ),
    ];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

/// Deleting the linking fragment splits the profile: both parts are exported; the part that no
/// longer qualifies inherits `realized` and so exits.
#[test]
fn trigger2_split_after_deleting_the_linking_fragment() {
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            name_and_email("John", "a@crm.com"),
        ),
        // Not John: no status, nothing sent.
        frag(
            "web",
            "2",
            &t(2),
            json!({"ecid": [{"id": "222"}]}),
            json!({"personalEmail": {"address": "w@web.com"}}),
        ),
        frag(
            "link",
            "3",
            &t(3),
            json!({"email": [{"id": "a"}], "ecid": [{"id": "222"}]}),
            json!({}),
        ),
        delete("link", "3", &t(4)),
    ];
    let expected = [
        to_d(
            "email:a",
            name_and_email("John", "a@crm.com"),
            json!({"john": realized(&t(1))}),
            email("a"),
        ),
        to_d(
            "ecid:222",
            name_and_email("John", "w@web.com"),
            json!({"john": realized(&t(1))}),
            json!({"ecid": [{"id": "222"}], "email": [{"id": "a"}]}),
        ),
        // The split, ordered by profile name.
        to_d(
            "ecid:222",
            json!({"personalEmail": {"address": "w@web.com"}}),
            json!({"john": exited(&t(4))}),
            json!({"ecid": [{"id": "222"}]}),
        ),
        to_d(
            "email:a",
            name_and_email("John", "a@crm.com"),
            json!({"john": realized(&t(1))}),
            email("a"),
        ),
    ];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

// ---------------------------------------------------------------------------------------------
// Trigger 3: writes and removals of mapped paths of a realized profile.

#[test]
fn trigger3_overwrite_with_the_same_value_is_exported() {
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            name_and_email("John", "a@x.com"),
        ),
        frag(
            "crm",
            "1",
            &t(2),
            email("a"),
            name_and_email("John", "a@x.com"),
        ),
    ];
    let payload = to_d(
        "email:a",
        name_and_email("John", "a@x.com"),
        json!({"john": realized(&t(1))}),
        email("a"),
    );
    assert_exports(
        &replay(&config(), &events, &[]),
        &[payload.clone(), payload],
    );
}

/// Also the non-trigger "a change of an unmapped attribute".
#[test]
fn trigger3_write_of_unmapped_paths_only_is_not_exported() {
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            json!({"person": {"name": {"firstName": "John", "lastName": "Doe"}}}),
        ),
        frag(
            "web",
            "2",
            &t(2),
            email("a"),
            json!({"loyalty": {"tier": "silver"}, "person": {"name": {"lastName": "Roe"}}}),
        ),
        frag(
            "web",
            "2",
            &t(3),
            email("a"),
            json!({"loyalty": {"tier": "bronze"}}),
        ),
    ];
    let expected = [to_d(
        "email:a",
        first_name("John"),
        json!({"john": realized(&t(1))}),
        email("a"),
    )];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

#[test]
fn trigger3_removing_a_mapped_value_is_exported() {
    let events = [
        frag("crm", "1", &t(1), email("a"), first_name("John")),
        frag(
            "web",
            "2",
            &t(2),
            email("a"),
            json!({"personalEmail": {"address": "w@x.com"}}),
        ),
        // An upsert without the mapped path removes its value.
        frag(
            "web",
            "2",
            &t(3),
            email("a"),
            json!({"loyalty": {"tier": "silver"}}),
        ),
        frag(
            "web",
            "3",
            &t(4),
            email("a"),
            json!({"personalEmail": {"address": "v@x.com"}}),
        ),
        // So does a delete.
        delete("web", "3", &t(5)),
    ];
    let ups = json!({"john": realized(&t(1))});
    let expected = [
        to_d("email:a", first_name("John"), ups.clone(), email("a")),
        to_d(
            "email:a",
            name_and_email("John", "w@x.com"),
            ups.clone(),
            email("a"),
        ),
        to_d("email:a", first_name("John"), ups.clone(), email("a")),
        to_d(
            "email:a",
            name_and_email("John", "v@x.com"),
            ups.clone(),
            email("a"),
        ),
        to_d("email:a", first_name("John"), ups, email("a")),
    ];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

#[test]
fn trigger3_a_write_that_loses_the_merge_is_exported() {
    let events = [
        frag(
            "crm",
            "1",
            &t(10),
            email("a"),
            name_and_email("John", "new@x.com"),
        ),
        // Older than crm/1: its address loses, the write still counts.
        frag(
            "web",
            "2",
            &t(5),
            email("a"),
            json!({"personalEmail": {"address": "old@x.com"}}),
        ),
    ];
    let payload = to_d(
        "email:a",
        name_and_email("John", "new@x.com"),
        json!({"john": realized(&t(10))}),
        email("a"),
    );
    assert_exports(
        &replay(&config(), &events, &[]),
        &[payload.clone(), payload],
    );
}

// ---------------------------------------------------------------------------------------------
// Non-triggers.

#[test]
fn a_profile_in_no_mapped_audience_is_not_exported() {
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            name_and_email("Bob", "a@x.com"),
        ),
        frag(
            "crm",
            "1",
            &t(2),
            email("a"),
            name_and_email("Bob", "b@x.com"),
        ),
        frag(
            "web",
            "2",
            &t(3),
            json!({"email": [{"id": "a"}], "ecid": [{"id": "1"}]}),
            json!({}),
        ),
        // Only now does it qualify.
        frag("crm", "1", &t(4), email("a"), first_name("John")),
    ];
    let expected = [to_d(
        "ecid:1",
        first_name("John"),
        json!({"john": realized(&t(4))}),
        json!({"ecid": [{"id": "1"}], "email": [{"id": "a"}]}),
    )];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

/// Realized only in `big`, which no destination maps: nothing, whatever happens; once it also
/// qualifies for a mapped audience, `big` rides along (without name or mapping timestamps).
#[test]
fn a_profile_realized_only_in_an_unmapped_audience_is_not_exported() {
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            json!({"loyalty": {"points": 200}, "personalEmail": {"address": "a@x.com"}}),
        ),
        frag(
            "crm",
            "1",
            &t(2),
            email("a"),
            json!({"loyalty": {"points": 300}, "personalEmail": {"address": "b@x.com"}}),
        ),
        frag(
            "web",
            "2",
            &t(3),
            json!({"email": [{"id": "a"}], "ecid": [{"id": "1"}]}),
            json!({}),
        ),
        frag(
            "crm",
            "1",
            &t(4),
            email("a"),
            json!({"loyalty": {"points": 50}, "personalEmail": {"address": "b@x.com"}}),
        ),
        frag(
            "crm",
            "1",
            &t(5),
            email("a"),
            json!({"loyalty": {"points": 250}, "person": {"name": {"firstName": "John"}},
                   "personalEmail": {"address": "c@x.com"}}),
        ),
    ];
    let expected = [to_d(
        "ecid:1",
        name_and_email("John", "c@x.com"),
        json!({"john": realized(&t(5)), "big": realized(&t(5))}),
        json!({"ecid": [{"id": "1"}], "email": [{"id": "a"}]}),
    )];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

/// `gold` leaves and comes back within epoch 2: no change, and `loyalty.tier` is not mapped, so
/// nothing is sent.
#[test]
fn a_status_that_leaves_and_returns_within_one_epoch_is_not_exported() {
    let tier = |t: &str| json!({"loyalty": {"tier": t}});
    let events = [
        // Epoch 1.
        frag("crm", "1", &t(1), email("a"), tier("gold")),
        frag("crm", "2", &t(2), email("b"), tier("bronze")),
        // Epoch 2.
        frag("crm", "1", &t(3), email("a"), tier("silver")),
        frag("crm", "1", &t(4), email("a"), tier("gold")),
        // Epoch 3.
        frag("crm", "1", &t(5), email("a"), tier("silver")),
        frag("crm", "2", &t(6), email("b"), tier("gold")),
    ];
    let expected = [
        to_d(
            "email:a",
            json!({}),
            json!({"gold": realized(&t(1))}),
            email("a"),
        ),
        to_d(
            "email:a",
            json!({}),
            json!({"gold": exited(&t(5))}),
            email("a"),
        ),
        to_d(
            "email:b",
            json!({}),
            json!({"gold": realized(&t(6))}),
            email("b"),
        ),
    ];
    assert_exports(&replay(&config(), &events, &["--batch", "2"]), &expected);
}

#[test]
fn several_events_for_one_profile_in_one_epoch_give_one_export_of_the_end_state() {
    let both = json!({"ecid": [{"id": "7"}], "email": [{"id": "a"}]});
    let events = [
        // Epoch 1.
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            name_and_email("John", "v1@x.com"),
        ),
        frag(
            "crm",
            "1",
            &t(2),
            email("a"),
            name_and_email("John", "v2@x.com"),
        ),
        frag(
            "web",
            "2",
            &t(3),
            both.clone(),
            json!({"personalEmail": {"address": "v3@x.com"}}),
        ),
        // Epoch 2: John leaves and comes back; the last crm/1 has no address.
        frag(
            "web",
            "2",
            &t(4),
            both.clone(),
            json!({"personalEmail": {"address": "v4@x.com"}}),
        ),
        frag("crm", "1", &t(5), email("a"), first_name("Jack")),
        frag("crm", "1", &t(6), email("a"), first_name("John")),
    ];
    let expected = [
        to_d(
            "ecid:7",
            name_and_email("John", "v3@x.com"),
            json!({"john": realized(&t(3))}),
            both.clone(),
        ),
        to_d(
            "ecid:7",
            name_and_email("John", "v4@x.com"),
            json!({"john": realized(&t(3))}),
            both,
        ),
    ];
    assert_exports(&replay(&config(), &events, &["--batch", "3"]), &expected);
}

// ---------------------------------------------------------------------------------------------
// Deleting every fragment.

#[test]
fn deleting_every_fragment_exits_the_mapped_audiences_once() {
    let both = json!({"ecid": [{"id": "1"}], "email": [{"id": "a"}]});
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            both.clone(),
            json!({"person": {"name": {"firstName": "John"}}, "personalEmail": {"address": "a@x.com"},
                   "loyalty": {"points": 200}}),
        ),
        delete("crm", "1", &t(2)),
        // A new profile with no history, not qualifying: nothing.
        frag("crm", "1", &t(3), both.clone(), first_name("Bob")),
        frag("crm", "1", &t(4), both.clone(), first_name("John")),
    ];
    let expected = [
        to_d(
            "ecid:1",
            name_and_email("John", "a@x.com"),
            json!({"john": realized(&t(1)), "big": realized(&t(1))}),
            both.clone(),
        ),
        // Mapped audiences exited (the unmapped `big` is not sent), last identities, no
        // attributes.
        to_d(
            "ecid:1",
            json!({}),
            json!({"john": exited(&t(2))}),
            both.clone(),
        ),
        to_d(
            "ecid:1",
            first_name("John"),
            json!({"john": realized(&t(4))}),
            both,
        ),
    ];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

#[test]
fn deleting_every_fragment_in_one_epoch_exports_the_identities_it_last_had() {
    let both = json!({"ecid": [{"id": "1"}], "email": [{"id": "a"}]});
    let events = [
        frag("crm", "1", &t(1), email("a"), first_name("John")),
        frag(
            "web",
            "2",
            &t(2),
            both.clone(),
            json!({"personalEmail": {"address": "w@x.com"}}),
        ),
        delete("crm", "1", &t(3)),
        delete("web", "2", &t(4)),
    ];
    let expected = [
        to_d(
            "ecid:1",
            name_and_email("John", "w@x.com"),
            json!({"john": realized(&t(2))}),
            both.clone(),
        ),
        to_d("ecid:1", json!({}), json!({"john": exited(&t(4))}), both),
    ];
    assert_exports(&replay(&config(), &events, &["--batch", "2"]), &expected);
}

/// Only a *realized* profile gets the last export: an exited one just goes.
#[test]
fn deleting_a_profile_that_is_not_realized_sends_nothing() {
    let events = [
        frag("crm", "1", &t(1), email("a"), first_name("John")),
        frag("crm", "1", &t(2), email("a"), first_name("Jack")),
        delete("crm", "1", &t(3)),
        // Never a member.
        frag("crm", "2", &t(4), email("b"), first_name("Bob")),
        delete("crm", "2", &t(5)),
    ];
    let expected = [
        to_d(
            "email:a",
            first_name("John"),
            json!({"john": realized(&t(1))}),
            email("a"),
        ),
        to_d(
            "email:a",
            first_name("Jack"),
            json!({"john": exited(&t(2))}),
            email("a"),
        ),
    ];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

/// States are compared at the ends of epochs: a delete and a re-upsert in one epoch leave the
/// profile realized (since t1); the upsert wrote mapped paths, so it is exported (trigger 3).
#[test]
fn delete_and_reupsert_within_one_epoch_is_no_tombstone() {
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            name_and_email("John", "a@x.com"),
        ),
        frag("crm", "9", &t(1), email("z"), first_name("Bob")),
        delete("crm", "1", &t(2)),
        frag(
            "crm",
            "1",
            &t(3),
            email("a"),
            name_and_email("John", "b@x.com"),
        ),
    ];
    let expected = [
        to_d(
            "email:a",
            name_and_email("John", "a@x.com"),
            json!({"john": realized(&t(1))}),
            email("a"),
        ),
        to_d(
            "email:a",
            name_and_email("John", "b@x.com"),
            json!({"john": realized(&t(1))}),
            email("a"),
        ),
    ];
    assert_exports(&replay(&config(), &events, &["--batch", "2"]), &expected);
}

// ---------------------------------------------------------------------------------------------
// The reference's example payload.

/// Three mapped audiences (two rules, one upload), four mapped attributes; `doe` is an unmapped
/// audience of the same merge policy, `crm-john` one of another merge policy.
fn reference_config(names: bool, timestamps: bool) -> Value {
    let mut config: Value =
        serde_json::from_str(include_str!("data/triggers/reference-config.json"))
            .expect("reference-config.json is JSON");
    let destination = &mut config["destinations"][0];
    destination["includeSegmentNames"] = json!(names);
    destination["includeSegmentTimestamps"] = json!(timestamps);
    config
}

fn reference_events() -> Vec<Value> {
    vec![
        frag(
            "crm",
            "c-17",
            "2019-04-15T02:41:50Z",
            json!({"ecid": [{"id": "1457500653"}],
                   "email": [{"id": "john@acme.com", "primary": true}]}),
            json!({"person": {"name": {"firstName": "John", "lastName": "Doe"},
                              "birthDate": "1980-02-03"},
                   "personalEmail": {"address": "john.doe@acme.com"},
                   "loyalty": {"points": 420}}),
        ),
        upload(
            "vip-list",
            "2019-04-16T00:00:00Z",
            &[("email", "john@acme.com")],
            &[],
        ),
    ]
}

fn reference_attributes() -> Value {
    json!({
        "person": {"name": {"firstName": "John", "lastName": "Doe"}},
        "personalEmail": {"address": "john.doe@acme.com"},
        "loyalty": {"points": 420}
    })
}

fn reference_export(ups: Value) -> Value {
    let mut payload = reference_attributes().as_object().unwrap().clone();
    payload.insert("segmentMembership".into(), json!({ "ups": ups }));
    payload.insert(
        "identityMap".into(),
        json!({"ecid": [{"id": "1457500653"}], "email": [{"id": "john@acme.com"}]}),
    );
    export("analytics", "ecid:1457500653", Value::Object(payload))
}

#[test]
fn reference_example_with_names_and_timestamps() {
    const FIRST: &str = "2019-04-15T02:41:50Z";
    let john = json!({
        "lastQualificationTime": FIRST, "status": "realized",
        "createdAt": 1648553325000_i64, "updatedAt": 1648553330000_i64,
        "mappingCreatedAt": 1649856570000_i64, "mappingUpdatedAt": 1649856570000_i64,
        "name": "First name equals John"
    });
    let points = json!({
        "lastQualificationTime": FIRST, "status": "realized",
        "createdAt": 1648553400000_i64, "updatedAt": 1648553410000_i64,
        "mappingCreatedAt": 1649856580000_i64, "mappingUpdatedAt": 1649856590000_i64,
        "name": "More than 100 points"
    });
    // Unmapped, same merge policy: no name, no mapping timestamps.
    let doe = json!({
        "lastQualificationTime": FIRST, "status": "realized",
        "createdAt": 1648553600000_i64, "updatedAt": 1648553610000_i64
    });
    let vip = json!({
        "lastQualificationTime": "2019-04-16T00:00:00Z", "status": "realized",
        "createdAt": 1648553500000_i64, "updatedAt": 1648553510000_i64,
        "mappingCreatedAt": 1649856600000_i64, "mappingUpdatedAt": 1649856610000_i64,
        "name": "VIP upload"
    });
    let expected = [
        reference_export(json!({
            "5b998cb9-9488-4ec3-8d95-fa8338ced490": john.clone(),
            "points-100": points.clone(),
            "doe": doe.clone()
        })),
        reference_export(json!({
            "5b998cb9-9488-4ec3-8d95-fa8338ced490": john,
            "points-100": points,
            "vip-list": vip,
            "doe": doe
        })),
    ];
    assert_exports(
        &replay(&reference_config(true, true), &reference_events(), &[]),
        &expected,
    );
}

#[test]
fn reference_example_without_names_or_timestamps() {
    const FIRST: &str = "2019-04-15T02:41:50Z";
    let expected = [
        reference_export(json!({
            "5b998cb9-9488-4ec3-8d95-fa8338ced490": realized(FIRST),
            "points-100": realized(FIRST),
            "doe": realized(FIRST)
        })),
        reference_export(json!({
            "5b998cb9-9488-4ec3-8d95-fa8338ced490": realized(FIRST),
            "points-100": realized(FIRST),
            "vip-list": realized("2019-04-16T00:00:00Z"),
            "doe": realized(FIRST)
        })),
    ];
    assert_exports(
        &replay(&reference_config(false, false), &reference_events(), &[]),
        &expected,
    );
}

// ---------------------------------------------------------------------------------------------
// Custom uploads.

#[test]
fn upload_add_realizes_and_remove_exits() {
    let events = [
        // In no audience yet.
        frag(
            "crm",
            "1",
            &t(1),
            email("a"),
            json!({"personalEmail": {"address": "a@x.com"}}),
        ),
        upload("vip", &t(2), &[("email", "a")], &[]),
        upload("vip", &t(3), &[], &[("email", "a")]),
        // `add` is applied before `remove`: still out, nothing changes.
        upload("vip", &t(4), &[("email", "a")], &[("email", "a")]),
        // An identity no profile holds yet; the profile that later holds it is realized then.
        upload("vip", &t(5), &[("email", "b")], &[]),
        frag("crm", "2", &t(6), email("b"), json!({})),
        upload("vip", &t(7), &[("email", "a")], &[]),
    ];
    let address = json!({"personalEmail": {"address": "a@x.com"}});
    let expected = [
        to_d(
            "email:a",
            address.clone(),
            json!({"vip": realized(&t(2))}),
            email("a"),
        ),
        to_d(
            "email:a",
            address.clone(),
            json!({"vip": exited(&t(3))}),
            email("a"),
        ),
        to_d(
            "email:b",
            json!({}),
            json!({"vip": realized(&t(6))}),
            email("b"),
        ),
        to_d(
            "email:a",
            address,
            json!({"vip": realized(&t(7))}),
            email("a"),
        ),
    ];
    assert_exports(&replay(&config(), &events, &[]), &expected);
}

/// The replay stops at `line` with `FILE:LINE:` on stderr and exit status 1, after exporting
/// what the lines before it gave.
#[track_caller]
fn assert_stops_at(run: &replay::Replay, line: usize, expected: &[Value]) {
    let location = format!("{}:{line}:", run.events_path.display());
    assert_eq!(run.code, Some(1), "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains(&location),
        "stderr does not name {location}:\n{}",
        run.stderr
    );
    assert_exports(&run.exports, expected);
}

fn john_a() -> Value {
    to_d(
        "email:a",
        first_name("John"),
        json!({"john": realized(&t(1))}),
        email("a"),
    )
}

#[test]
fn upload_to_an_unknown_audience_stops_the_replay() {
    let events = [
        frag("crm", "1", &t(1), email("a"), first_name("John")),
        upload("no-such-audience", &t(2), &[("email", "a")], &[]),
        frag("crm", "1", &t(3), email("a"), first_name("Jack")),
    ];
    let run = replay_text(&config(), &ndjson(&events), &[]);
    assert_stops_at(&run, 2, &[john_a()]);
}

#[test]
fn upload_to_a_rule_based_audience_stops_the_replay() {
    let events = [
        frag("crm", "1", &t(1), email("a"), first_name("John")),
        upload("gold", &t(2), &[("email", "a")], &[]),
        frag("crm", "1", &t(3), email("a"), first_name("Jack")),
    ];
    let run = replay_text(&config(), &ndjson(&events), &[]);
    assert_stops_at(&run, 2, &[john_a()]);
}

// ---------------------------------------------------------------------------------------------
// Malformed and blank lines.

#[test]
fn bad_json_stops_the_replay_naming_file_and_line() {
    let text = format!(
        "{}\n\n{{\"type\":\"fragment\",\n{}\n",
        frag("crm", "1", &t(1), email("a"), first_name("John")),
        frag("crm", "1", &t(4), email("a"), first_name("Jack")),
    );
    let run = replay_text(&config(), &text, &[]);
    assert_stops_at(&run, 3, &[john_a()]);
}

#[test]
fn a_missing_dataset_stops_the_replay_naming_file_and_line() {
    let text = format!(
        "{}\n{}\n{}\n",
        frag("crm", "1", &t(1), email("a"), first_name("John")),
        json!({"type": "fragment", "id": "2", "timestamp": t(2), "identityMap": email("b"),
               "attributes": first_name("John")}),
        frag("crm", "1", &t(3), email("a"), first_name("Jack")),
    );
    let run = replay_text(&config(), &text, &[]);
    assert_stops_at(&run, 2, &[john_a()]);
    assert!(run.stderr.contains("dataset"), "stderr:\n{}", run.stderr);
}

/// The lines before the bad one are processed even when they do not fill an epoch.
#[test]
fn a_malformed_line_in_a_partial_epoch_still_exports_the_lines_before_it() {
    let text = format!(
        "{}\n{}\nnot json\n",
        frag("crm", "1", &t(1), email("a"), first_name("John")),
        frag("crm", "2", &t(2), email("b"), first_name("John")),
    );
    let run = replay_text(&config(), &text, &["--batch", "3"]);
    let expected = [
        to_d(
            "email:a",
            first_name("John"),
            json!({"john": realized(&t(1))}),
            email("a"),
        ),
        to_d(
            "email:b",
            first_name("John"),
            json!({"john": realized(&t(2))}),
            email("b"),
        ),
    ];
    assert_stops_at(&run, 3, &expected);
}

/// Blank lines are not events: with `--batch 2`, epoch 1 is the first two events.
#[test]
fn blank_lines_are_skipped_and_do_not_count_as_events() {
    let text = format!(
        "{}\n\n   \n{}\n\n{}\n\n",
        frag("crm", "1", &t(1), email("a"), first_name("Jack")),
        frag("crm", "1", &t(2), email("a"), first_name("John")),
        frag("crm", "1", &t(3), email("a"), first_name("Jack")),
    );
    let run = replay_text(&config(), &text, &["--batch", "2"]);
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
    let expected = [
        to_d(
            "email:a",
            first_name("John"),
            json!({"john": realized(&t(2))}),
            email("a"),
        ),
        to_d(
            "email:a",
            first_name("Jack"),
            json!({"john": exited(&t(3))}),
            email("a"),
        ),
    ];
    assert_exports(&run.exports, &expected);
}

// ---------------------------------------------------------------------------------------------
// Ordering and workers.

/// Destinations `zeta` (maps `gold`, attributes under the object path `loyalty`) and `alpha`
/// (maps `john`, attributes under `person.name`), in that config order.
fn two_destinations() -> Value {
    let mut config = config();
    config["destinations"] = json!([
        {"id": "zeta", "name": "Zeta", "endpoint": "https://zeta.example.com/in",
         "audiences": [{"id": "gold", "mappingCreatedAt": 3100, "mappingUpdatedAt": 4100}],
         "attributes": ["loyalty"]},
        {"id": "alpha", "name": "Alpha", "endpoint": "https://alpha.example.com/in",
         "audiences": [{"id": "john", "mappingCreatedAt": 3000, "mappingUpdatedAt": 4000},
                       {"id": "vip", "mappingCreatedAt": 3200, "mappingUpdatedAt": 4200}],
         "attributes": ["person.name"]}
    ]);
    config
}

#[test]
fn exports_of_an_epoch_come_in_destination_order_then_by_profile() {
    let events = [
        frag(
            "crm",
            "1",
            &t(1),
            email("b"),
            json!({"person": {"name": {"firstName": "John"}},
                   "loyalty": {"tier": "gold", "points": 5}}),
        ),
        frag(
            "crm",
            "2",
            &t(2),
            email("a"),
            json!({"person": {"name": {"firstName": "John"}}, "loyalty": {"tier": "gold"}}),
        ),
        frag(
            "crm",
            "3",
            &t(3),
            email("c"),
            json!({"loyalty": {"tier": "gold"}}),
        ),
    ];
    let payload = |attributes: Value, ups: Value, who: &str| {
        let mut p = attributes.as_object().unwrap().clone();
        p.insert("segmentMembership".into(), json!({ "ups": ups }));
        p.insert("identityMap".into(), email(who));
        Value::Object(p)
    };
    let gold = json!({"loyalty": {"tier": "gold"}});
    let expected = [
        export(
            "zeta",
            "email:a",
            payload(
                gold.clone(),
                json!({"gold": realized(&t(2)), "john": realized(&t(2))}),
                "a",
            ),
        ),
        export(
            "zeta",
            "email:b",
            payload(
                json!({"loyalty": {"tier": "gold", "points": 5}}),
                json!({"gold": realized(&t(1)), "john": realized(&t(1))}),
                "b",
            ),
        ),
        export(
            "zeta",
            "email:c",
            payload(gold, json!({"gold": realized(&t(3))}), "c"),
        ),
        export(
            "alpha",
            "email:a",
            payload(
                first_name("John"),
                json!({"gold": realized(&t(2)), "john": realized(&t(2))}),
                "a",
            ),
        ),
        export(
            "alpha",
            "email:b",
            payload(
                first_name("John"),
                json!({"gold": realized(&t(1)), "john": realized(&t(1))}),
                "b",
            ),
        ),
    ];
    assert_exports(
        &replay(&two_destinations(), &events, &["--batch", "3"]),
        &expected,
    );
}

/// A small multi-profile history with merges, splits, deletes and uploads.
fn mixed_history() -> Vec<Value> {
    let mut events = Vec::new();
    for (i, who) in ["a", "b", "c", "d", "e", "f"].iter().enumerate() {
        let name = if i % 2 == 0 { "John" } else { "Jane" };
        let tier = if i % 3 == 0 { "gold" } else { "silver" };
        events.push(frag(
            "crm",
            who,
            &t(i as u32),
            email(who),
            json!({"person": {"name": {"firstName": name, "lastName": who}},
                   "loyalty": {"tier": tier, "points": i * 40}}),
        ));
    }
    events.push(frag(
        "link",
        "ab",
        &t(10),
        json!({"email": [{"id": "a"}, {"id": "b"}]}),
        json!({"loyalty": {"tier": "gold"}}),
    ));
    events.push(upload(
        "vip",
        &t(11),
        &[("email", "c"), ("email", "f")],
        &[],
    ));
    events.push(frag(
        "link",
        "cd",
        &t(12),
        json!({"email": [{"id": "c"}, {"id": "d"}], "ecid": [{"id": "9"}]}),
        json!({"person": {"name": {"firstName": "Jane"}}}),
    ));
    events.push(delete("link", "ab", &t(13)));
    events.push(frag(
        "crm",
        "e",
        &t(14),
        email("e"),
        json!({"person": {"name": {"firstName": "Jack"}}}),
    ));
    events.push(upload("vip", &t(15), &[], &[("email", "f")]));
    events.push(delete("crm", "a", &t(16)));
    events.push(frag(
        "crm",
        "b",
        &t(17),
        email("b"),
        json!({"person": {"name": {"firstName": "John"}}, "loyalty": {"tier": "gold"}}),
    ));
    events.push(delete("link", "cd", &t(18)));
    events.push(delete("crm", "c", &t(19)));
    events
}

#[test]
fn two_workers_export_exactly_what_one_worker_does() {
    let events = mixed_history();
    for batch in ["1", "3"] {
        let one = replay(
            &two_destinations(),
            &events,
            &["--workers", "1", "--batch", batch],
        );
        let two = replay(
            &two_destinations(),
            &events,
            &["--workers", "2", "--batch", batch],
        );
        assert!(one.len() >= 10, "too few exports to compare: {}", one.len());
        assert_exports(&two, &one);
    }
}
