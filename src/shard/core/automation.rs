//! Automation rules (`shaping.rs`): a reply that matches a rule of the
//! destination's policy counts towards its trigger; when the rule fires,
//! the destination is suspended, gets other limits, or bounces, for the
//! rule's duration. While suspended nothing is sent to it: what is queued
//! waits in its queue without using attempts, what is deferred meanwhile
//! goes back to the queue instead of the retry schedule, and everything
//! goes out the moment the suspension ends (a timer), not at the next step
//! of an exponential schedule.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Core, Dest, Job};
use crate::local::Local;
use crate::shaping::{Knobs, Rule, RuleAction, Trigger};

/// A rule in force on a destination until a time.
#[derive(Debug, Clone)]
pub(crate) struct Active {
    pub since: Instant,
    pub until: Instant,
    pub rule: Arc<Rule>,
}

/// A destination's rules: their recent hits, and what is in force.
#[derive(Debug, Default)]
pub(crate) struct Automation {
    /// Per rule of the policy (same order): the times of recent matches.
    hits: Vec<VecDeque<Instant>>,
    /// Per rule of the policy: transactions deferred whole in a row (`in_a_row` rules).
    streaks: Vec<u32>,
    pub suspended: Option<Active>,
    pub overridden: Option<(Active, Box<Knobs>)>,
    pub bouncing: Option<Active>,
    /// Time spent suspended or overridden (overlaps once), in spans that
    /// ended, and since when the present one runs.
    throttled: Duration,
    throttled_from: Option<Instant>,
}

impl Automation {
    /// Counts a reply (`text`: "CODE ENHANCED TEXT") or volley's own failure
    /// (`local`: its kind; then the regex sees "KIND: reason", and only
    /// rules with `match_local` look) against `rules`; `whole` when it
    /// ended a transaction that deferred every recipient (only those count
    /// for `in_a_row` rules). The first rule that matches takes it; answers
    /// the rule if that fires.
    pub fn hit(
        &mut self,
        rules: &[Arc<Rule>],
        text: &str,
        local: Option<Local>,
        whole: bool,
        now: Instant,
    ) -> Option<Arc<Rule>> {
        if self.hits.len() < rules.len() {
            self.hits.resize_with(rules.len(), VecDeque::new);
            self.streaks.resize(rules.len(), 0);
        }
        let typed;
        let text = match local {
            Some(kind) => {
                typed = format!("{kind}: {text}");
                typed.as_str()
            }
            None => text,
        };
        let (i, rule) = rules.iter().enumerate().find(|(_, rule)| {
            (whole || !matches!(rule.trigger, Trigger::InARow(_)))
                && (local.is_none() || rule.match_local)
                && rule.regex.is_match(text)
        })?;
        if self.in_force(rule, now) {
            // Already acting on it: replies still in flight do not extend it.
            return None;
        }
        let fires = match rule.trigger {
            Trigger::Immediate => true,
            Trigger::Threshold { hits, window } => {
                let seen = &mut self.hits[i];
                seen.push_back(now);
                while seen.front().is_some_and(|t| now.duration_since(*t) > window) {
                    seen.pop_front();
                }
                let fires = seen.len() >= hits as usize;
                if fires {
                    seen.clear();
                }
                fires
            }
            // The streak is kept: after the rule's time, the next
            // transaction deferred whole fires it again.
            Trigger::InARow(n) => {
                self.streaks[i] += 1;
                self.streaks[i] >= n
            }
        };
        (fires && self.put(rule, now, now + rule.duration)).then(|| rule.clone())
    }

    /// A transaction delivered or bounced a recipient: streaks end.
    pub fn progress(&mut self) {
        self.streaks.iter_mut().for_each(|n| *n = 0);
    }

