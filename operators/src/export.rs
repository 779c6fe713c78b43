//! Export candidates and their encoding: which destinations a changed profile goes to, and the
//! exact JSON payload (SPEC §3).
//!
//! The dataflow emits one [`Candidate`] per `(merge policy, profile)` whose status, identities or
//! mapped attributes were touched in an epoch. [`encode`] applies the destination's mapping: the
//! triggers (status change of a mapped audience; identity change or a mapped-path write while
//! `realized` in a mapped audience) decide *whether*, the toggles decide the fields.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::Arc;

use crate::input::stable_hash;
use crate::leaf::{Leaf, Path, nest, path_selects};
use crate::plan::{AudienceIdx, DestinationIdx, Plan, PolicyIdx};
use crate::view::ProfileView;

/// A profile's status for one audience. `None` (never a member) is the absence of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Status {
    Exited,
    Realized,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Exited => "exited",
            Status::Realized => "realized",
        }
    }
}

/// A status with the time it was asserted (`lastQualificationTime`, µs since the Unix epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Membership {
    pub audience: AudienceIdx,
    pub status: Status,
    pub since: i64,
}

/// A `(merge policy, profile)` that may have to be exported at the end of an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub policy: PolicyIdx,
    /// The profile as it is (a tombstone: as it last was).
    pub view: Arc<ProfileView>,
    /// The policy's position in `view.policies`.
    pub slot: usize,
    /// Current memberships (realized or exited), sorted by audience.
    pub memberships: Vec<Membership>,
    /// Audiences whose status changed in the epoch, sorted.
    pub changed: Vec<AudienceIdx>,
    /// The identity map differs from the previous epoch's (added, removed, merged or split).
    pub identity_changed: bool,
    /// Mapped paths (indices into `Plan::mapped_paths`) written or removed by the epoch's
    /// events for this profile, sorted.
    pub touched: Vec<u16>,
    /// The newest event for this profile in the epoch: unique, so no two epochs' candidates
    /// of one profile are equal.
    pub seq: u64,
    /// The profile lost its last fragment in this epoch: exported with no attributes.
    pub tombstone: bool,
    /// A control epoch newly mapped an audience the profile is realized in: exported to the
    /// destinations that newly map it (SPEC §3 trigger 4).
    pub backfill: bool,
}

impl Candidate {
    /// `"namespace:id"` of the identity that names the profile (SPEC §5).
    pub fn profile_name(&self) -> String {
        self.view.name().display()
    }

    /// The merged mapped leaves to export (none for a tombstone).
    pub fn leaves(&self) -> &[(Path, Leaf)] {
        match self.view.policies.get(self.slot) {
            Some(p) if !self.tombstone => &p.leaves,
            _ => &[],
        }
    }
}

/// One export, ready for the egress.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Encoded {
    pub destination: DestinationIdx,
    pub profile: String,
    /// The keys of the profile's identities: the egress orders exports of profiles sharing an
    /// identity (SPEC §4).
    pub order_keys: Vec<u64>,
    /// Stable for the same input: the same export gets the same key after a restart.
    pub idempotency_key: String,
    pub payload: String,
}

