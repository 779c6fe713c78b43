//! Stable indices for a configuration that changes: the dataflow's state refers to merge
//! policies, audiences, destinations and mapped paths by index, so an index, once given, keeps
//! its meaning for the life of the data directory.
//!
//! Indices are given in order of first appearance and never reused. A deleted object leaves a
//! `removed` entry in the plan. An object that comes back under the same id keeps its index
//! when it means the same thing to the state (a policy with the same stitching, an audience of
//! the same policy); otherwise it gets a new one, and starts with no state (its uploads and
//! statuses under the old index are not its own).
//!
//! The layout is a function of the sequence of configurations it has seen: the write-ahead log
//! replays the same sequence after a restart, so the same indices come back.

use streamdest_operators::plan::{
    AttributeMerge, AudienceIdx, AudienceKind, AudiencePlan, DestinationIdx, DestinationPlan, Plan,
    PlanChange, PolicyIdx, PolicyPlan, Stitching,
};

use crate::config::Config;

/// Too many objects were created over the data directory's life for 16-bit indices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("more than 65,535 {0} have been created in this data directory")]
pub struct LayoutFull(&'static str);

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    policies: Vec<(String, Stitching)>,
    audiences: Vec<(String, PolicyIdx)>,
    destinations: Vec<String>,
    mapped_paths: Vec<String>,
}

fn slot<K: PartialEq>(list: &mut Vec<K>, key: K, what: &'static str) -> Result<u16, LayoutFull> {
    if let Some(i) = list.iter().position(|k| *k == key) {
        return Ok(i as u16);
    }
    let i = u16::try_from(list.len()).map_err(|_| LayoutFull(what))?;
    list.push(key);
    Ok(i)
}

fn stitching_of(policy: &crate::config::MergePolicy) -> Stitching {
    policy.plan().stitching
}

impl Layout {
    /// The index `config`'s destination `id` has (or gets).
    pub fn destination(&mut self, id: &str) -> Result<DestinationIdx, LayoutFull> {
        slot(&mut self.destinations, id.to_owned(), "destinations")
    }

    /// The index of audience `id` of `config` (given one if new); `None` when `config` has no
    /// such audience.
    pub fn audience(
        &mut self,
        config: &Config,
        id: &str,
    ) -> Result<Option<AudienceIdx>, LayoutFull> {
        let Some(audience) = config.audience(id) else {
            return Ok(None);
        };
        let Some(policy) = config.merge_policy(&audience.merge_policy) else {
            return Ok(None);
        };
        let policy = slot(
            &mut self.policies,
            (policy.id.clone(), stitching_of(policy)),
            "merge policies",
        )?;
        slot(&mut self.audiences, (id.to_owned(), policy), "audiences").map(Some)
    }

    /// The dynamic plan of `config`, with `change` (see `streamdest_operators::plan`).
    /// Missing timestamps are `now_ms`: fill them in the configuration first so that they do
    /// not move from one plan to the next.
    pub fn plan(
        &mut self,
        config: &Config,
        now_ms: i64,
        change: Option<PlanChange>,
    ) -> Result<Plan, LayoutFull> {
        let mut policy_of = Vec::new();
        for p in &config.merge_policies {
            let idx = slot(
                &mut self.policies,
                (p.id.clone(), stitching_of(p)),
                "merge policies",
            )?;
            policy_of.push(idx);
        }
        let mut audience_of = Vec::new();
        for a in &config.audiences {
            audience_of.push(self.audience(config, &a.id)?);
        }
        let mut destination_of = Vec::new();
        for d in &config.destinations {
            destination_of.push(self.destination(&d.id)?);
            for path in &d.attributes {
                if !self.mapped_paths.contains(path) {
                    self.mapped_paths.push(path.clone());
                }
            }
        }

        let mut policies: Vec<PolicyPlan> = self
            .policies
            .iter()
            .map(|(id, stitching)| PolicyPlan {
                id: id.clone(),
                merge: AttributeMerge::TimestampOrdered,
                stitching: *stitching,
                removed: true,
            })
            .collect();
        for (p, idx) in config.merge_policies.iter().zip(&policy_of) {
            policies[*idx as usize] = p.plan();
        }

        let mut audiences: Vec<AudiencePlan> = self
            .audiences
            .iter()
            .map(|(id, policy)| AudiencePlan {
                id: id.clone(),
                name: id.clone(),
                policy: *policy,
                kind: AudienceKind::Upload,
                created_at: 0,
                updated_at: 0,
                removed: true,
            })
            .collect();
        for (a, idx) in config.audiences.iter().zip(&audience_of) {
            if let Some(idx) = idx {
                let policy = audiences[*idx as usize].policy;
                audiences[*idx as usize] = a.plan(policy, now_ms);
            }
        }

        let mut destinations: Vec<DestinationPlan> = self
            .destinations
            .iter()
            .map(|id| DestinationPlan {
                id: id.clone(),
                include_segment_names: false,
                include_segment_timestamps: false,
                mappings: Vec::new(),
                attributes: Vec::new(),
            })
            .collect();
        let audience_index = |id: &str| {
            config
                .audiences
                .iter()
                .position(|a| a.id == id)
                .and_then(|i| audience_of[i])
        };
        for (d, idx) in config.destinations.iter().zip(&destination_of) {
            destinations[*idx as usize] = d.plan(audience_index, now_ms);
        }

        Ok(Plan {
            policies,
            audiences,
            destinations,
            mapped_paths: self.mapped_paths.clone(),
            dynamic: true,
            change,
            ..Plan::default()
        }
        .finish())
    }

