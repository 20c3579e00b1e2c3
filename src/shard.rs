//! Sharding the outbox across slots: which rows belong to shard `i` of `n`
//! (a publication row filter on a hash of the record key), the names of each
//! shard's slot and publication, and telling this layout's slots from those of
//! another shard count.
//!
//! Pure: no I/O. `setup` creates the publications and slots and refuses a
//! changed count; `config` resolves the names once at start.
//!
//! One slot is decoded by one walsender. With `[shard] count = n` each shard
//! has its own publication whose row filter passes only the rows whose key
//! hashes to it, its own slot (so its own walsender) and its own relay
//! instance. A key always hashes to the same shard, so per-key order holds.

/// The most shards a layout may have.
pub const MAX_SHARDS: u32 = 256;

/// Shard `index` of `count` (`count = 1`: not sharded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    pub const SINGLE: Shard = Shard { index: 0, count: 1 };

    pub fn is_sharded(self) -> bool {
        self.count > 1
    }

    /// The name of this shard's slot or publication made from the configured
    /// base name: the base itself without sharding, else `<base>_shard<i>of<n>`
    /// (the count is part of the name, so the slots of a new count never
    /// collide with those of the old one while the layout changes).
    pub fn name(self, base: &str) -> String {
        if self.is_sharded() {
            format!("{base}_shard{}of{}", self.index, self.count)
        } else {
            base.to_string()
        }
    }

    /// Every shard of this layout.
    pub fn all(self) -> impl Iterator<Item = Shard> {
        (0..self.count).map(move |index| Shard {
            index,
            count: self.count,
        })
    }

    /// The publication row filter (without `WHERE`) for this shard, on the
    /// key column `key` (SQL, quoted). `None` without sharding.
    ///
    /// `hashtext(key) & 2147483647` is the hash with its sign bit cleared:
    /// 0 to 2^31-1 for every hash value, where `abs(hashtext(key))` raises
    /// "integer out of range" for -2^31 (and would stop the walsender, not
    /// just skip the row). `%` of a non-negative number by `n` is 0..n-1, so
    /// every key is in exactly one shard; a NULL key is in shard 0. Only
    /// built-in immutable functions and operators, as a row filter requires.
    pub fn row_filter(self, key: &str) -> Option<String> {
        self.is_sharded().then(|| {
            format!(
                "COALESCE((hashtext({key}::text) & 2147483647) % {}, 0) = {}",
                self.count, self.index
            )
        })
    }

    /// The shard of a key whose `hashtext` is `hash` (or NULL), as the row filter computes it.
    pub fn of_hash(hash: Option<i32>, count: u32) -> u32 {
        match hash {
            Some(h) => ((h & i32::MAX) as u32) % count,
            None => 0,
        }
    }

    /// The shard count of a slot named after `base` with [`Shard::name`]:
    /// 1 for `base` itself, `n` for `<base>_shard<i>of<n>`; `None` for any other name.
    pub fn layout_of(base: &str, slot: &str) -> Option<u32> {
        if slot == base {
            return Some(1);
        }
        let rest = slot.strip_prefix(base)?.strip_prefix("_shard")?;
        let (i, n) = rest.split_once("of")?;
        let (i, n): (u32, u32) = (i.parse().ok()?, n.parse().ok()?);
        (n > 1 && i < n && rest == format!("{i}of{n}")).then_some(n)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {}", self.index, self.count)
    }
}

/// Parses `OUTBOX_RELAY_SHARD_INDEX` for a layout of `count` shards: a
/// number (the index itself), or a name ending in `-<ordinal>` (a StatefulSet
/// pod name such as `outbox-relay-3`, from the downward API), whose shard is
/// the ordinal modulo `count`: with `replicas = 2 × count` every shard has two
/// pods, one streaming and one standing by.
pub fn parse_index(v: &str, count: u32) -> Result<u32, String> {
    if let Ok(i) = v.parse() {
        return Ok(i);
    }
    v.rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<u32>().ok())
        .map(|ordinal| ordinal % count.max(1))
        .ok_or_else(|| {
            format!("{v:?} is not a shard index: give a number, or a pod name ending in -<ordinal> (e.g. outbox-relay-2)")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_index_and_count_and_are_recognised() {
        let s = Shard { index: 2, count: 3 };
        assert_eq!(s.name("outbox_relay"), "outbox_relay_shard2of3");
        assert_eq!(Shard::SINGLE.name("outbox_relay"), "outbox_relay");
        assert_eq!(Shard::layout_of("outbox_relay", "outbox_relay"), Some(1));
        assert_eq!(
            Shard::layout_of("outbox_relay", "outbox_relay_shard2of3"),
            Some(3)
        );
        for other in [
            "outbox_relay2",
            "outbox_relay_shard3of3",
            "outbox_relay_shard0of1",
            "outbox_relay_shard01of3",
            "outbox_relay_shard1of3x",
            "other",
        ] {
            assert_eq!(Shard::layout_of("outbox_relay", other), None, "{other}");
        }
    }

    #[test]
    fn every_hash_value_including_the_extremes_is_in_exactly_one_shard() {
        for count in [2, 3, 4, 7, 256] {
            for h in [i32::MIN, i32::MIN + 1, -1, 0, 1, i32::MAX - 1, i32::MAX] {
                let shard = Shard::of_hash(Some(h), count);
                assert!(shard < count, "{h} -> {shard} of {count}");
            }
            assert_eq!(Shard::of_hash(None, count), 0, "NULL keys go to shard 0");
        }
        assert_eq!(Shard::of_hash(Some(i32::MIN), 3), 0);
        assert_eq!(Shard::of_hash(Some(-1), 2), 1);
        assert_eq!(
            Shard { index: 1, count: 2 }
                .row_filter("\"aggregate_id\"")
                .unwrap(),
            "COALESCE((hashtext(\"aggregate_id\"::text) & 2147483647) % 2, 0) = 1"
        );
        assert_eq!(Shard::SINGLE.row_filter("k"), None);
    }

    #[test]
    fn the_index_comes_from_a_number_or_a_pod_name() {
        assert_eq!(parse_index("2", 4), Ok(2));
        assert_eq!(parse_index("outbox-relay-1", 2), Ok(1));
        assert_eq!(
            parse_index("outbox-relay-3", 2),
            Ok(1),
            "the standby of shard 1"
        );
        assert_eq!(parse_index("outbox-relay-11", 4), Ok(3));
        assert!(parse_index("outbox-relay", 2)
            .unwrap_err()
            .contains("pod name"));
    }
}
