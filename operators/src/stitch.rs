//! Identity stitching: which profile each fragment belongs to, and each identity.
//!
//! `privateGraph` is incremental connected components over the bipartite graph of fragments and
//! identities: a fragment links every identity it holds, and a profile is a component, named by
//! its smallest identity key (identity keys have the top bit clear, fragment keys set, so the
//! minimum label is always an identity). Label propagation handles merges and splits alike: when
//! a fragment is deleted or re-upserted without a linking identity, the labels that flowed
//! through it are retracted and the parts settle on their own minima. An attribute-only write
//! retracts and re-inserts the same edges, which cancel before the components see them.
//!
//! `none` puts each fragment in the profile of its primary identity, with no arrangement at all.

use differential_dataflow::VecCollection;
use differential_dataflow::algorithms::graphs::propagate::propagate;
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::ValSpine;

use crate::input::{Epoch, FragKey, FragRef, IdKey, ProfileKey};
use crate::plan::Stitching;

/// The fragments, arranged by key.
pub type ArrangedFragments<'s> = Arranged<'s, TraceAgent<ValSpine<FragKey, FragRef, Epoch, isize>>>;

type Coll<'s, D> = VecCollection<'s, Epoch, D, isize>;

/// A stitching's view of the fragments.
pub struct Stitched<'s> {
    /// Each profile's fragments.
    pub fragments: Coll<'s, (ProfileKey, FragRef)>,
    /// Each identity's profile(s): one under `privateGraph`; under `none`, one pair per
    /// fragment holding the identity, so a pair's multiplicity counts those fragments.
    pub identities: Coll<'s, (IdKey, ProfileKey)>,
}

/// The profiles of `kind`.
pub fn stitch<'s>(
    kind: Stitching,
    fragments: Coll<'s, (FragKey, FragRef)>,
    arranged: ArrangedFragments<'s>,
) -> Stitched<'s> {
    match kind {
        Stitching::None => Stitched {
            fragments: fragments
                .clone()
                .map(|(_, f): (FragKey, FragRef)| (f.primary().key(), f)),
            identities: fragments.flat_map(|(_, f): (FragKey, FragRef)| {
                let profile = f.primary().key();
                f.identities
                    .iter()
                    .map(|i| (i.key(), profile))
                    .collect::<Vec<_>>()
            }),
        },
        Stitching::PrivateGraph => {
            let labels = components(fragments);
            let fragment_profile = labels
                .clone()
                .filter(|(node, _)| node >> 63 == 1)
                .arrange_by_key_named("FragmentProfile");
            Stitched {
                fragments: fragment_profile
                    .join_core(arranged, |_, profile, f| Some((*profile, f.clone()))),
                identities: labels.filter(|(node, _)| node >> 63 == 0),
            }
        }
    }
}

/// `(node, component)` for every fragment and identity node: the component is named by its
/// smallest identity key.
pub fn components<'s>(fragments: Coll<'s, (FragKey, FragRef)>) -> Coll<'s, (u64, ProfileKey)> {
    let edges = fragments.flat_map(|(key, f): (FragKey, FragRef)| {
        f.identities
            .iter()
            .map(|i| (key, i.key()))
            .collect::<Vec<_>>()
    });
    let undirected = edges.clone().concat(edges.clone().map(|(f, i)| (i, f)));
    let seeds = edges.map(|(_, i)| i).distinct().map(|i| (i, i));
    propagate(undirected, seeds)
}
