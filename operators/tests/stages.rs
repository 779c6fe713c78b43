//! Each stage of the dataflow, run in-process on its own and checked against a from-scratch
//! computation (the whole dataflow is checked against a reference model in the binary's
//! `tests/model.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use differential_dataflow::input::Input as _;
use timely::dataflow::operators::capture::{Capture, Extract};
use timely::dataflow::operators::core::input::Input as _;

use streamdest_operators::export::{Membership, Status};
use streamdest_operators::history::step::{self, Record};
use streamdest_operators::identity::{AtIdentity, ToIdentity, identities};
use streamdest_operators::input::{
    Epoch, FragKey, FragRef, Fragment, FragmentWrite, IdKey, Identity, Mark, ProfileKey,
};
use streamdest_operators::intern::Name;
use streamdest_operators::leaf::Leaf;
use streamdest_operators::link::{MarkAt, Role, ToProfile};
use streamdest_operators::members::MemberChange;
use streamdest_operators::meter::Meter;
use streamdest_operators::plan::{
    AttributeMerge, AudienceKind, AudiencePlan, Plan, Plans, PolicyPlan, Stitching,
};
use streamdest_operators::stitch::{Graph, components};
use streamdest_operators::upsert::{Anchor, IdentitySet, upsert};
use streamdest_operators::view::{Member, PolicyView, ProfileView, views};

/// A deterministic SplitMix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn identity(n: u64) -> Identity {
    Identity::new("ns", &format!("i{n}"))
}

/// A fragment version with a null leaf at each of `paths` (sorted).
fn fragment(key: FragKey, identities: &[u64], seq: u64, paths: &[&str]) -> Arc<Fragment> {
    let mut identities: Vec<Identity> = identities.iter().map(|&i| identity(i)).collect();
    identities.sort();
    identities.dedup();
    Arc::new(Fragment {
        key,
        dataset: Name::new("d"),
        identities: identities.into(),
        primary: 0,
        leaves: paths.iter().map(|p| (Name::new(p), Leaf::Null)).collect(),
        ts: seq as i64,
        seq,
    })
}

/// A captured stream of differential updates.
type Captured<D> = Vec<(Epoch, Vec<(D, Epoch, isize)>)>;

/// The updates of a captured stream, accumulated up to and including each epoch.
fn accumulate<D: Ord + Clone>(captured: Captured<D>, epochs: Epoch) -> Vec<BTreeMap<D, isize>> {
    let mut at: BTreeMap<Epoch, Vec<(D, isize)>> = BTreeMap::new();
    for (_, updates) in captured {
        for (d, t, r) in updates {
            at.entry(t).or_default().push((d, r));
        }
    }
    let mut state: BTreeMap<D, isize> = BTreeMap::new();
    (0..epochs)
        .map(|t| {
            for (d, r) in at.remove(&t).unwrap_or_default() {
                *state.entry(d.clone()).or_default() += r;
            }
            state.retain(|_, r| *r != 0);
            state.clone()
        })
        .collect()
}

/// Every record a captured stream carried (for data that does not order, unlike `extract`).
fn messages<D>(
    captured: std::sync::mpsc::Receiver<timely::dataflow::operators::capture::Event<Epoch, Vec<D>>>,
) -> Vec<D> {
    captured
        .try_iter()
        .flat_map(|event| match event {
            timely::dataflow::operators::capture::Event::Messages(_, data) => data,
            timely::dataflow::operators::capture::Event::Progress(_) => Vec::new(),
        })
        .collect()
}

