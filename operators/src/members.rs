//! Members: which fragments and upload memberships each profile has, as one identity holds
//! them.
//!
//! An `Anchor` is what the identity stage ([`crate::identity`]) keeps per identity: the
//! profile(s) holding it (from stitching), the fragments anchored at it (`privateGraph`: a
//! fragment lies in its anchor identity's component) and the audiences it is uploaded to. Its
//! *contribution* is the `(profile, member)` pairs it gives: a fragment moves with its anchor's
//! profile when stitching relabels a component, and an upload counts for every profile holding
//! the identity. The stage emits the change of each touched identity's contribution.
//!
//! This is the join of the fragments, the uploads and the identity profiles, kept as keyed
//! state rather than arrangements: an attribute-only write costs one retraction and one
//! insertion here and nothing in any arrangement.

use thin_vec::{ThinVec, thin_vec};

use crate::input::{Epoch, FragRef, ProfileKey};
use crate::plan::AudienceIdx;
use crate::view::Member;

/// A small multiset of `(value, count)`, with the one-value case (nearly every identity: one
/// profile, one anchored fragment) kept inline and the rest in one allocation behind a thin
/// pointer: every identity, graph node and profile holds some, so the enum is kept to 16
/// bytes for an 8-byte `T` (the counts are `i32`: a count is a number of fragments or of
/// holders).
#[derive(Clone, Debug, Default)]
pub(crate) enum Counts<T> {
    #[default]
    Empty,
    One(T, i32),
    /// Two or more values, none with a zero count (a count may be negative for a while: a
    /// retraction can come before its insertion within an epoch).
    Many(ThinVec<(T, i32)>),
}

impl<T: PartialEq + Clone> Counts<T> {
    pub(crate) fn update(&mut self, value: T, diff: isize) {
        // A diff is a count of fragments or holders: never near the i32 range.
        let diff = diff as i32;
        match self {
            Counts::Empty => *self = Counts::One(value, diff),
            Counts::One(v, n) if *v == value => {
                *n += diff;
                if *n == 0 {
                    *self = Counts::Empty;
                }
            }
            Counts::One(v, n) => *self = Counts::Many(thin_vec![(v.clone(), *n), (value, diff)]),
            Counts::Many(all) => {
                match all.iter_mut().position(|(v, _)| *v == value) {
                    Some(at) => all[at].1 += diff,
                    None => {
                        // Grown by one, not doubled: a few values stay many for long (a
                        // profile's fragments).
                        all.reserve_exact(1);
                        all.push((value, diff));
                    }
                }
                all.retain(|(_, n)| *n != 0);
                // Back to the inline forms, so that a value replaced by another within an
                // epoch (the usual change) leaves no allocation behind.
                match all.len() {
                    0 => *self = Counts::Empty,
                    1 => {
                        if let Some((v, n)) = all.pop() {
                            *self = Counts::One(v, n);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    pub(crate) fn present(&self) -> impl Iterator<Item = &T> + Clone {
        let (one, many) = match self {
            Counts::Empty => (None, &[][..]),
            Counts::One(v, n) => ((*n > 0).then_some(v), &[][..]),
            Counts::Many(all) => (None, &all[..]),
        };
        one.into_iter()
            .chain(many.iter().filter(|(_, n)| *n > 0).map(|(v, _)| v))
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Counts::Empty)
    }
}

/// What one identity holds. Uploads are rare, so they are kept out of line: every identity of
/// the state has an entry.
#[derive(Clone, Debug, Default)]
pub(crate) struct Anchor {
    pub(crate) holders: Counts<ProfileKey>,
    pub(crate) fragments: Counts<FragRef>,
    uploads: Option<Box<Counts<AudienceIdx>>>,
}

impl Anchor {
    pub(crate) fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.fragments.is_empty() && self.uploads.is_none()
    }

    /// Updates the identity's membership of an upload audience.
    pub(crate) fn upload(&mut self, audience: AudienceIdx, diff: isize) {
        let uploads = self.uploads.get_or_insert_with(Box::default);
        uploads.update(audience, diff);
        if uploads.is_empty() {
            self.uploads = None;
        }
    }

    /// The `(profile, member)` pairs this identity contributes.
    pub(crate) fn contribution(&self) -> Vec<(ProfileKey, Member)> {
        let members: Vec<Member> = self
            .fragments
            .present()
            .cloned()
            .map(Member::Fragment)
            .chain(
                self.uploads
                    .iter()
                    .flat_map(|u| u.present())
                    .map(|a| Member::Upload(*a)),
            )
            .collect();
        self.holders
            .present()
            .flat_map(|p| members.iter().map(move |m| (*p, m.clone())))
            .collect()
    }
}

pub type MemberChange = ((ProfileKey, Member), Epoch, isize);

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn counts_return_to_the_inline_forms() {
        let mut c = Counts::default();
        c.update(1u64, 1);
        // A replacement within an epoch: the new value first, then the old one retracted.
        c.update(2, 1);
        assert!(matches!(c, Counts::Many(_)));
        c.update(1, -1);
        assert!(matches!(c, Counts::One(2, 1)));
        assert_eq!(c.present().collect::<Vec<_>>(), vec![&2]);
        // A retraction before its insertion (any order within an epoch) keeps the count.
        c.update(3, -1);
        c.update(3, 1);
        assert!(matches!(c, Counts::One(2, 1)));
        c.update(2, -1);
        assert!(c.is_empty());
    }

    #[test]
    fn counts_keep_many_values_and_drop_zeroes() {
        let mut c = Counts::default();
        for v in [1u64, 2, 3] {
            c.update(v, 1);
        }
        c.update(2, 1);
        c.update(1, -1);
        let present: Vec<_> = c.present().copied().collect();
        assert_eq!(present, vec![2, 3]);
        assert!(matches!(&c, Counts::Many(all) if all.len() == 2 && all[0] == (2, 2)));
        c.update(3, -1);
        assert!(matches!(c, Counts::One(2, 2)));
    }

    #[test]
    fn counts_and_anchors_are_compact() {
        // Held per identity, per graph node and per profile: their size is the state's size.
        assert_eq!(std::mem::size_of::<Counts<u64>>(), 16);
        assert_eq!(std::mem::size_of::<super::Anchor>(), 40);
    }
}
