//! Synthetic profiles and events for benchmarks and the demo: a reproducible population (a
//! seeded RNG), its configuration, and a stream of changes with a chosen share of changes that
//! matter to the destination (mapped attributes, audience membership).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

use crate::config::Config;

/// The shape of a synthetic workload.
#[derive(Clone, Debug)]
pub struct Synth {
    pub profiles: u64,
    pub audiences: usize,
    /// Share of update events that write a mapped attribute or move a membership threshold.
    pub relevant: f64,
    pub seed: u64,
}

impl Default for Synth {
    fn default() -> Self {
        Synth {
            profiles: 10_000,
            audiences: 20,
            relevant: 0.5,
            seed: 7,
        }
    }
}

impl Synth {
    /// The configuration: one policy (timestampOrdered, privateGraph), `audiences` rule
    /// audiences on `loyalty.points` thresholds and first names, one destination at `endpoint`
    /// mapping all audiences and the name and email attributes.
    pub fn config(&self, endpoint: &str) -> Config {
        let audiences: Vec<Value> = (0..self.audiences)
            .map(|i| {
                let rule = if i % 2 == 0 {
                    format!("loyalty.points >= {}", 100 * (i / 2 + 1))
                } else {
                    format!("person.name.firstName startsWith \"{}\" and exists personalEmail.address", (b'A' + (i as u8 % 26)) as char)
                };
                json!({"id": format!("aud-{i}"), "name": format!("Audience {i}"), "mergePolicy": "mp",
                       "rule": rule, "createdAt": 1_700_000_000_000i64, "updatedAt": 1_700_000_000_000i64})
            })
            .collect();
        let mapped: Vec<Value> = (0..self.audiences)
            .map(|i| json!({"id": format!("aud-{i}"), "mappingCreatedAt": 1_700_000_000_000i64, "mappingUpdatedAt": 1_700_000_000_000i64}))
            .collect();
        let config = json!({
            "mergePolicies": [{"id": "mp", "attributeMerge": "timestampOrdered", "identityStitching": "privateGraph"}],
            "audiences": audiences,
            "destinations": [{"id": "bench", "name": "Bench", "endpoint": endpoint, "audiences": mapped,
                              "includeSegmentNames": true, "includeSegmentTimestamps": true,
                              "attributes": ["person.name.firstName", "person.name.lastName", "personalEmail.address"]}]
        });
        Config::from_json_str(&config.to_string()).expect("the synthetic configuration is valid")
    }

    /// Events that load every profile: a CRM fragment and a web fragment sharing the email.
    pub fn initial_load(&self) -> impl Iterator<Item = String> + use<> {
        let seed = self.seed;
        (0..self.profiles).flat_map(move |p| {
            let mut rng = StdRng::seed_from_u64(seed ^ p.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            [crm(p, &mut rng, 0), web(p, 0)]
        })
    }

    /// An endless stream of update events over random profiles; event `n` carries timestamp
    /// offset `n` seconds.
    pub fn updates(&self) -> Updates {
        Updates {
            synth: self.clone(),
            rng: StdRng::seed_from_u64(self.seed.wrapping_add(1)),
            n: 0,
        }
    }
}

const FIRST: [&str; 8] = ["Ann", "Bob", "Cara", "Dan", "Eve", "Finn", "Gus", "Hal"];

fn stamp(n: u64) -> String {
    let t = chrono::DateTime::from_timestamp(1_714_000_000 + n as i64, 0).unwrap_or_default();
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn crm(p: u64, rng: &mut StdRng, n: u64) -> String {
    let first = FIRST[rng.random_range(0..FIRST.len())];
    json!({"type": "fragment", "dataset": "crm", "id": format!("c{p}"), "timestamp": stamp(n),
           "identityMap": {"email": [{"id": format!("u{p}@example.com"), "primary": true}], "crmid": [{"id": format!("{p}")}]},
           "attributes": {"person": {"name": {"firstName": first, "lastName": format!("L{p}")}},
                          "personalEmail": {"address": format!("u{p}@example.com")},
                          "loyalty": {"points": rng.random_range(0..1000)}}})
    .to_string()
}

fn web(p: u64, n: u64) -> String {
    json!({"type": "fragment", "dataset": "web", "id": format!("w{p}"), "timestamp": stamp(n),
           "identityMap": {"email": [{"id": format!("u{p}@example.com")}], "ecid": [{"id": format!("e{p}")}]},
           "attributes": {"web": {"lastPage": format!("/p/{}", n % 97)}}})
    .to_string()
}

/// See [`Synth::updates`].
pub struct Updates {
    synth: Synth,
    rng: StdRng,
    n: u64,
}

impl Iterator for Updates {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        self.n += 1;
        let p = self.rng.random_range(0..self.synth.profiles.max(1));
        let relevant = self.rng.random_bool(self.synth.relevant.clamp(0.0, 1.0));
        Some(if relevant {
            crm(p, &mut self.rng, self.n)
        } else {
            web(p, self.n)
        })
    }
}