/// From scratch: each identity's component, named by its smallest identity key.
/// Components from scratch: union-find over the identity sets, each named by its minimum.
fn union_find(sets: impl IntoIterator<Item = Vec<IdKey>>) -> BTreeMap<IdKey, ProfileKey> {
    let mut parent: BTreeMap<IdKey, IdKey> = BTreeMap::new();
    fn find(parent: &mut BTreeMap<IdKey, IdKey>, x: IdKey) -> IdKey {
        let p = parent[&x];
        if p == x {
            return x;
        }
        let root = find(parent, p);
        parent.insert(x, root);
        root
    }
    for ids in sets {
        for &i in &ids {
            parent.entry(i).or_insert(i);
        }
        for pair in ids.windows(2) {
            let (a, b) = (find(&mut parent, pair[0]), find(&mut parent, pair[1]));
            // The smaller key stays the root, so a root is its component's minimum.
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            parent.insert(hi, lo);
        }
    }
    let keys: Vec<IdKey> = parent.keys().copied().collect();
    keys.into_iter()
        .map(|k| (k, find(&mut parent, k)))
        .collect()
}

/// Each fragment's identity keys.
fn identity_sets(fragments: &BTreeMap<FragKey, Arc<Fragment>>) -> Vec<Vec<IdKey>> {
    fragments
        .values()
        .map(|f| f.identities.iter().map(|i| i.key()).collect())
        .collect()
}

#[test]
fn graph_labels_follow_merges_splits_and_deletes_batch_by_batch() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut below = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut graph = Graph::default();
    let mut sets: BTreeMap<u64, Vec<IdKey>> = BTreeMap::new();
    // The labels as the emitted changes say, to check the changes as well as the state.
    let mut emitted: BTreeMap<(IdKey, ProfileKey), isize> = BTreeMap::new();
    let (mut merges, mut splits) = (0, 0);
    for _batch in 0..400 {
        let components_before = union_find(sets.values().cloned())
            .values()
            .copied()
            .collect::<Vec<_>>();
        let before = components_before
            .iter()
            .collect::<std::collections::BTreeSet<_>>();
        // Several writes a batch, some to the same fragment: the graph sees the
        // retraction of the old set and the insertion of the new, in any order.
        let mut writes = Vec::new();
        for _ in 0..1 + below(4) {
            let fragment = below(30);
            let new: Option<Vec<IdKey>> = (below(4) != 0).then(|| {
                let mut ids: Vec<IdKey> = (0..1 + below(3)).map(|_| below(40)).collect();
                ids.dedup();
                ids
            });
            if let Some(old) = sets.remove(&fragment) {
                writes.push((old, -1));
            }
            if let Some(new) = new {
                writes.push((new.clone(), 1));
                sets.insert(fragment, new);
            }
        }
        if below(2) == 0 {
            writes.reverse();
        }
        for (ids, diff) in writes {
            graph.update(&ids, diff);
        }
        graph.settle(|i, l, d| {
            let count = emitted.entry((i, l)).or_default();
            *count += d;
            if *count == 0 {
                emitted.remove(&(i, l));
            }
        });
        let expected = union_find(sets.values().cloned());
        let after = expected.values().collect::<std::collections::BTreeSet<_>>();
        merges += usize::from(after.len() < before.len());
        splits += usize::from(after.len() > before.len());
        let held: BTreeMap<IdKey, ProfileKey> = graph
            .labels()
            .map(|(i, l)| (i, l.expect("every identity held is labelled")))
            .collect();
        assert_eq!(held, expected);
        let said: BTreeMap<IdKey, ProfileKey> = emitted
            .iter()
            .map(|(&(i, l), &n)| {
                assert_eq!(n, 1, "identity {i} label {l}");
                (i, l)
            })
            .collect();
        assert_eq!(said, expected);
    }
    assert!(
        merges > 20 && splits > 20,
        "merges {merges}, splits {splits}"
    );
}