    /// Puts `rule` in force from `now` until `until`, unless a rule of the
    /// same action is in force for longer already.
    fn put(&mut self, rule: &Arc<Rule>, now: Instant, until: Instant) -> bool {
        let longer = |a: &Active| now < a.until && a.until >= until;
        let active = Active {
            since: now,
            until,
            rule: rule.clone(),
        };
        if !matches!(rule.action, RuleAction::Bounce) && self.throttled_from.is_none() {
            self.throttled_from = Some(now);
        }
        match &rule.action {
            RuleAction::Suspend if !self.suspended.as_ref().is_some_and(longer) => self.suspended = Some(active),
            RuleAction::Set(knobs) if !self.overridden.as_ref().is_some_and(|(a, _)| longer(a)) => {
                self.overridden = Some((active, knobs.clone()))
            }
            RuleAction::Bounce if !self.bouncing.as_ref().is_some_and(longer) => self.bouncing = Some(active),
            _ => return false,
        }
        true
    }

    /// Puts `rule` in force until `until` (another shard fired it), unless it is already.
    pub fn apply(&mut self, rule: &Arc<Rule>, now: Instant, until: Instant) -> bool {
        if self.in_force(rule, now) || until <= now {
            return false;
        }
        self.put(rule, now, until)
    }

    fn in_force(&self, rule: &Arc<Rule>, now: Instant) -> bool {
        let active = |a: &Active| Arc::ptr_eq(&a.rule, rule) && now < a.until;
        self.suspended.as_ref().is_some_and(active)
            || self.overridden.as_ref().is_some_and(|(a, _)| active(a))
            || self.bouncing.as_ref().is_some_and(active)
    }

    /// Lifts what ended by `now`; answers what it lifted.
    pub fn lift(&mut self, now: Instant) -> Vec<Active> {
        let mut lifted = Vec::new();
        if self.suspended.as_ref().is_some_and(|a| now >= a.until) {
            lifted.extend(self.suspended.take());
        }
        if self.overridden.as_ref().is_some_and(|(a, _)| now >= a.until) {
            lifted.extend(self.overridden.take().map(|(a, _)| a));
        }
        if self.bouncing.as_ref().is_some_and(|a| now >= a.until) {
            lifted.extend(self.bouncing.take());
        }
        if self.suspended.is_none()
            && self.overridden.is_none()
            && let Some(from) = self.throttled_from.take()
        {
            let end = lifted
                .iter()
                .filter(|a| !matches!(a.rule.action, RuleAction::Bounce))
                .map(|a| a.until)
                .max()
                .unwrap_or(now);
            self.throttled += end.saturating_duration_since(from);
        }
        lifted
    }

    /// Time spent suspended or under lowered limits, up to `now`.
    pub fn throttled(&self, now: Instant) -> Duration {
        self.throttled
            + self
                .throttled_from
                .map_or(Duration::ZERO, |f| now.saturating_duration_since(f))
    }

    /// What is in force at `now`.
    pub fn in_force_now(&self, now: Instant) -> impl Iterator<Item = &Active> {
        [
            self.suspended.as_ref(),
            self.overridden.as_ref().map(|(a, _)| a),
            self.bouncing.as_ref(),
        ]
        .into_iter()
        .flatten()
        .filter(move |a| now < a.until)
    }