/// Formats µs since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (fractions dropped).
pub fn format_time(micros: i64) -> String {
    let mut out = Vec::with_capacity(20);
    write_time(&mut out, micros);
    // Only ASCII digits and separators were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends `micros` as [`format_time`] writes it, digit by digit: every export writes a time
/// per audience, and `format!` was a few percent of a replay's time.
fn write_time(out: &mut Vec<u8>, micros: i64) {
    let secs = micros.div_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    /// `n`'s decimal digits, at least `width` of them (as `{:0width$}`).
    fn digits(out: &mut Vec<u8>, n: u64, width: u32) {
        let width = width.max(n.checked_ilog10().map_or(1, |l| l + 1));
        for place in (0..width).rev() {
            out.push(b'0' + (n / 10u64.pow(place) % 10) as u8);
        }
    }
    if y < 0 {
        out.push(b'-');
    }
    // As `{:04}`: the sign counts toward the width.
    digits(out, y.unsigned_abs(), if y < 0 { 3 } else { 4 });
    out.push(b'-');
    digits(out, u64::from(m), 2);
    out.push(b'-');
    digits(out, u64::from(d), 2);
    out.push(b'T');
    // `rem` is within a day: 0..86_400.
    let rem = rem.unsigned_abs();
    digits(out, rem / 3600, 2);
    out.push(b':');
    digits(out, (rem / 60) % 60, 2);
    out.push(b':');
    digits(out, rem % 60, 2);
    out.push(b'Z');
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Decides whether `candidate` goes to destination `dest`, and builds its payload.
pub fn encode(plan: &Plan, dest: DestinationIdx, candidate: &Candidate) -> Option<Encoded> {
    let destination = &plan.destinations[dest as usize];
    let mapped = |a: AudienceIdx| {
        destination
            .mappings
            .iter()
            .find(|m| m.audience == a && plan.audiences[a as usize].policy == candidate.policy)
    };
    let status_changed = candidate.changed.iter().any(|&a| mapped(a).is_some());
    let realized_mapped = candidate
        .memberships
        .iter()
        .any(|m| m.status == Status::Realized && mapped(m.audience).is_some());
    let wrote_mapped = candidate.touched.iter().any(|&i| {
        let path = &plan.mapped_paths[i as usize];
        destination.attributes.iter().any(|a| a == path)
    });
    let backfilled = candidate.backfill
        && plan.change.as_ref().is_some_and(|change| {
            change.backfill.iter().any(|&(d, a)| {
                d == dest
                    && candidate
                        .memberships
                        .iter()
                        .any(|m| m.audience == a && m.status == Status::Realized)
            })
        });
    let export = status_changed
        || backfilled
        || (realized_mapped && (candidate.identity_changed || wrote_mapped));
    if !export {
        return None;
    }

    let attributes = nest(
        candidate
            .leaves()
            .iter()
            .filter(|(p, _)| destination.attributes.iter().any(|a| path_selects(a, p)))
            .map(|(p, l)| (&**p, l)),
    );

    // Written straight into the buffer: this runs for every export, and building a
    // `serde_json::Value` tree first cost more than the rest of the encoding.
    let mut out: Vec<u8> = Vec::with_capacity(256 + 160 * candidate.memberships.len());
    out.push(b'{');
    for (key, value) in &attributes {
        if key == "segmentMembership" || key == "identityMap" {
            continue; // reserved for the payload's own fields
        }
        write_json(&mut out, key);
        out.push(b':');
        write_json(&mut out, value);
        out.push(b',');
    }
    out.extend_from_slice(b"\"segmentMembership\":{\"ups\":{");
    let mut first = true;
    for m in &candidate.memberships {
        let mapping = mapped(m.audience);
        let changed = candidate.changed.binary_search(&m.audience).is_ok();
        if !(m.status == Status::Realized || (changed && mapping.is_some())) {
            continue;
        }
        let audience = &plan.audiences[m.audience as usize];
        if !first {
            out.push(b',');
        }
        first = false;
        write_json(&mut out, &audience.id);
        out.extend_from_slice(b":{\"lastQualificationTime\":\"");
        write_time(&mut out, m.since);
        let _ = write!(out, "\",\"status\":\"{}\"", m.status.as_str());
        if destination.include_segment_timestamps {
            let _ = write!(
                out,
                ",\"createdAt\":{},\"updatedAt\":{}",
                audience.created_at, audience.updated_at
            );
            if let Some(mapping) = mapping {
                let _ = write!(
                    out,
                    ",\"mappingCreatedAt\":{},\"mappingUpdatedAt\":{}",
                    mapping.created_at, mapping.updated_at
                );
            }
        }
        if destination.include_segment_names && mapping.is_some() {
            out.extend_from_slice(b",\"name\":");
            write_json(&mut out, &audience.name);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"}},\"identityMap\":{");
    // Identities are sorted by (namespace, id): each namespace is one run.
    let mut namespace: Option<&str> = None;
    for identity in &candidate.view.identities {
        if namespace == Some(identity.namespace()) {
            out.push(b',');
        } else {
            if namespace.is_some() {
                out.extend_from_slice(b"],");
            }
            write_json(&mut out, identity.namespace());
            out.extend_from_slice(b":[");
            namespace = Some(identity.namespace());
        }
        out.extend_from_slice(b"{\"id\":");
        write_json(&mut out, identity.id());
        out.push(b'}');
    }
    if namespace.is_some() {
        out.push(b']');
    }
    out.extend_from_slice(b"}}");

    let profile = candidate.profile_name();
    let key = stable_hash(&(&destination.id, candidate.policy, &profile, candidate.seq));
    Some(Encoded {
        destination: dest,
        profile,
        order_keys: candidate.view.identities.iter().map(|i| i.key()).collect(),
        idempotency_key: format!("{key:016x}-{:x}", candidate.seq),
        // Only JSON text was written, and JSON text is UTF-8.
        payload: String::from_utf8(out).unwrap_or_default(),
    })
}

fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing into a Vec cannot fail, and these values always serialize.
    let _ = serde_json::to_writer(&mut *out, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_seconds() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_555_296_110_999_999), "2019-04-15T02:41:50Z");
        assert_eq!(format_time(951_782_400_000_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(-1), "1969-12-31T23:59:59Z");
        assert_eq!(format_time(253_402_300_799_000_000), "9999-12-31T23:59:59Z");
        assert_eq!(format_time(-62_167_219_200_000_000), "0000-01-01T00:00:00Z");
        assert_eq!(format_time(-62_198_755_200_000_000), "-001-01-01T00:00:00Z");
        // Digit by digit, as `format!` wrote it.
        let by_format = |micros: i64| {
            let secs = micros.div_euclid(1_000_000);
            let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
            let (y, m, d) = civil_from_days(days);
            let (h, min, s) = (rem / 3600, (rem / 60) % 60, rem % 60);
            format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}Z")
        };
        let mut t = -63_000_000_000_000_000i64;
        while t < 260_000_000_000_000_000 {
            assert_eq!(format_time(t), by_format(t), "{t}");
            t += 999_999_937_777_777;
        }
    }
}
