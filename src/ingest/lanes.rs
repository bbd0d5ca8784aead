//! Where ingest is in one spool file: the lead (the first line no pass has
//! read) and, for each shard — or domain on a shard — that had no room when
//! the lead went by, the line to read again from. Offsets only: what was
//! passed over is read again from the map, never copied, so memory stays
//! flat however far a slow shard falls behind.
//!
//! Every recipient belongs to exactly one lane: its domain's lane on its
//! shard if there is one, else its shard's lane. A lane owns its recipients
//! from its cursor onward; behind the cursor they have been sent. A lane
//! opened for a domain takes over the domain's recipients from where the
//! shard's lane stands (or the lead), so nothing is sent twice or skipped.

use foldhash::{HashMap, HashMapExt};

use crate::spool::LineCursor;

/// Domain lanes one file may have at once; a full domain past them waits
/// with its shard (it is sent with the shard's other recipients).
pub const MAX_DOMAIN_LANES: usize = 64;

/// A lane, borrowed: the shard, and the lower-cased domain for a domain lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneRef<'a> {
    pub shard: usize,
    pub domain: Option<&'a str>,
}

/// A lane, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneKey {
    pub shard: usize,
    pub domain: Option<Box<str>>,
}

impl LaneKey {
    pub fn as_ref(&self) -> LaneRef<'_> {
        LaneRef {
            shard: self.shard,
            domain: self.domain.as_deref(),
        }
    }
}

impl LaneRef<'_> {
    pub fn to_key(self) -> LaneKey {
        LaneKey {
            shard: self.shard,
            domain: self.domain.map(Box::from),
        }
    }
}

pub struct Lanes {
    /// Per shard: the line its lane reads again from (`None`: caught up with the lead).
    shards: Vec<Option<LineCursor>>,
    /// Per shard, its domain lanes (lower-cased name → cursor as above).
    domains: Vec<HashMap<Box<str>, Option<LineCursor>>>,
    domain_lanes: usize,
    /// A domain lane was opened (behind) since `pass_over` last said so.
    opened: bool,
}

impl Lanes {
    pub fn new(shards: usize) -> Lanes {
        Lanes {
            shards: vec![None; shards],
            domains: (0..shards).map(|_| HashMap::new()).collect(),
            domain_lanes: 0,
            opened: false,
        }
    }

