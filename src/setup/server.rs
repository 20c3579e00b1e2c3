//! What the connected PostgreSQL server is and can do: its version (from
//! `server_version_num`, never guessed from behaviour), whether it is a primary
//! or a standby in recovery, and the settings that decide whether a failover
//! or decoding on a standby can lose events.
//!
//! Read once per SQL connection by `setup` and `admin`; pure decisions on the
//! result ([`Server::failover_slot`], [`Server::check_standby`]) so they are
//! table-tested without a server. It does not create anything (see `setup`).
//!
//! What differs between the supported versions and how it is handled:
//! - pgoutput `proto_version` stays 1 on every version: 2 (14+), 3 (15+) and
//!   4 (16+) add only the streaming of in-progress transactions, two-phase
//!   commit and parallel apply, which the relay does not ask for (it produces
//!   a transaction once PostgreSQL decoded its commit). The `messages` option
//!   exists from 14 on.
//! - `pg_replication_slots`: `conflicting` from 16, `failover`, `synced`,
//!   `invalidation_reason` and `inactive_since` from 17 ([`Server::slot_columns`]).
//! - Slot creation: the five-argument `pg_create_logical_replication_slot`
//!   with `failover` from 17; `ALTER_REPLICATION_SLOT` from 17.
//! - Decoding on a standby from 16; the server reports `in_hot_standby` at
//!   connection start from 14, which `transport` uses for `target_session_attrs`.

use tokio_postgres::Client;

use crate::config::FailoverSlot;
use crate::setup::{q, SetupError};

/// The oldest supported major version: 14 (pgoutput's `messages` option,
/// `in_hot_standby` reported at connection start).
pub const MIN_VERSION_NUM: i32 = 140000;

/// [`Server::slot_columns`] for a server none of them exist on.
pub const NO_SLOT_COLUMNS: &str = "NULL::bool, NULL::bool, NULL::bool, NULL::text, NULL::text";

/// The server as the relay needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `server_version_num`, e.g. 170010.
    pub version_num: i32,
    /// `pg_is_in_recovery()`: a standby (hot standby, or not yet promoted).
    pub in_recovery: bool,
    /// `hot_standby_feedback` (matters when decoding on a standby).
    pub hot_standby_feedback: bool,
    /// `synchronized_standby_slots` (17+; `None` below): the physical slots
    /// of the standbys a failover slot must not get ahead of.
    pub synchronized_standby_slots: Option<String>,
    /// `sync_replication_slots` (17+; on a standby: failover slots are copied here).
    pub sync_replication_slots: Option<bool>,
    /// Physical slots on this server that a walsender streams from: a standby
    /// streaming through `primary_slot_name` holds one. Inactive ones (a
    /// retired standby, a stopped pg_receivewal) are left out: naming such a
    /// slot in `synchronized_standby_slots` would hold the relay back.
    pub physical_slots: Vec<String>,
}