#[test]
fn graph_joining_a_large_component_walks_it_only_to_relabel_it() {
    let mut graph = Graph::default();
    // One component of 10,001 identities: 10,000 fragments linking 1000 + i to 500.
    for i in 0..10_000 {
        graph.update(&[500, 1_000 + i], 1);
    }
    graph.settle(|_, _, _| {});
    let walked = graph.walked();
    // A fragment with a new, larger identity: labelled directly, nothing walked.
    graph.update(&[20_000, 7_000], 1);
    let mut changes = Vec::new();
    graph.settle(|i, l, d| changes.push((i, l, d)));
    assert_eq!(changes, vec![(20_000, 500, 1)]);
    assert_eq!(graph.walked(), walked);
    // A smaller identity joins: the whole component is relabelled, so walked.
    graph.update(&[7, 1_234], 1);
    let mut relabelled = 0;
    graph.settle(|_, l, d| relabelled += usize::from(l == 7 && d == 1));
    assert_eq!(relabelled, 10_003);
    assert_eq!(graph.walked(), walked + 10_002);
    // A deletion may split: the component is walked from the identities that lost a link.
    graph.update(&[7, 1_234], -1);
    graph.settle(|_, _, _| {});
    assert_eq!(graph.walked(), walked + 10_002 + 10_002);
}

#[test]
fn components_match_union_find_through_merges_splits_and_deletes() {
    let epochs = 60;
    let mut rng = Rng(7);
    let mut history = Vec::new();
    let mut current: BTreeMap<FragKey, Arc<Fragment>> = BTreeMap::new();
    let mut expected = Vec::new();
    let (mut merges, mut splits) = (0, 0);
    for t in 0..epochs {
        let mut writes = Vec::new();
        for _ in 0..3 {
            let key = rng.below(12) | (1 << 63);
            let old = current.get(&key).cloned();
            let before = union_find(identity_sets(&current))
                .values()
                .collect::<BTreeSet<_>>()
                .len();
            if rng.below(4) == 0 {
                current.remove(&key);
            } else {
                let ids: Vec<u64> = (0..1 + rng.below(3)).map(|_| rng.below(16)).collect();
                current.insert(key, fragment(key, &ids, t * 10 + writes.len() as u64, &[]));
            }
            let after = union_find(identity_sets(&current))
                .values()
                .collect::<BTreeSet<_>>()
                .len();
            merges += usize::from(after < before);
            splits += usize::from(after > before && old.is_some());
            writes.push((key, old, current.get(&key).cloned()));
        }
        history.push(writes);
        expected.push(union_find(identity_sets(&current)));
    }
    assert!(
        merges > 5 && splits > 5,
        "the history merges ({merges}) and splits ({splits})"
    );

    let captured = timely::execute_directly(move |worker| {
        let (mut input, captured) = worker.dataflow::<Epoch, _, _>(|scope| {
            let (input, identities) = scope.new_collection::<(FragKey, IdentitySet), isize>();
            (
                input,
                components(identities, &Meter::default()).inner.capture(),
            )
        });
        for (t, writes) in history.into_iter().enumerate() {
            input.advance_to(t as Epoch);
            for (key, old, new) in writes {
                let ids = |f: &Fragment| {
                    f.identities
                        .iter()
                        .map(|i| i.key())
                        .collect::<IdentitySet>()
                };
                if let Some(old) = old {
                    input.remove((key, ids(&old)));
                }
                if let Some(new) = new {
                    input.insert((key, ids(&new)));
                }
            }
        }
        input.close();
        while worker.step() {}
        captured
    });
    let actual = accumulate(captured.extract(), epochs);
    for (t, (expected, actual)) in expected.iter().zip(&actual).enumerate() {
        let actual: BTreeMap<IdKey, ProfileKey> = actual
            .iter()
            .map(|(&(i, p), &r)| {
                assert_eq!(r, 1, "epoch {t}: ({i}, {p}) has multiplicity {r}");
                (i, p)
            })
            .collect();
        assert_eq!(&actual, expected, "epoch {t}");
    }
}