    /// The lane of recipients of `domain` (lower-cased) on `shard`. When the
    /// shard has said the domain is `full` and it has no lane yet, one is
    /// opened, starting where the shard's lane stands or at `lead`.
    pub fn lane_of<'d>(&mut self, shard: usize, domain: &'d str, full: bool, lead: LineCursor) -> LaneRef<'d> {
        let own = LaneRef {
            shard,
            domain: Some(domain),
        };
        if self.domain_lanes > 0 && self.domains[shard].contains_key(domain) {
            return own;
        }
        if full && self.domain_lanes < MAX_DOMAIN_LANES {
            let from = self.shards[shard].unwrap_or(lead);
            self.domains[shard].insert(Box::from(domain), Some(from));
            self.domain_lanes += 1;
            self.opened = true;
            return own;
        }
        LaneRef { shard, domain: None }
    }

    fn cursor_mut(&mut self, lane: LaneRef<'_>) -> Option<&mut Option<LineCursor>> {
        match lane.domain {
            None => self.shards.get_mut(lane.shard),
            Some(d) => self.domains[lane.shard].get_mut(d),
        }
    }

    /// Where `lane` reads again from; `None` when it is caught up (or gone).
    pub fn cursor(&self, lane: LaneRef<'_>) -> Option<LineCursor> {
        match lane.domain {
            None => self.shards[lane.shard],
            Some(d) => self.domains[lane.shard].get(d).copied().flatten(),
        }
    }

    pub fn exists(&self, lane: LaneRef<'_>) -> bool {
        lane.domain.is_none_or(|d| self.domains[lane.shard].contains_key(d))
    }

    /// The lane's recipients from `at` on are not sent yet (kept if it is
    /// behind already). Whether it has just fallen behind (or a domain lane
    /// was just opened behind for it).
    pub fn pass_over(&mut self, lane: LaneRef<'_>, at: LineCursor) -> bool {
        match self.cursor_mut(lane) {
            Some(c @ None) => {
                *c = Some(at);
                true
            }
            _ => std::mem::take(&mut self.opened),
        }
    }

    /// The lane has sent everything before `at` (its reread moves on).
    pub fn advance(&mut self, lane: LaneRef<'_>, at: LineCursor) {
        if let Some(c) = self.cursor_mut(lane) {
            *c = Some(at);
        }
    }

    /// The lane has caught up with the lead.
    pub fn caught_up(&mut self, lane: LaneRef<'_>) {
        if let Some(c) = self.cursor_mut(lane) {
            *c = None;
        }
    }

    /// The lanes that are behind, shard lanes first.
    pub fn behind(&self) -> Vec<LaneKey> {
        let shards = (0..self.shards.len())
            .filter(|&s| self.shards[s].is_some())
            .map(|shard| LaneKey { shard, domain: None });
        let domains = self.domains.iter().enumerate().flat_map(|(shard, m)| {
            m.iter().filter(|(_, c)| c.is_some()).map(move |(d, _)| LaneKey {
                shard,
                domain: Some(d.clone()),
            })
        });
        shards.chain(domains).collect()
    }

    pub fn all_caught_up(&self) -> bool {
        self.shards.iter().all(Option::is_none) && self.domains.iter().all(|m| m.values().all(Option::is_none))
    }

    /// Closes domain lanes that are caught up, whose shard's lane is caught up
    /// too, and whose domain is no longer full: their recipients go back to
    /// the shard's lane with nothing owed.
    pub fn tidy(&mut self, full: impl Fn(usize, &str) -> bool) {
        if self.domain_lanes == 0 {
            return;
        }
        for (shard, m) in self.domains.iter_mut().enumerate() {
            if self.shards[shard].is_some() {
                continue;
            }
            m.retain(|d, c| c.is_some() || full(shard, d));
        }
        self.domain_lanes = self.domains.iter().map(HashMap::len).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(pos: usize) -> LineCursor {
        LineCursor {
            pos,
            line_no: pos as u32,
        }
    }

    #[test]
    fn a_domain_lane_starts_where_its_shard_lane_stands() {
        let mut l = Lanes::new(2);
        let shard0 = LaneRef { shard: 0, domain: None };
        l.pass_over(shard0, at(10));
        l.pass_over(shard0, at(20));
        assert_eq!(l.cursor(shard0), Some(at(10)), "the first line passed over is kept");
        let lane = l.lane_of(0, "slow.test", true, at(50));
        assert_eq!(lane.domain, Some("slow.test"));
        assert_eq!(
            l.cursor(lane),
            Some(at(10)),
            "what the shard lane owes of the domain moves with it"
        );
        let other = l.lane_of(1, "slow.test", true, at(50));
        assert_eq!(l.cursor(other), Some(at(50)), "a caught-up shard: from the lead");
        assert_eq!(l.lane_of(0, "fast.test", false, at(50)), shard0);
    }

    #[test]
    fn a_domain_lane_closes_only_when_nothing_is_owed() {
        let mut l = Lanes::new(1);
        let lane = l.lane_of(0, "d.test", true, at(5));
        let shard0 = LaneRef { shard: 0, domain: None };
        l.tidy(|_, _| false);
        assert!(l.exists(lane), "behind: it stays");
        l.caught_up(lane);
        l.pass_over(shard0, at(9));
        l.tidy(|_, _| false);
        assert!(
            l.exists(lane),
            "its shard's lane is behind: closing would hand it lines it skipped"
        );
        l.caught_up(shard0);
        l.tidy(|_, _| true);
        assert!(l.exists(lane), "still full");
        l.tidy(|_, _| false);
        assert!(!l.exists(lane));
        assert!(l.all_caught_up());
        assert_eq!(l.lane_of(0, "d.test", false, at(9)), shard0);
    }

    #[test]
    fn domain_lanes_are_bounded() {
        let mut l = Lanes::new(1);
        for i in 0..MAX_DOMAIN_LANES {
            let name = format!("d{i}.test");
            assert!(l.lane_of(0, &name, true, at(0)).domain.is_some());
        }
        assert_eq!(l.lane_of(0, "one-more.test", true, at(0)).domain, None);
        assert_eq!(l.behind().len(), MAX_DOMAIN_LANES);
    }
}