impl Server {
    /// Reads the version, the recovery state and the settings, in one query.
    pub async fn read(client: &Client) -> Result<Server, SetupError> {
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int4, pg_is_in_recovery(),
                        current_setting('hot_standby_feedback')::bool,
                        current_setting('synchronized_standby_slots', true),
                        current_setting('sync_replication_slots', true),
                        ARRAY(SELECT slot_name::text FROM pg_replication_slots
                              WHERE slot_type = 'physical' AND active ORDER BY 1)",
                &[],
            )
            .await
            .map_err(q("reading the server's version and settings"))?;
        Ok(Server {
            version_num: row.get(0),
            in_recovery: row.get(1),
            hot_standby_feedback: row.get(2),
            synchronized_standby_slots: row.get(3),
            sync_replication_slots: row.get::<_, Option<String>>(4).map(|v| v == "on"),
            physical_slots: row.get(5),
        })
    }

    /// The major version (14, 15, ...).
    pub fn major(&self) -> i32 {
        self.version_num / 10000
    }

    /// `Err` below PostgreSQL 14, naming the version found.
    pub fn check_supported(&self) -> Result<(), SetupError> {
        if self.version_num < MIN_VERSION_NUM {
            return Err(SetupError::TooOld {
                version_num: self.version_num,
            });
        }
        Ok(())
    }

    /// Everything about this server `cfg` cannot work with: the version, a
    /// standby that cannot decode, `failover_slot = "on"` before 17, shards
    /// before 15 (row filters). Checked before anything is created.
    pub fn check(&self, cfg: &crate::config::Config) -> Result<(), SetupError> {
        self.check_supported()?;
        self.check_standby()?;
        self.failover_slot(cfg.postgres.failover_slot)?;
        if cfg.shard.count > 1 && self.version_num < 150000 {
            return Err(SetupError::ShardingNeeds15 {
                count: cfg.shard.count,
                version_num: self.version_num,
            });
        }
        Ok(())
    }

    /// Failover slots (`pg_create_logical_replication_slot(.., failover)`,
    /// `ALTER_REPLICATION_SLOT`, `pg_replication_slots.failover/synced`): 17+.
    pub fn has_failover_slots(&self) -> bool {
        self.version_num >= 170000
    }

    /// Logical decoding on a hot standby: 16+.
    pub fn has_standby_decoding(&self) -> bool {
        self.version_num >= 160000
    }

    /// Whether the relay's slot is (to be) a failover slot, per
    /// `postgres.failover_slot`; `on` below 17 is an error.
    pub fn failover_slot(&self, setting: FailoverSlot) -> Result<bool, SetupError> {
        match setting {
            FailoverSlot::Off => Ok(false),
            FailoverSlot::Auto => Ok(self.has_failover_slots()),
            FailoverSlot::On if self.has_failover_slots() => Ok(true),
            FailoverSlot::On => Err(SetupError::FailoverNeeds17 {
                version_num: self.version_num,
            }),
        }
    }

    /// On a standby: decoding needs 16+ and `hot_standby_feedback` (without it
    /// the primary's vacuum removes rows the slot still needs, and the slot is
    /// invalidated). `Ok` on a primary.
    pub fn check_standby(&self) -> Result<(), SetupError> {
        if !self.in_recovery {
            return Ok(());
        }
        if !self.has_standby_decoding() {
            return Err(SetupError::StandbyNeeds16 {
                version_num: self.version_num,
            });
        }
        if !self.hot_standby_feedback {
            return Err(SetupError::NoHotStandbyFeedback);
        }
        Ok(())
    }

    /// Whether a failover of this primary keeps the relay's slot and loses
    /// nothing: `Ok` says why it does, `Err` why not and what to change.
    /// `failover` is whether the slot is (to be) a failover slot.
    pub fn failover_safety(&self, slot: &str, failover: bool) -> Result<String, String> {
        if self.in_recovery {
            return Ok("this server is a standby".into());
        }
        if !self.has_failover_slots() {
            return Err(format!("PostgreSQL {} keeps logical slots on the primary only: after a failover the promoted standby has no slot {slot:?} and the relay stops with the range of events at risk (README, \"Failover\"); PostgreSQL 17 and later keep it with a failover slot", self.major()));
        }
        if !failover {
            return Err(format!("slot {slot:?} is not a failover slot: a promoted standby will not have it; set postgres.failover_slot = \"auto\" or \"on\""));
        }
        let named: Vec<&str> = self
            .synchronized_standby_slots
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if self.physical_slots.is_empty() {
            return Err("no standby streams through a physical slot (primary_slot_name): a failover slot is only copied to a standby that uses one and runs with sync_replication_slots = on and hot_standby_feedback = on".into());
        }
        let missing: Vec<&str> = self
            .physical_slots
            .iter()
            .map(String::as_str)
            .filter(|p| !named.contains(p))
            .collect();
        if named.is_empty() {
            return Err(format!("synchronized_standby_slots is empty, so the relay may receive changes a standby has not received yet, and after that standby is promoted they are gone; run ALTER SYSTEM SET synchronized_standby_slots = '{}'; SELECT pg_reload_conf(); on the primary", self.physical_slots.join(",")));
        }
        if !missing.is_empty() {
            return Err(format!("synchronized_standby_slots ({}) does not name the physical slot(s) {}: a standby using one of them may lack changes the relay already received, so do not promote it, or add them: ALTER SYSTEM SET synchronized_standby_slots = '{}'; SELECT pg_reload_conf();", named.join(","), missing.join(", "), self.physical_slots.join(",")));
        }
        Ok(format!(
            "failover slot; synchronized_standby_slots = {}",
            named.join(",")
        ))
    }

    /// The column list of `pg_replication_slots` the relay reads, with `NULL`
    /// for the columns this version does not have: `failover`, `synced`,
    /// `conflicting`, `invalidation_reason`, `inactive_since`.
    pub fn slot_columns(&self) -> &'static str {
        if self.version_num >= 170000 {
            "failover, synced, conflicting, invalidation_reason, inactive_since::text"
        } else if self.version_num >= 160000 {
            "NULL::bool, NULL::bool, conflicting, NULL::text, NULL::text"
        } else {
            NO_SLOT_COLUMNS
        }
    }

    /// `version_num` as people write it: `17.10`, `9.6.24` style is not needed (>= 10).
    pub fn version(&self) -> String {
        version_text(self.version_num)
    }
}