#[test]
fn upsert_completes_marks_with_the_old_version_and_anchors_both_versions() {
    // Mapped paths m0..m3: a version's leaves at them are the paths it holds.
    let mut plan = plan();
    plan.mapped_paths = (0..4).map(|i| format!("m{i}")).collect();
    let v1 = fragment(1 << 63, &[1, 2], 1, &["m0", "m3"]);
    let v2 = fragment(1 << 63, &[5], 2, &["m1"]);
    let v3 = fragment(1 << 63, &[5], 3, &["m1"]);
    let writes = vec![
        vec![(
            v1.key,
            FragmentWrite {
                value: Some(v1.clone()),
                mark: Mark::new(10, 1, vec![0, 3]),
            },
        )],
        vec![(
            v2.key,
            FragmentWrite {
                value: Some(v2.clone()),
                mark: Mark::new(20, 2, vec![1]),
            },
        )],
        // The same identities, another attribute value.
        vec![(
            v3.key,
            FragmentWrite {
                value: Some(v3.clone()),
                mark: Mark::new(25, 3, vec![]),
            },
        )],
        vec![(
            v2.key,
            FragmentWrite {
                value: None,
                mark: Mark::new(30, 4, vec![]),
            },
        )],
    ];
    let (changes, identities, marks) = timely::execute_directly(move |worker| {
        let (mut input, captured) = worker.dataflow::<Epoch, _, _>(|scope| {
            let (input, writes) = scope.new_input::<Vec<(FragKey, FragmentWrite)>>();
            let upserted = upsert(writes, Plans::new(Arc::new(plan)));
            let captured = (
                upserted.fragments.inner.capture(),
                upserted.identities.inner.capture(),
                upserted.marks.capture(),
            );
            (input, captured)
        });
        for (t, epoch) in writes.into_iter().enumerate() {
            input.advance_to(t as Epoch);
            for w in epoch {
                input.send(w);
            }
        }
        drop(input);
        while worker.step() {}
        captured
    });
    let states = accumulate(changes.extract(), 4);
    let seqs = |t: usize| states[t].keys().map(|(_, f)| f.seq).collect::<Vec<_>>();
    assert_eq!(
        (seqs(0), seqs(1), seqs(2), seqs(3)),
        (vec![1], vec![2], vec![3], vec![])
    );
    // The identity sets change with the identities only: not at epoch 2 (same identities).
    let id_updates: Vec<Epoch> = identities
        .extract()
        .into_iter()
        .flat_map(|(_, u)| u.into_iter().map(|(_, t, _)| t))
        .collect();
    assert_eq!(id_updates.iter().filter(|&&t| t == 2).count(), 0);
    assert_eq!(id_updates.iter().filter(|&&t| t == 1).count(), 2);

    let mut marks = messages(marks);
    marks.sort_by_key(|(_, t)| *t);
    let anchor = |f: &Fragment| Anchor::of(f);
    assert_eq!(marks[0].0.before, None);
    assert_eq!(marks[0].0.after, Some(anchor(&v1)));
    // The second version removes paths 0 and 3, which the first held.
    assert_eq!(marks[1].0.mark, Mark::new(20, 2, vec![0, 1, 3]));
    assert_eq!(
        (marks[1].0.before, marks[1].0.after),
        (Some(anchor(&v1)), Some(anchor(&v2)))
    );
    // An attribute-only rewrite still removes (and writes) the old version's mapped path.
    assert_eq!(marks[2].0.mark, Mark::new(25, 3, vec![1]));
    assert_eq!(marks[3].0.mark, Mark::new(30, 4, vec![1]));
    assert_eq!(
        (marks[3].0.before, marks[3].0.after),
        (Some(anchor(&v3)), None)
    );
}