    /// When the next thing in force ends.
    pub fn next_end(&self) -> Option<Instant> {
        [
            self.suspended.as_ref().map(|a| a.until),
            self.overridden.as_ref().map(|(a, _)| a.until),
            self.bouncing.as_ref().map(|a| a.until),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

impl<J: Job> Core<J> {
    /// A reply from `dest` (or volley's own failure with it, `local`) that
    /// did not deliver: counted against the destination's rules. A rule
    /// that fires takes effect at once, and a timer lifts it.
    pub(super) fn automation_hit(
        &mut self,
        dest: &Rc<Dest<J>>,
        text: &str,
        local: Option<Local>,
        whole: bool,
        now: Instant,
    ) {
        if dest.policy.rules.is_empty() {
            return;
        }
        let fired = dest
            .automation
            .borrow_mut()
            .hit(&dest.policy.rules, text, local, whole, now);
        if let Some(rule) = fired {
            self.rule_fired(dest, &rule, text, now);
        }
    }

    fn rule_fired(&mut self, dest: &Rc<Dest<J>>, rule: &Arc<Rule>, text: &str, now: Instant) {
        let until = now + rule.duration;
        let key = (dest.policy.scope.clone(), rule.name.clone(), rule.action.name());
        *self.rule_firings.entry(key).or_default() += 1;
        // The other shards carrying this destination (a spread domain) apply it too.
        self.budgets.announce(
            self.index,
            crate::shard::budget::RuleNews {
                key: Box::from(&*dest.key),
                fleet: None,
                rule: rule.name.clone(),
                until,
            },
        );
        if rule.fleet {
            self.budgets.share(crate::fleet::Outgoing {
                label: dest.label.to_string(),
                scope: dest.policy.scope.to_string(),
                rule: rule.name.clone(),
                until,
            });
        }
        tracing::info!(
            "{}: rule {} fired on \"{text}\": {} until {} from now",
            dest.label,
            rule.name,
            match &rule.action {
                RuleAction::Suspend => "suspended".to_string(),
                RuleAction::Set(_) => "limits lowered".to_string(),
                RuleAction::Bounce => "bouncing".to_string(),
            },
            humantime::format_duration(rule.duration)
        );
        self.lift_timer(dest, until);
        self.hold_queue(dest, rule);
        self.bounce_queue(dest, rule, now);
    }

    /// Rules other shards fired on destinations this shard carries too, and
    /// rules other nodes of the fleet fired on destinations of the same
    /// label and scope: in force here as well. The fleet's are kept until
    /// they end, for destinations that appear meanwhile.
    pub(super) fn apply_rule_news(&mut self, now: Instant) {
        for news in self.budgets.rule_news(self.index) {
            if news.fleet.is_some() {
                self.fleet_rules
                    .retain(|n| !(n.fleet == news.fleet && n.rule == news.rule && n.until <= news.until));
                if !self
                    .fleet_rules
                    .iter()
                    .any(|n| n.fleet == news.fleet && n.rule == news.rule)
                {
                    self.fleet_rules.push(news.clone());
                }
            }
            let dests: Vec<Rc<Dest<J>>> = match &news.fleet {
                None => self.dests.get(&*news.key).cloned().into_iter().collect(),
                Some(_) => self.dests.values().filter(|d| fleet_match(d, &news)).cloned().collect(),
            };
            for dest in dests {
                self.apply_news(&dest, &news, now);
            }
        }
        self.fleet_rules.retain(|n| n.until > now);
    }

    /// A destination just made: the fleet's rules in force for its label and scope apply to it.
    pub(super) fn fleet_rules_for(&mut self, dest: &Rc<Dest<J>>) {
        let now = self.wall.0;
        self.apply_rule_news(now);
        for news in self.fleet_rules.clone() {
            if fleet_match(dest, &news) {
                self.apply_news(dest, &news, now);
            }
        }
    }

    fn apply_news(&mut self, dest: &Rc<Dest<J>>, news: &crate::shard::budget::RuleNews, now: Instant) {
        let Some(rule) = dest.policy.rules.iter().find(|r| r.name == news.rule).cloned() else {
            return;
        };
        if news.fleet.is_some() && !rule.fleet {
            return;
        }
        if dest.automation.borrow_mut().apply(&rule, now, news.until) {
            let from = if news.fleet.is_some() {
                "another node"
            } else {
                "another shard"
            };
            tracing::debug!("{}: rule {} applied from {from}", dest.label, rule.name);
            self.lift_timer(dest, news.until);
            self.hold_queue(dest, &rule);
            self.bounce_queue(dest, &rule, now);
        }
    }

    /// A suspension took effect: what is queued for `dest` waits for its
    /// end, or expires at its `max_age` if that comes first.
    fn hold_queue(&mut self, dest: &Rc<Dest<J>>, rule: &Rule) {
        if let RuleAction::Suspend = rule.action {
            let mut first: Option<Instant> = None;
            for txn in dest.queue.borrow_mut().iter_mut() {
                txn.held = true;
                let at = txn.first_seen + txn.domain.retry().max_age;
                first = Some(first.map_or(at, |f| f.min(at)));
            }
            if let Some(at) = first {
                self.expiry_timer(dest, at);
            }
        }
    }

    /// A transaction held by `dest`'s suspension reaches `max_age` at `at`:
    /// a timer expires it then, if the suspension lasts longer.
    pub(super) fn expiry_timer(&mut self, dest: &Rc<Dest<J>>, at: Instant) {
        let until = dest.automation.borrow().suspended.as_ref().map(|a| a.until);
        if until.is_some_and(|u| at < u) {
            self.pace_timer(dest, at);
        }
    }

    /// While `dest` is suspended: what waited past its `max_age` expires
    /// now, not when the suspension ends.
    fn expire_held(&mut self, dest: &Rc<Dest<J>>, now: Instant) {
        if !dest.suspended(now) {
            return;
        }
        let queue = std::mem::take(&mut *dest.queue.borrow_mut());
        let (gone, kept): (VecDeque<_>, VecDeque<_>) = queue
            .into_iter()
            .partition(|t| t.held && now >= t.first_seen + t.domain.retry().max_age);
        let next = kept
            .iter()
            .filter(|t| t.held)
            .map(|t| t.first_seen + t.domain.retry().max_age)
            .min();
        *dest.queue.borrow_mut() = kept;
        if !gone.is_empty() {
            let reason = format!("not sent within max_age: {} was suspended", dest.label);
            for txn in gone {
                self.defer(txn, Local::Suspended, &reason, Some(dest), now);
            }
        }
        if let Some(at) = next {
            self.expiry_timer(dest, at);
        }
    }

    /// A bounce rule took effect: what is queued for `dest` bounces now.
    fn bounce_queue(&mut self, dest: &Rc<Dest<J>>, rule: &Rule, now: Instant) {
        if let RuleAction::Bounce = rule.action {
            let queued: Vec<_> = dest.queue.borrow_mut().drain(..).collect();
            for txn in queued {
                self.bounce_by_rule(txn, dest, rule, now);
            }
        }
    }

    /// What is in force on `dest` ends at `at`: a timer brings it back then.
    fn lift_timer(&mut self, dest: &Rc<Dest<J>>, at: Instant) {
        self.pace_timer(dest, at);
    }

    /// Lifts what ended on `dest` by `now` (at its timer).
    pub(super) fn lift_due(&mut self, dest: &Rc<Dest<J>>, now: Instant) {
        let mut a = dest.automation.borrow_mut();
        for done in a.lift(now) {
            tracing::info!("{}: rule {} lifted", dest.label, done.rule.name);
            let key = (dest.policy.scope.clone(), done.rule.action.name());
            *self.shaped_seconds.entry(key).or_default() += (done.until - done.since).as_secs_f64();
        }
        let end = a.next_end();
        drop(a);
        if let Some(end) = end {
            self.lift_timer(dest, end);
        }
        self.expire_held(dest, now);
    }
}

/// Whether a rule from another node is for `dest`: the same label (MX host
/// set or route) and shaping scope; its key differs (each node has its own
/// source addresses).
fn fleet_match<J>(dest: &Dest<J>, news: &crate::shard::budget::RuleNews) -> bool {
    news.fleet
        .as_ref()
        .is_some_and(|(label, scope)| *dest.label == **label && *dest.policy.scope == **scope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shaping::Shaping;

    fn rules(text: &str) -> Vec<Arc<Rule>> {
        let mut s = Shaping::default();
        s.add(text, "t.toml").unwrap();
        s.policy(&crate::config::Config::default(), "d.test", &[]).rules
    }

    #[test]
    fn a_threshold_counts_hits_within_its_window() {
        let r = rules(
            "[[default.automation]]\nregex = \"busy\"\ntrigger = { threshold = \"3/1min\" }\naction = \"suspend\"\nduration = \"10m\"\n",
        );
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut a = Automation::default();
        assert!(a.hit(&r, "451 4.7.500 Server busy", None, false, s(0)).is_none());
        assert!(a.hit(&r, "250 fine", None, false, s(1)).is_none(), "no match, no count");
        assert!(a.hit(&r, "451 4.7.500 Server busy", None, false, s(30)).is_none());
        assert!(
            a.hit(&r, "451 4.7.500 Server busy", None, false, s(70)).is_none(),
            "the first hit left the window"
        );
        assert!(
            a.hit(&r, "451 4.7.500 Server busy", None, false, s(80)).is_some(),
            "three within a minute"
        );
        assert_eq!(a.suspended.as_ref().map(|x| x.until), Some(s(680)));
        assert!(
            a.hit(&r, "451 4.7.500 Server busy", None, false, s(90)).is_none(),
            "in force: not again"
        );
        assert!(a.lift(s(679)).is_empty());
        assert_eq!(a.lift(s(680)).len(), 1);
        assert!(a.suspended.is_none());
        assert_eq!(
            a.throttled(s(900)),
            Duration::from_secs(600),
            "suspended from 80 to 680"
        );
    }

    #[test]
    fn local_failures_match_only_rules_that_ask_for_them() {
        let r = rules(
            "[[default.automation]]\nregex = \"refused\"\naction = \"suspend\"\nduration = \"1m\"\n\n[[default.automation]]\nregex = \"timed out\"\nmatch_local = true\naction = { set = { max_connections = 1 } }\nduration = \"1m\"\n",
        );
        let now = Instant::now();
        let mut a = Automation::default();
        assert!(
            a.hit(
                &r,
                "connect to x failed: Connection refused",
                Some(Local::Connect),
                false,
                now
            )
            .is_none()
        );
        let fired = a
            .hit(
                &r,
                "timed out after 300s waiting for x",
                Some(Local::Timeout),
                false,
                now,
            )
            .unwrap();
        assert!(matches!(fired.action, RuleAction::Set(_)));
        assert_eq!(a.overridden.as_ref().unwrap().1.max_connections, Some(1));
        assert!(
            a.hit(&r, "550 refused", None, false, now).is_some(),
            "a reply matches the first"
        );
    }

    #[test]
    fn an_in_a_row_rule_counts_transactions_deferred_whole_until_one_gets_through() {
        let r = rules(
            "[[default.automation]]\nname = \"busy\"\nregex = \"busy\"\ntrigger = { threshold = \"2/1min\" }\naction = { set = { max_connections = 1 } }\nduration = \"10m\"\n\n[[default.automation]]\nname = \"streak\"\nregex = \"^4\"\ntrigger = { in_a_row = 3 }\naction = \"suspend\"\nduration = \"1m\"\n",
        );
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut a = Automation::default();
        let name = |v: Option<Arc<Rule>>| v.map(|r| r.name.clone());
        assert!(a.hit(&r, "451 4.3.0 try later", None, true, s(0)).is_none());
        assert!(
            a.hit(&r, "451 4.3.0 try later", None, false, s(1)).is_none(),
            "deferred in part: not counted"
        );
        a.progress();
        assert!(a.hit(&r, "451 4.3.0 try later", None, true, s(2)).is_none());
        assert!(
            a.hit(&r, "closed: connection reset", Some(Local::Closed), true, s(3))
                .is_none(),
            "volley's own failure: not for a rule without match_local, and the streak goes on"
        );
        assert!(
            a.hit(&r, "451 4.7.500 Server busy", None, true, s(3)).is_none(),
            "a reply the first rule takes is not the streak's"
        );
        assert!(a.hit(&r, "451 4.3.0 try later", None, true, s(3)).is_none());
        assert_eq!(
            name(a.hit(&r, "451 4.3.0 try later", None, true, s(4))).as_deref(),
            Some("streak"),
            "the third since the streak began again"
        );
        assert_eq!(a.suspended.as_ref().map(|x| x.until), Some(s(64)));
        assert_eq!(
            name(a.hit(&r, "451 4.7.500 Server busy", None, true, s(5))).as_deref(),
            Some("busy")
        );
        assert!(a.hit(&r, "451 4.3.0 try later", None, true, s(6)).is_none(), "in force");
        assert_eq!(a.lift(s(64)).len(), 1);
        assert_eq!(
            a.throttled(s(64)),
            Duration::from_secs(60),
            "busy still in force since 5"
        );
        // The streak goes on: the next deferred whole suspends again at once.
        assert_eq!(
            name(a.hit(&r, "451 4.3.0 try later", None, true, s(65))).as_deref(),
            Some("streak")
        );
        assert_eq!(a.lift(s(125)).len(), 1);
        a.progress();
        assert!(
            a.hit(&r, "451 4.3.0 try later", None, true, s(126)).is_none(),
            "a delivery ended it"
        );
        assert_eq!(
            a.throttled(s(126)),
            Duration::from_secs(122),
            "one span since 4: the suspensions and the override overlap"
        );
    }
}