/// `170010` as `17.10`.
pub fn version_text(version_num: i32) -> String {
    if version_num >= 100000 {
        format!("{}.{}", version_num / 10000, version_num % 10000)
    } else {
        format!(
            "{}.{}.{}",
            version_num / 10000,
            version_num / 100 % 100,
            version_num % 100
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(version_num: i32, in_recovery: bool, feedback: bool) -> Server {
        Server {
            version_num,
            in_recovery,
            hot_standby_feedback: feedback,
            synchronized_standby_slots: None,
            sync_replication_slots: None,
            physical_slots: Vec::new(),
        }
    }

    #[test]
    fn failover_is_safe_only_with_a_failover_slot_held_back_for_every_standby() {
        let mut s = server(170010, false, false);
        assert!(server(160014, false, false)
            .failover_safety("s", false)
            .unwrap_err()
            .contains("primary only"));
        assert!(s
            .failover_safety("s", false)
            .unwrap_err()
            .contains("not a failover slot"));
        assert!(s
            .failover_safety("s", true)
            .unwrap_err()
            .contains("physical slot"));
        s.physical_slots = vec!["standby1".into(), "standby2".into()];
        let e = s.failover_safety("s", true).unwrap_err();
        assert!(
            e.contains("is empty") && e.contains("'standby1,standby2'"),
            "{e}"
        );
        s.synchronized_standby_slots = Some("standby1".into());
        assert!(s
            .failover_safety("s", true)
            .unwrap_err()
            .contains("standby2"));
        s.synchronized_standby_slots = Some("standby1, standby2".into());
        assert!(s.failover_safety("s", true).is_ok());
        assert!(server(160014, true, true)
            .failover_safety("s", false)
            .is_ok());
    }

    #[test]
    fn versions_below_14_are_refused_with_the_version_found() {
        let err = server(130015, false, false).check_supported().unwrap_err();
        assert!(err.to_string().contains("13.15"), "{err}");
        assert!(err.to_string().contains("14"), "{err}");
        for v in [140000, 150018, 160014, 170010, 180004] {
            assert!(server(v, false, false).check_supported().is_ok(), "{v}");
        }
        assert_eq!(version_text(170010), "17.10");
        assert_eq!(version_text(140022), "14.22");
    }

    #[test]
    fn failover_slots_follow_the_setting_and_the_version() {
        use FailoverSlot::*;
        let table = [
            (160014, Auto, Some(false)),
            (170010, Auto, Some(true)),
            (180004, Auto, Some(true)),
            (170010, Off, Some(false)),
            (150018, Off, Some(false)),
            (170010, On, Some(true)),
            (160014, On, None),
            (140022, On, None),
        ];
        for (v, setting, want) in table {
            let got = server(v, false, false).failover_slot(setting);
            match want {
                Some(w) => assert_eq!(got.unwrap(), w, "{v} {setting:?}"),
                None => {
                    let e = got.unwrap_err().to_string();
                    assert!(e.contains("failover_slot") && e.contains("17"), "{e}");
                }
            }
        }
    }

    #[test]
    fn a_standby_needs_16_and_hot_standby_feedback() {
        assert!(server(150018, false, false).check_standby().is_ok());
        let e = server(150018, true, true).check_standby().unwrap_err();
        assert!(e.to_string().contains("16"), "{e}");
        let e = server(160014, true, false).check_standby().unwrap_err();
        assert!(e.to_string().contains("hot_standby_feedback"), "{e}");
        assert!(server(170010, true, true).check_standby().is_ok());
    }

    #[test]
    fn slot_columns_exist_only_from_their_version() {
        assert!(server(140022, false, false)
            .slot_columns()
            .starts_with("NULL::bool, NULL::bool, NULL::bool"));
        assert!(server(160014, false, false)
            .slot_columns()
            .contains(", conflicting,"));
        assert!(server(170010, false, false)
            .slot_columns()
            .starts_with("failover, synced"));
    }
}