#[test]
fn identities_name_successors_and_resolve_marks_before_and_after() {
    // Epoch 0: identities 1, 2 in profile 1; 3 in profile 3. Epoch 1: 3 joins profile 1
    // (a merge), 2 moves to a new profile 2 (a split), and marks arrive.
    let holds = |i: IdKey, p: ProfileKey, d: isize, t: Epoch| {
        (
            i,
            AtIdentity::Holds {
                profile: p,
                diff: d,
            },
            t,
        )
    };
    let mark = |ts| Mark::new(ts, ts as u64, vec![]);
    let sent = vec![
        vec![holds(1, 1, 1, 0), holds(2, 1, 1, 0), holds(3, 3, 1, 0)],
        vec![
            holds(3, 3, -1, 1),
            holds(3, 1, 1, 1),
            holds(2, 1, -1, 1),
            holds(2, 2, 1, 1),
            (
                2,
                AtIdentity::Mark(MarkAt::Fragment {
                    before: true,
                    mark: mark(5),
                }),
                1,
            ),
            (
                2,
                AtIdentity::Mark(MarkAt::Fragment {
                    before: false,
                    mark: mark(6),
                }),
                1,
            ),
            (
                9,
                AtIdentity::Mark(MarkAt::Fragment {
                    before: false,
                    mark: mark(7),
                }),
                1,
            ),
            (
                3,
                AtIdentity::Mark(MarkAt::Upload {
                    policy: 0,
                    mark: mark(8),
                }),
                1,
            ),
        ],
    ];
    let captured = timely::execute_directly(move |worker| {
        let (mut input, captured) = worker.dataflow::<Epoch, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Vec<ToIdentity>>();
            (input, identities(stream, true).to_profiles.capture())
        });
        for (t, epoch) in sent.into_iter().enumerate() {
            input.advance_to(t as Epoch);
            for m in epoch {
                input.send(m);
            }
        }
        drop(input);
        while worker.step() {}
        captured
    });
    let mut out: Vec<(ProfileKey, ToProfile, Epoch)> = messages(captured);
    out.sort_by_key(|(p, m, t)| (*t, *p, format!("{m:?}")));
    let expect = |p, role, ts, policy| {
        (
            p,
            ToProfile::Mark {
                role,
                policy,
                mark: mark(ts),
            },
            1,
        )
    };
    let mut expected = vec![
        (1, ToProfile::Successor(2), 1),
        expect(1, Role::Before, 5, None),
        expect(1, Role::After, 8, Some(0)),
        expect(2, Role::After, 6, None),
        (3, ToProfile::Successor(1), 1),
        expect(3, Role::IfGone, 8, Some(0)),
    ];
    expected.sort_by_key(|(p, m, t)| (*t, *p, format!("{m:?}")));
    // Identity 9 is in no profile: its mark goes nowhere.
    assert_eq!(out, expected);
}

fn plan() -> Plan {
    Plan {
        policies: vec![PolicyPlan {
            id: "p".into(),
            merge: AttributeMerge::TimestampOrdered,
            stitching: Stitching::PrivateGraph,
            removed: false,
        }],
        audiences: (0..3)
            .map(|a| AudiencePlan {
                id: format!("a{a}"),
                name: format!("a{a}"),
                policy: 0,
                kind: AudienceKind::Upload,
                created_at: 0,
                updated_at: 0,
                removed: false,
            })
            .collect(),
        ..Plan::default()
    }
    .finish()
}

fn view(ids: &[u64], qualified: &[u16]) -> Arc<ProfileView> {
    Arc::new(ProfileView {
        identities: ids.iter().map(|&i| identity(i)).collect(),
        name: 0,
        policies: vec![PolicyView {
            leaves: Box::default(),
            qualified: qualified.into(),
        }]
        .into(),
    })
}

fn record(ids: &[u64], memberships: &[(u16, Status, i64)]) -> Record {
    Record {
        view: view(ids, &[]),
        memberships: vec![
            memberships
                .iter()
                .map(|&(audience, status, since)| Membership {
                    audience,
                    status,
                    since,
                })
                .collect(),
        ],
    }
}

