//! `[shard]`: which shard of the outbox this instance relays, and the names
//! of its slot and publication, resolved once when the config is loaded.

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::shard::{parse_index, Shard, MAX_SHARDS};

/// Environment variable that overrides `shard.index` (a number, or a
/// StatefulSet pod name ending in `-<n>`).
pub const ENV_SHARD_INDEX: &str = "OUTBOX_RELAY_SHARD_INDEX";
/// Environment variable that overrides `shard.count`.
pub const ENV_SHARD_COUNT: &str = "OUTBOX_RELAY_SHARD_COUNT";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardConfig {
    /// Number of shards (publications, slots and relay instances) the outbox
    /// is split into by a hash of the record key; PostgreSQL 15+ for more
    /// than 1. Default 1 (not sharded). `OUTBOX_RELAY_SHARD_COUNT` overrides.
    pub count: u32,
    /// This instance's shard, 0 to count-1. Default 0.
    /// `OUTBOX_RELAY_SHARD_INDEX` overrides: a number, or a StatefulSet pod
    /// name ending in -N, whose shard is N modulo count (so replicas = 2 ×
    /// count gives every shard a hot standby).
    pub index: u32,
    /// `postgres.slot` as configured (the shards' slots are named after it).
    #[serde(skip)]
    pub base_slot: String,
    /// `postgres.publication` as configured.
    #[serde(skip)]
    pub base_publication: String,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            count: 1,
            index: 0,
            base_slot: String::new(),
            base_publication: String::new(),
        }
    }
}

impl ShardConfig {
    /// This instance's shard.
    pub fn shard(&self) -> Shard {
        Shard {
            index: self.index,
            count: self.count,
        }
    }

    /// Applies the environment overrides and checks the values.
    pub(super) fn resolve(
        &mut self,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(v) = env(ENV_SHARD_COUNT).filter(|v| !v.is_empty()) {
            self.count = v.parse().map_err(|_| {
                invalid(
                    "shard.count",
                    format!("{ENV_SHARD_COUNT}={v:?} is not a number"),
                )
            })?;
        }
        if let Some(v) = env(ENV_SHARD_INDEX).filter(|v| !v.is_empty()) {
            self.index = parse_index(&v, self.count)
                .map_err(|m| invalid("shard.index", format!("{ENV_SHARD_INDEX}={m}")))?;
        }
        if !(1..=MAX_SHARDS).contains(&self.count) {
            return Err(invalid(
                "shard.count",
                format!("{} is outside 1..={MAX_SHARDS}", self.count),
            ));
        }
        if self.index >= self.count {
            return Err(invalid(
                "shard.index",
                format!(
                    "{} is not a shard of {}: give 0 to {} (or set {ENV_SHARD_INDEX})",
                    self.index,
                    self.count,
                    self.count - 1
                ),
            ));
        }
        Ok(())
    }
}

impl super::Config {
    /// This config for shard `shard` of the same layout: its slot and publication names.
    pub fn for_shard(&self, shard: Shard) -> super::Config {
        let mut c = self.clone();
        c.shard.index = shard.index;
        c.postgres.slot = shard.name(&c.shard.base_slot);
        c.postgres.publication = shard.name(&c.shard.base_publication);
        c
    }
}
