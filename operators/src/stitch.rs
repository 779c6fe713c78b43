//! Identity stitching: which profile each fragment belongs to, and each identity.
//!
//! `privateGraph` is incremental connected components over the identities: a fragment links the
//! identities it holds, and a profile is a component, named by its smallest identity key; a
//! fragment belongs to the component of its identities. Label propagation handles merges and
//! splits alike: when a fragment is deleted or re-upserted without a linking identity, the
//! labels that flowed through it are retracted and the parts settle on their own minima. An
//! attribute-only write retracts and re-inserts the same edges, which cancel before the
//! components see them.
//!
//! `none` puts each fragment in the profile of its primary identity, with no arrangement at all.
//! Which fragments each profile then has is [`crate::members`]'s business.

use differential_dataflow::VecCollection;
use differential_dataflow::algorithms::graphs::propagate::propagate;

use crate::input::{Epoch, FragKey, FragRef, IdKey, ProfileKey};
use crate::meter::Meter;
use crate::plan::Stitching;
use crate::upsert::{FragmentIdentities, IdentitySet};

type Coll<'s, D> = VecCollection<'s, Epoch, D, isize>;

/// Each identity's profile(s) under `kind`: one under `privateGraph` (its component); under
/// `none`, one pair per fragment holding the identity (the fragment's primary identity), so a
/// pair's multiplicity counts those fragments.
pub fn identity_profiles<'s>(
    kind: Stitching,
    fragments: Coll<'s, (FragKey, FragRef)>,
    identities: FragmentIdentities<'s>,
    meter: &Meter,
) -> Coll<'s, (IdKey, ProfileKey)> {
    match kind {
        Stitching::None => fragments.flat_map(|(_, f): (FragKey, FragRef)| {
            let profile = f.primary().key();
            f.identities
                .iter()
                .map(|i| (i.key(), profile))
                .collect::<Vec<_>>()
        }),
        Stitching::PrivateGraph => {
            let labels = components(identities, meter);
            meter.collection("identity profiles (propagate output)", &labels);
            labels
        }
    }
}

/// A fragment's anchor: its first identity (a fragment holds at least one), whose profile it
/// belongs to under `privateGraph`.
pub fn anchor(f: &FragRef) -> IdKey {
    f.identities.first().map_or(0, |i| i.key())
}

/// `(identity, component)` for every identity some fragment holds: the connected components
/// of the graph in which each fragment links its identities, as a star around its anchor, and
/// the component is named by its smallest identity key.
///
/// Edges and seeds keep their multiplicities (two fragments may link the same pair): label
/// propagation takes the least label present, which multiplicities do not change, so no
/// `distinct` is needed.
pub fn components<'s>(
    identities: FragmentIdentities<'s>,
    meter: &Meter,
) -> Coll<'s, (IdKey, ProfileKey)> {
    let edges = identities
        .clone()
        .flat_map(|(_, ids): (FragKey, IdentitySet)| {
            let hub = ids.first().copied().unwrap_or(0);
            ids.iter()
                .skip(1)
                .flat_map(|&i| [(hub, i), (i, hub)])
                .collect::<Vec<_>>()
        });
    let seeds = identities.flat_map(|(_, ids): (FragKey, IdentitySet)| {
        ids.iter().map(|&i| (i, i)).collect::<Vec<_>>()
    });
    meter.collection("edges (propagate)", &edges);
    meter.collection("seeds (propagate)", &seeds);
    propagate(edges, seeds)
}