#[test]
fn decide_inherits_the_strongest_status_and_the_earliest_time() {
    let plan = plan();
    // Two predecessors merge: audience 0 realized in both (earliest time kept), audience 1
    // realized in one and exited in the other (realized wins), audience 2 exited.
    let a = record(
        &[1],
        &[
            (0, Status::Realized, 30),
            (1, Status::Exited, 5),
            (2, Status::Exited, 7),
        ],
    );
    let b = record(
        &[2],
        &[(0, Status::Realized, 20), (1, Status::Realized, 40)],
    );
    let marks = vec![(None, Mark::new(100, 9, vec![]))];
    let mut out = Vec::new();
    let new = step::decide(
        &plan,
        Stitching::PrivateGraph,
        view(&[1, 2], &[0, 1]),
        &[&a, &b],
        &marks,
        &mut out,
    );
    assert_eq!(
        new.memberships[0],
        vec![
            Membership {
                audience: 0,
                status: Status::Realized,
                since: 20
            },
            Membership {
                audience: 1,
                status: Status::Realized,
                since: 40
            },
            Membership {
                audience: 2,
                status: Status::Exited,
                since: 7
            },
        ]
    );
    // No status changed; the identities did (a merge): one export, trigger 2.
    assert_eq!(out.len(), 1);
    assert!(out[0].identity_changed && out[0].changed.is_empty());

    // The same profile next epoch, exiting audience 1 on an event at 200.
    let mut out = Vec::new();
    let marks = vec![(None, Mark::new(200, 10, vec![]))];
    let next = step::decide(
        &plan,
        Stitching::PrivateGraph,
        view(&[1, 2], &[0]),
        &[&new],
        &marks,
        &mut out,
    );
    assert_eq!(
        next.memberships[0][1],
        Membership {
            audience: 1,
            status: Status::Exited,
            since: 200
        }
    );
    assert_eq!(
        (out.len(), out[0].changed.clone(), out[0].identity_changed),
        (1, vec![1], false)
    );

    // Nothing changed and nothing mapped was written: no export.
    let mut out = Vec::new();
    step::decide(
        &plan,
        Stitching::PrivateGraph,
        view(&[1, 2], &[0]),
        &[&next],
        &[(None, Mark::new(300, 11, vec![]))],
        &mut out,
    );
    assert!(out.is_empty());
}

#[test]
fn tombstone_exits_realized_audiences_at_the_newest_event() {
    let plan = plan();
    let gone = record(
        &[1, 2],
        &[(0, Status::Realized, 10), (1, Status::Exited, 5)],
    );
    let mut out = Vec::new();
    let marks = vec![
        (None, Mark::new(50, 3, vec![])),
        (Some(0), Mark::new(70, 4, vec![])),
    ];
    step::tombstone(&plan, Stitching::PrivateGraph, &gone, &marks, &mut out);
    assert_eq!(out.len(), 1);
    assert!(out[0].tombstone && out[0].leaves().is_empty());
    assert_eq!(
        out[0].memberships,
        vec![Membership {
            audience: 0,
            status: Status::Exited,
            since: 70
        }]
    );
    assert_eq!(out[0].seq, 4);
}