    /// How many paths have ever been mapped.
    pub fn mapped_paths(&self) -> usize {
        self.mapped_paths.len()
    }

    /// Destination ids by index (removed ones included).
    pub fn destination_ids(&self) -> &[String] {
        &self.destinations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_json_str(text).expect("valid config")
    }

    const TWO: &str = r#"{
      "mergePolicies": [{"id": "p", "attributeMerge": "timestampOrdered", "identityStitching": "privateGraph"}],
      "audiences": [
        {"id": "a", "mergePolicy": "p", "source": "upload"},
        {"id": "b", "mergePolicy": "p", "source": "upload"}],
      "destinations": [{"id": "d", "name": "d", "endpoint": "http://127.0.0.1:1/x",
        "audiences": [{"id": "b"}], "attributes": ["person.name"]}]
    }"#;

    #[test]
    fn indices_survive_deletion_and_reordering() {
        let mut layout = Layout::default();
        let first = layout.plan(&config(TWO), 0, None).expect("plan");
        assert_eq!(first.audiences[1].id, "b");
        assert_eq!(first.destinations[0].mappings[0].audience, 1);

        // `a` deleted: `b` keeps index 1, `a` stays as a removed entry.
        let mut without_a = config(TWO);
        without_a.remove_audience("a").expect("not mapped");
        let second = layout.plan(&without_a, 0, None).expect("plan");
        assert_eq!(second.audiences.len(), 2);
        assert!(second.audiences[0].removed);
        assert!(!second.audiences[1].removed);
        assert_eq!(second.destinations[0].mappings[0].audience, 1);
        assert!(second.audiences_of(0).all(|(i, _)| i == 1));

        // `a` back: index 0 again (same policy).
        let third = layout.plan(&config(TWO), 0, None).expect("plan");
        assert!(!third.audiences[0].removed);
        assert_eq!(third.audiences.len(), 2);
    }

    #[test]
    fn a_policy_that_changes_stitching_gets_a_new_index() {
        let mut layout = Layout::default();
        layout.plan(&config(TWO), 0, None).expect("plan");
        let none = TWO.replace("\"privateGraph\"", "\"none\"");
        let plan = layout.plan(&config(&none), 0, None).expect("plan");
        assert_eq!(plan.policies.len(), 2);
        assert!(plan.policies[0].removed);
        assert_eq!(plan.policies[1].stitching, Stitching::None);
        // Its audiences follow it to new indices; the old ones are removed.
        assert_eq!(plan.audiences.len(), 4);
        assert!(plan.audiences[0].removed && plan.audiences[1].removed);
        assert_eq!(plan.audiences[3].id, "b");
        assert_eq!(plan.audiences[3].policy, 1);
        assert_eq!(plan.destinations[0].mappings[0].audience, 3);
    }

    #[test]
    fn mapped_paths_are_only_appended() {
        let mut layout = Layout::default();
        layout.plan(&config(TWO), 0, None).expect("plan");
        let other = TWO.replace("\"person.name\"", "\"personalEmail.address\"");
        let plan = layout.plan(&config(&other), 0, None).expect("plan");
        assert_eq!(
            plan.mapped_paths,
            vec!["person.name", "personalEmail.address"]
        );
        assert!(plan.dynamic);
    }
}
