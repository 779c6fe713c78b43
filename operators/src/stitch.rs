//! Identity stitching: which profile each fragment belongs to.
//!
//! `privateGraph` is incremental connected components over the bipartite graph of fragments and
//! identities: a fragment links every identity it holds, and a profile is a component, named by
//! its smallest identity key (identity keys have the top bit clear, fragment keys set, so the
//! minimum label is always an identity). Label propagation handles merges and splits alike: when
//! a fragment is deleted or re-upserted without a linking identity, the labels that flowed
//! through it are retracted and the parts settle on their own minima. `none` puts each fragment
//! in the profile of its primary identity.

use std::sync::Arc;

use differential_dataflow::VecCollection;
use differential_dataflow::algorithms::graphs::propagate::propagate;
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::ValSpine;

use crate::input::{Epoch, FragKey, Fragment, ProfileKey};
use crate::plan::Stitching;

/// The fragments, arranged by key (the upsert arrangement).
pub type ArrangedFragments<'s> =
    Arranged<'s, TraceAgent<ValSpine<FragKey, Arc<Fragment>, Epoch, isize>>>;

/// The `(fragment, profile)` pairs under `kind`.
pub fn profiles_of<'s>(
    kind: Stitching,
    fragments: ArrangedFragments<'s>,
) -> VecCollection<'s, Epoch, (FragKey, ProfileKey), isize> {
    match kind {
        Stitching::None => {
            fragments.as_collection(|key, f: &Arc<Fragment>| (*key, f.primary.key()))
        }
        Stitching::PrivateGraph => {
            let edges = fragments.flat_map_ref(|key, f: &Arc<Fragment>| {
                f.identities
                    .iter()
                    .map(|i| (*key, i.key()))
                    .collect::<Vec<_>>()
            });
            let undirected = edges.clone().concat(edges.clone().map(|(f, i)| (i, f)));
            let seeds = edges.map(|(_, i)| i).distinct().map(|i| (i, i));
            propagate(undirected, seeds).filter(|(node, _)| node >> 63 == 1)
        }
    }
}