#[test]
fn members_follow_their_anchor_identity_and_uploads_every_holder() {
    // What an identity is told, without the multiplicity.
    #[derive(Clone)]
    enum AtAnchor {
        Holder(ProfileKey),
        Fragment(FragRef),
        Upload(u16),
    }
    // A random history of changes at 6 identities: holders (profiles), anchored fragments and
    // uploads, each inserted and later retracted.
    let epochs = 40;
    let mut rng = Rng(11);
    let mut live: Vec<(IdKey, AtAnchor)> = Vec::new();
    let mut history: Vec<Vec<(IdKey, AtAnchor, Epoch, isize)>> = Vec::new();
    let mut expected = Vec::new();
    for t in 0..epochs {
        let mut changes = Vec::new();
        for _ in 0..4 {
            if !live.is_empty() && rng.below(3) == 0 {
                let (i, c) = live.remove(rng.below(live.len() as u64) as usize);
                changes.push((i, c, t, -1));
            } else {
                let i = rng.below(6);
                let change = match rng.below(3) {
                    0 => AtAnchor::Holder(100 + rng.below(3)),
                    1 => AtAnchor::Fragment(FragRef(fragment(
                        (1 << 63) | (t * 8 + changes.len() as u64),
                        &[i],
                        t * 8 + changes.len() as u64,
                        &[],
                    ))),
                    _ => AtAnchor::Upload(rng.below(2) as u16),
                };
                live.push((i, change.clone()));
                changes.push((i, change, t, 1));
            }
        }
        // From scratch: every identity's distinct holders times its distinct fragments and
        // uploads (an identity uploaded twice to one audience is uploaded once).
        let mut members: BTreeMap<(ProfileKey, Member), isize> = BTreeMap::new();
        for i in 0..6 {
            let at: Vec<&AtAnchor> = live
                .iter()
                .filter(|(j, _)| *j == i)
                .map(|(_, c)| c)
                .collect();
            let holders: BTreeSet<ProfileKey> = at
                .iter()
                .filter_map(|c| match c {
                    AtAnchor::Holder(p) => Some(*p),
                    _ => None,
                })
                .collect();
            let held: BTreeSet<Member> = at
                .iter()
                .filter_map(|c| match c {
                    AtAnchor::Fragment(f) => Some(Member::Fragment(f.clone())),
                    AtAnchor::Upload(a) => Some(Member::Upload(*a)),
                    AtAnchor::Holder(_) => None,
                })
                .collect();
            for h in &holders {
                for m in &held {
                    *members.entry((*h, m.clone())).or_default() += 1;
                }
            }
        }
        expected.push(members);
        history.push(changes);
    }
    let captured = timely::execute_directly(move |worker| {
        let (mut input, captured) = worker.dataflow::<Epoch, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Vec<ToIdentity>>();
            (input, identities(stream, true).members.capture())
        });
        for (t, epoch) in history.into_iter().enumerate() {
            input.advance_to(t as Epoch);
            for (identity, change, t, diff) in epoch {
                let change = match change {
                    AtAnchor::Holder(profile) => AtIdentity::Holds { profile, diff },
                    AtAnchor::Fragment(fragment) => AtIdentity::Fragment { fragment, diff },
                    AtAnchor::Upload(audience) => AtIdentity::Upload { audience, diff },
                };
                input.send((identity, change, t));
            }
        }
        drop(input);
        while worker.step() {}
        captured
    });
    let actual = accumulate(captured.extract(), epochs);
    for (t, (expected, actual)) in expected.iter().zip(&actual).enumerate() {
        assert_eq!(actual, expected, "epoch {t}");
    }
}

#[test]
fn views_change_only_when_the_view_does() {
    let plan = plan();
    let f1 = FragRef(fragment(1 << 63, &[1], 1, &[]));
    let f2 = FragRef(fragment(1 << 63 | 1, &[2], 2, &[]));
    let changes = vec![
        vec![((7, Member::Fragment(f1.clone())), 0, 1)],
        // An upload qualifies the profile for audience 0: a new view.
        vec![((7, Member::Upload(0)), 1, 1)],
        // The same upload through a second identity: the same view, no change.
        vec![((7, Member::Upload(0)), 2, 1)],
        // Another fragment: identities change.
        vec![((7, Member::Fragment(f2.clone())), 3, 1)],
        // Every member gone: the view is retracted.
        vec![
            ((7, Member::Fragment(f1)), 4, -1),
            ((7, Member::Fragment(f2)), 4, -1),
            ((7, Member::Upload(0)), 4, -2),
        ],
    ];
    let captured = timely::execute_directly(move |worker| {
        let plan = Arc::new(plan.clone());
        let (mut input, captured) = worker.dataflow::<Epoch, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Vec<MemberChange>>();
            (
                input,
                views(Plans::new(plan), Stitching::PrivateGraph, stream).capture(),
            )
        });
        for (t, epoch) in changes.into_iter().enumerate() {
            input.advance_to(t as Epoch);
            for change in epoch {
                input.send(change);
            }
        }
        drop(input);
        while worker.step() {}
        captured
    });
    let mut out: Vec<(Epoch, isize, usize, Vec<u16>)> = messages(captured)
        .into_iter()
        .map(|(_, v, t, d)| (t, d, v.identities.len(), v.policies[0].qualified.to_vec()))
        .collect();
    out.sort();
    assert_eq!(
        out,
        vec![
            (0, 1, 1, vec![]),
            (1, -1, 1, vec![]),
            (1, 1, 1, vec![0]),
            (3, -1, 1, vec![0]),
            (3, 1, 2, vec![0]),
            (4, -1, 2, vec![0]),
        ]
    );
}

/// A control epoch (a dynamic plan that changed) brings the views no data: the standing gate
/// still acts on it, and when the change can change views every profile's view is recomputed
/// under the new plan — checked against `assemble` from scratch; a change that cannot
/// (`reevaluate: false`) recomputes nothing, and later epochs use the plan then in force.
#[test]
fn views_recompute_every_profile_at_a_control_epoch() {
    use streamdest_operators::plan::PlanChange;
    use streamdest_operators::view::assemble;

    let dynamic = |removed: bool, reevaluate: Option<bool>| {
        let mut p = plan();
        p.dynamic = true;
        p.audiences[0].removed = removed;
        p.change = reevaluate.map(|reevaluate| PlanChange {
            ts: 1,
            seq: 1,
            backfill: Vec::new(),
            reevaluate,
        });
        p
    };
    let f7 = FragRef(fragment(1 << 63, &[1], 1, &[]));
    let f8 = FragRef(fragment(1 << 63 | 1, &[2], 2, &[]));
    let changes: Vec<Vec<MemberChange>> = vec![
        vec![
            ((7, Member::Fragment(f7.clone())), 0, 1),
            ((7, Member::Upload(0)), 0, 1),
            ((8, Member::Fragment(f8.clone())), 0, 1),
        ],
        vec![],
        // Epoch 2: audience 0 removed (control); epoch 3: back, but reevaluate is off.
        vec![],
        vec![],
        vec![((8, Member::Upload(0)), 4, 1)],
    ];
    let plans = Plans::new(Arc::new(dynamic(false, None)));
    let after_removal = Arc::new(dynamic(true, Some(true)));
    plans.set(2, after_removal.clone());
    plans.set(3, Arc::new(dynamic(false, Some(false))));
    let worker_plans = plans.clone();
    let captured = timely::execute_directly(move |worker| {
        let (mut input, captured) = worker.dataflow::<Epoch, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Vec<MemberChange>>();
            let out = views(worker_plans.clone(), Stitching::PrivateGraph, stream);
            (input, out.capture())
        });
        for (t, epoch) in changes.into_iter().enumerate() {
            input.advance_to(t as Epoch);
            for change in epoch {
                input.send(change);
            }
        }
        drop(input);
        while worker.step() {}
        captured
    });
    let mut out: Vec<(Epoch, ProfileKey, isize, Vec<u16>)> = messages(captured)
        .into_iter()
        .map(|(p, v, t, d)| (t, p, d, v.policies[0].qualified.to_vec()))
        .collect();
    out.sort();
    assert_eq!(
        out,
        vec![
            (0, 7, 1, vec![0]),
            (0, 8, 1, vec![]),
            (2, 7, -1, vec![0]),
            (2, 7, 1, vec![]),
            (4, 8, -1, vec![]),
            (4, 8, 1, vec![0]),
        ]
    );
    // The recomputed view is what `assemble` makes of the members under the new plan.
    let members = [Member::Fragment(f7), Member::Upload(0)];
    let scratch =
        assemble(&after_removal, Stitching::PrivateGraph, members.iter()).expect("a profile");
    assert!(scratch.policies[0].qualified.is_empty());
}
