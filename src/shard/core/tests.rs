//! The core driven by hand: a fake clock, connections that are only
//! numbers, replies made up. No sockets, no sleeps.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::config::{Retry, RouteSpec};
use crate::dns::{MxAnswer, MxHost};
use crate::outcome::Outcome;
use crate::smtp::{Reply, TxnReport, TxnTiming};

struct TestJob {
    line: u32,
    rcpts: Vec<(String, u32)>,
    wire: WireMessage,
}

impl Job for TestJob {
    fn rcpt_count(&self) -> usize {
        self.rcpts.len()
    }
    fn rcpt(&self, i: usize) -> &str {
        &self.rcpts[i].0
    }
    fn reverse_path(&self) -> &str {
        "news@sender.test"
    }
    fn message(&self) -> &WireMessage {
        &self.wire
    }
    fn key(&self, i: usize) -> RcptKey {
        RcptKey {
            file: 0,
            line: self.line,
            idx: self.rcpts[i].1,
        }
    }
    fn id(&self) -> JobId<'_> {
        JobId::Line("test.jsonl", self.line)
    }
    fn keep(&mut self, keep: &[usize]) {
        self.rcpts = keep.iter().map(|&i| self.rcpts[i].clone()).collect();
    }
    fn split_off(&mut self, at: usize) -> TestJob {
        TestJob {
            line: self.line,
            rcpts: self.rcpts.split_off(at),
            wire: self.wire.clone(),
        }
    }
    fn take(&mut self, which: &[usize]) -> TestJob {
        let all = std::mem::take(&mut self.rcpts);
        let (taken, kept) = all.into_iter().enumerate().partition(|(i, _)| which.contains(i));
        let strip = |v: Vec<(usize, _)>| v.into_iter().map(|(_, r)| r).collect();
        self.rcpts = strip(kept);
        TestJob {
            line: self.line,
            rcpts: strip(taken),
            wire: self.wire.clone(),
        }
    }
    type Parked = TestParked;
    fn park(self, first_seen: Instant, out: &mut dyn FnMut(TestParked)) {
        for rcpt in self.rcpts {
            out(TestParked {
                line: self.line,
                rcpt,
                wire: self.wire.clone(),
                first_seen,
            });
        }
    }
    fn unpark(parked: Vec<TestParked>) -> TestJob {
        TestJob {
            line: parked[0].line,
            wire: parked[0].wire.clone(),
            rcpts: parked.into_iter().map(|p| p.rcpt).collect(),
        }
    }
}

struct TestParked {
    line: u32,
    rcpt: (String, u32),
    wire: WireMessage,
    first_seen: Instant,
}

impl Parked for TestParked {
    fn first_seen(&self) -> Instant {
        self.first_seen
    }
    fn same_job(&self, o: &Self) -> bool {
        self.line == o.line
    }
}

/// A core, its clock, and what it asked for so far.
struct Rig {
    core: Core<TestJob>,
    t0: Instant,
    now: Instant,
    line: u32,
}

/// The configuration the tests start from: retries without jitter.
fn config() -> Config {
    Config {
        retry: Retry {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            max_age: Duration::from_secs(100),
            jitter: 0.0,
        },
        ..Config::default()
    }
}

impl Rig {
    /// `route`: where `routed.test` goes (the other domains need MX lookups).
    fn new(cfg: Config) -> Rig {
        Rig::with_board(cfg, Arc::new(Budgets::new(1)), 0)
    }

    /// With a shaping file over none (not the built-in one).
    fn shaped(cfg: Config, shaping: &str) -> Rig {
        let mut s = Shaping::default();
        s.add(shaping, "test.toml").unwrap();
        Rig::build(cfg, Arc::new(Budgets::new(1)), 0, s)
    }

    /// Two shards sharing one connection board, with `shaping`.
    fn pair(shaping: &str) -> (Rig, Rig) {
        let board = Arc::new(Budgets::new(2));
        let mk = |i| {
            let mut s = Shaping::default();
            s.add(shaping, "t.toml").unwrap();
            Rig::build(config(), board.clone(), i, s)
        };
        (mk(0), mk(1))
    }

    fn with_board(cfg: Config, budgets: Arc<Budgets>, index: usize) -> Rig {
        Rig::build(cfg, budgets, index, Shaping::default())
    }

    fn build(cfg: Config, budgets: Arc<Budgets>, index: usize, shaping: Shaping) -> Rig {
        let mut specs = BTreeMap::new();
        specs.insert("routed.test".to_string(), RouteSpec::Target("127.0.0.1:2525".into()));
        let t0 = Instant::now();
        let core = Core::new(
            CoreParams {
                index,
                cfg: Arc::new(cfg),
                routes: Arc::new(Routes::resolve(&specs).unwrap()),
                resolver: true,
                classifier: Arc::new(Classifier::default()),
                budgets,
                shaping: Arc::new(shaping),
                log: true,
                metrics: true,
            },
            t0,
            SystemTime::UNIX_EPOCH,
        );
        Rig {
            core,
            t0,
            now: t0,
            line: 0,
        }
    }

    fn at(&mut self, secs: f64) {
        self.now = self.t0 + Duration::from_secs_f64(secs);
        self.core.turn(self.now, SystemTime::UNIX_EPOCH + (self.now - self.t0));
    }

    /// A job of `n` recipients at `domain`, accepted now.
    fn send(&mut self, domain: &str, n: u32) {
        self.line += 1;
        let job = TestJob {
            line: self.line,
            rcpts: (0..n).map(|i| (format!("r{i}@{domain}"), i)).collect(),
            wire: WireMessage::prepare(b"Subject: t\r\n\r\nhello\r\n"),
        };
        self.core.accept(job, self.now, self.now);
    }

    fn actions(&mut self) -> Vec<Action<TestJob>> {
        std::iter::from_fn(|| self.core.poll_action()).collect()
    }

    /// The destinations it asked to open connections to, in order.
    fn opened(&mut self) -> Vec<Rc<Dest<TestJob>>> {
        self.actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Open(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    /// The outcomes recorded since last asked: (line, idx, outcome, reply text).
    fn outcomes(&mut self) -> Vec<(u32, u32, Outcome, String)> {
        let Some(batch) = self.core.take_outcomes() else {
            return Vec::new();
        };
        let text = String::from_utf8(batch.log).unwrap();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let outcome = match v["outcome"].as_str().unwrap() {
                    "delivered" => Outcome::Delivered,
                    "bounced" => Outcome::Bounced,
                    "deferred" => Outcome::Deferred,
                    "expired" => Outcome::Expired,
                    o => panic!("outcome {o}"),
                };
                let line = v["id"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap();
                let rcpt = v["rcpt"].as_str().unwrap();
                let idx = rcpt[1..rcpt.find('@').unwrap()].parse().unwrap();
                (line, idx, outcome, v["reply"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }

    /// A connection that got ready, as a real one would report it.
    fn ready(&mut self, dest: &Rc<Dest<TestJob>>) {
        let now = self.now;
        self.core.connection_ready(dest, now);
    }

    /// Takes the next transaction for `dest` and answers every command with `code`.
    fn answer(&mut self, dest: &Rc<Dest<TestJob>>, code: u16) -> bool {
        let Some(txn) = self.core.next_txn(dest, self.now) else {
            return false;
        };
        let n = txn.job.rcpt_count();
        let reply = |c: u16| Some(Reply::new(c, if c < 300 { "2.0.0 ok" } else { "4.7.0 try later" }));
        let report = TxnReport {
            txn,
            mail: reply(250),
            rcpts: smallvec::smallvec![reply(code); n],
            data: if code < 300 { reply(354) } else { None },
            dot: if code < 300 { reply(250) } else { None },
            failure: None,
            permanent: false,
            timing: TxnTiming::default(),
            chunked: false,
        };
        let host = dest.hosts.borrow()[0].clone();
        self.core.complete(Box::new(report), dest, &host, None, self.now);
        true
    }

    /// Takes the next transaction for `dest` and refuses its MAIL with `code text`.
    fn refuse_mail(&mut self, dest: &Rc<Dest<TestJob>>, code: u16, text: &str) {
        let txn = self.core.next_txn(dest, self.now).expect("a transaction to refuse");
        let report = TxnReport {
            txn,
            mail: Some(Reply::new(code, text)),
            rcpts: smallvec::smallvec![None],
            data: None,
            dot: None,
            failure: None,
            permanent: false,
            timing: TxnTiming::default(),
            chunked: false,
        };
        let host = dest.hosts.borrow()[0].clone();
        self.core.complete(Box::new(report), dest, &host, None, self.now);
    }

    /// A connection that ends (after it got ready).
    fn close(&mut self, dest: &Rc<Dest<TestJob>>) {
        self.core.session_ended(dest, true, false);
        self.core.connection_closed(dest, None, self.now);
    }

    /// A connection that never got ready with any host.
    fn fail(&mut self, dest: &Rc<Dest<TestJob>>, reason: &str) {
        self.core.session_ended(dest, false, false);
        let failed = SetupFailure {
            reason,
            auth: false,
            reply: None,
            kind: crate::local::Local::Connect,
        };
        self.core.connection_closed(dest, Some(failed), self.now);
    }

    fn timeout(&mut self) {
        let now = self.now;
        self.core.handle_timeout(now);
    }
}

fn mx(host: &str, ttl: u64) -> MxAnswer {
    MxAnswer::Hosts {
        hosts: vec![MxHost {
            name: host.into(),
            preference: 10,
            addrs: vec!["127.0.0.9".parse().unwrap()],
        }],
        ttl: Duration::from_secs(ttl),
    }
}

#[test]
fn connections_ramp_up_one_at_a_time_until_one_is_ready_then_to_the_cap() {
    let mut r = Rig::new(Config {
        max_connections_per_destination: 4,
        ..config()
    });
    for _ in 0..10 {
        r.send("routed.test", 1);
    }
    let first = r.opened();
    assert_eq!(first.len(), 1, "until one connection is ready, one attempt at a time");
    let dest = first[0].clone();
    assert_eq!(&*dest.label, "127.0.0.1:2525");
    r.ready(&dest);
    assert_eq!(r.opened().len(), 1, "a ready connection lets one more open");
    r.ready(&dest);
    r.send("routed.test", 1);
    r.send("routed.test", 1);
    assert_eq!(r.opened().len(), 2, "the queue wants more: up to the cap");
    r.send("routed.test", 1);
    assert!(r.opened().is_empty(), "never past max_connections_per_destination");
    assert_eq!(r.core.connections_open(), 4);
    // Parked connections are woken before another opens.
    while r.answer(&dest, 250) {}
    dest.parked.set(4);
    r.send("routed.test", 1);
    let actions = r.actions();
    assert!(
        matches!(actions.as_slice(), [Action::Wake(_)]),
        "one parked connection woken"
    );
    let delivered = r.outcomes().iter().filter(|o| o.2 == Outcome::Delivered).count();
    assert_eq!(delivered, 13);
}

#[test]
fn a_deferred_recipient_is_retried_on_the_schedule_and_expires_at_max_age() {
    let mut r = Rig::new(config());
    r.send("routed.test", 2);
    let dest = r.opened().remove(0);
    r.ready(&dest);
    assert!(r.answer(&dest, 451));
    let o = r.outcomes();
    assert_eq!(o.len(), 2);
    assert!(o.iter().all(|o| o.2 == Outcome::Deferred));
    assert_eq!(
        r.core.next_timeout().map(|t| t <= r.t0 + Duration::from_secs(1)),
        Some(true)
    );
    // Not due before its delay (1 s, then 2, 4, … capped at 60).
    let mut due = 0.0;
    let mut delay = 1.0;
    let mut attempts = 1;
    loop {
        r.at(due + delay - 0.01);
        r.timeout();
        assert!(!dest.has_work(), "attempt {attempts}: not due before {delay}s");
        due += delay;
        r.at(due.min(100.0));
        r.timeout();
        assert!(dest.has_work(), "attempt {attempts}: due after {delay}s");
        assert!(r.answer(&dest, 451));
        attempts += 1;
        let o = r.outcomes();
        if due >= 100.0 {
            assert!(o.iter().all(|o| o.2 == Outcome::Expired), "{o:?}");
            break;
        }
        assert!(o.iter().all(|o| o.2 == Outcome::Deferred), "{o:?}");
        delay = (delay * 2.0f64).min(60.0);
        if due + delay > 100.0 {
            // The last retry comes at max_age, not after it.
            delay = 100.0 - due;
        }
    }
    assert_eq!(attempts, 8, "1+2+4+8+16+32 s, then one at max_age");
    r.at(1000.0);
    r.timeout();
    assert!(!dest.has_work(), "an expired recipient is not retried");
    assert_eq!(r.core.snapshot(false, r.now).held, 0);
}

#[test]
fn only_the_deferred_recipients_of_a_transaction_are_retried() {
    let mut r = Rig::new(config());
    r.send("routed.test", 3);
    let dest = r.opened().remove(0);
    r.ready(&dest);
    let txn = r.core.next_txn(&dest, r.now).unwrap();
    let ok = Some(Reply::new(250, "ok"));
    let report = TxnReport {
        txn,
        mail: ok.clone(),
        rcpts: smallvec::smallvec![
            ok.clone(),
            Some(Reply::new(452, "4.2.2 full")),
            Some(Reply::new(550, "5.1.1 no")),
        ],
        data: Some(Reply::new(354, "go")),
        dot: ok,
        failure: None,
        permanent: false,
        timing: TxnTiming::default(),
        chunked: false,
    };
    let host = dest.hosts.borrow()[0].clone();
    r.core.complete(Box::new(report), &dest, &host, None, r.now);
    let o: Vec<(u32, Outcome)> = r.outcomes().into_iter().map(|o| (o.1, o.2)).collect();
    assert_eq!(
        o,
        [(0, Outcome::Delivered), (1, Outcome::Deferred), (2, Outcome::Bounced)]
    );
    r.at(1.0);
    r.timeout();
    let retried = r.core.next_txn(&dest, r.now).unwrap();
    assert_eq!(retried.job.rcpts, [("r1@routed.test".to_string(), 1)]);
    assert_eq!(retried.attempt, 2);
}

#[test]
fn a_destination_deferred_whole_again_and_again_is_suspended_until_one_gets_through() {
    // The built-in rule, with a smaller count.
    let mut r = Rig::shaped(
        config(),
        "[[default.automation]]\nname = \"deferred-in-a-row\"\nregex = '^4'\ntrigger = { in_a_row = 3 }\naction = \"suspend\"\nduration = \"10s\"\n",
    );
    let dest = {
        r.send("routed.test", 1);
        r.opened().remove(0)
    };
    r.ready(&dest);
    for _ in 1..5 {
        r.send("routed.test", 1);
    }
    for _ in 0..2 {
        assert!(r.answer(&dest, 421));
    }
    assert!(!dest.suspended(r.now), "two in a row");
    // A transaction that delivers ends the streak.
    assert!(r.answer(&dest, 250));
    for _ in 0..2 {
        assert!(r.answer(&dest, 421));
    }
    assert!(!dest.suspended(r.now), "two in a row again");
    r.send("routed.test", 1);
    assert!(r.answer(&dest, 421));
    assert!(dest.suspended(r.now), "the third in a row suspends it");
    let log = String::from_utf8(r.core.take_outcomes().unwrap().log).unwrap();
    assert!(
        log.lines()
            .last()
            .is_some_and(|l| l.contains("\"outcome\":\"deferred\"") && l.contains("\"rule\":\"deferred-in-a-row\"")),
        "the deferral that tripped it names the rule: {log}"
    );
    // Its recipients wait in the queue without using attempts; other domains go on.
    r.send("routed.test", 1);
    assert!(r.core.next_txn(&dest, r.now).is_none());
    assert!(r.outcomes().is_empty(), "new work waits without a record");
    r.actions();
    r.send("other.test", 1);
    assert!(matches!(r.actions().as_slice(), [Action::Resolve(d)] if d.name() == "other.test"));
    // After its time it is tried again; deferred whole again, it is suspended at once.
    r.at(10.0);
    r.timeout();
    assert!(!dest.suspended(r.now));
    assert!(r.answer(&dest, 421));
    assert!(dest.suspended(r.now), "the streak went on");
    // One delivered after the next time ends it.
    r.at(20.0);
    r.timeout();
    assert!(r.answer(&dest, 250));
    assert!(r.answer(&dest, 421));
    assert!(!dest.suspended(r.now), "the streak is over");
}

#[test]
fn a_destination_that_cannot_be_reached_is_suspended_and_comes_back() {
    let mut r = Rig::new(config());
    r.send("routed.test", 1);
    r.send("routed.test", 1);
    let dest = r.opened().remove(0);
    r.fail(&dest, "connect to 127.0.0.1:2525 failed: refused");
    let o = r.outcomes();
    assert_eq!(o.len(), 2, "what was queued is deferred");
    assert!(o.iter().all(|o| o.2 == Outcome::Deferred && o.3.contains("refused")));
    assert!(r.opened().is_empty(), "no new attempt while it is down");
    r.at(0.5);
    r.send("routed.test", 1);
    let o = r.outcomes();
    assert!(
        o[0].3.starts_with("delivery to 127.0.0.1:2525 temporarily suspended"),
        "{}",
        o[0].3
    );
    assert!(r.opened().is_empty());
    // Its first backoff is the first retry delay: then the retries bring a new attempt.
    r.at(1.0);
    r.timeout();
    let again = r.opened();
    assert_eq!(again.len(), 1, "one probing attempt once it is due");
    r.ready(&dest);
    while r.answer(&dest, 250) {}
    r.at(1.5);
    r.timeout();
    while r.answer(&dest, 250) {}
    let delivered = r.outcomes().iter().filter(|o| o.2 == Outcome::Delivered).count();
    assert_eq!(delivered, 3, "everything deferred while it was down is delivered");
    // A second failure while one connection works does not suspend it.
    r.fail(&dest, "a second connection failed");
    r.send("routed.test", 1);
    assert!(dest.has_work(), "a destination with a live connection is not down");
}

#[test]
fn a_domain_is_looked_up_once_its_answer_is_kept_for_its_ttl_and_a_failure_defers() {
    let mut r = Rig::new(config());
    r.send("mx.test", 1);
    r.send("MX.Test", 2);
    let actions = r.actions();
    assert_eq!(actions.len(), 1, "one lookup for both (domains are case-insensitive)");
    let Action::Resolve(domain) = &actions[0] else {
        panic!("a lookup first")
    };
    let domain = domain.clone();
    r.core.resolved(&domain, mx("mail.mx.test", 300), r.now);
    let opened = r.opened();
    assert_eq!(opened.len(), 1);
    let dest = opened[0].clone();
    assert_eq!(&*dest.label, "mail.mx.test:25");
    r.ready(&dest);
    r.at(299.0);
    r.send("mx.test", 1);
    assert!(!r.actions().iter().any(|a| matches!(a, Action::Resolve(_))), "cached");
    assert_eq!(
        r.core.snapshot(false, r.now).dns_cache_hits,
        1,
        "what waited for the lookup is not a cache hit"
    );
    r.at(300.0);
    r.send("mx.test", 1);
    assert!(
        matches!(r.actions().as_slice(), [Action::Resolve(_)]),
        "the TTL ran out"
    );
    r.core.resolved(&domain, MxAnswer::Temporary("SERVFAIL".into()), r.now);
    let o = r.outcomes();
    assert_eq!((o.len(), o[0].2, o[0].3.as_str()), (1, Outcome::Deferred, "SERVFAIL"));
    // Null MX: bounced, and remembered for negative_ttl.
    r.send("null.test", 1);
    let Some(Action::Resolve(null)) = r.actions().pop() else {
        panic!("a lookup")
    };
    r.core.resolved(&null, MxAnswer::NullMx, r.now);
    r.send("null.test", 1);
    assert!(r.actions().is_empty(), "kept for negative_ttl");
    let o = r.outcomes();
    assert_eq!(o.len(), 2);
    assert!(o.iter().all(|o| o.2 == Outcome::Bounced && o.3.contains("null MX")));
}

#[test]
fn intake_bounds_fill_a_domain_then_the_shard_and_credit_comes_back_as_work_finishes() {
    let mut r = Rig::new(Config {
        max_queued_recipients_per_shard: 400,
        max_queued_recipients_per_domain: 100,
        ..config()
    });
    let mut credits = Vec::new();
    for _ in 0..10 {
        r.send("routed.test", 10);
    }
    r.core.credits(true, &mut credits);
    assert!(
        credits
            .iter()
            .any(|c| matches!(c, Credit::DomainFull { domain, .. } if &**domain == "routed.test")),
        "100 queued fill the domain"
    );
    assert!(credits.iter().any(|c| matches!(c, Credit::Room { received: 100, .. })));
    for _ in 0..30 {
        r.send("other.test", 10);
    }
    assert!(!r.core.has_room(), "400 held fill the shard");
    credits.clear();
    r.core.credits(true, &mut credits);
    assert!(
        credits.iter().any(|c| matches!(
            c,
            Credit::Room {
                allowed: 400,
                received: 400,
                ..
            }
        )),
        "{credits:?}"
    );
    let dest = r.opened().remove(0);
    r.ready(&dest);
    for _ in 0..5 {
        assert!(r.answer(&dest, 250));
    }
    credits.clear();
    r.core.credits(true, &mut credits);
    assert!(
        credits
            .iter()
            .any(|c| matches!(c, Credit::DomainOpen { domain, .. } if &**domain == "routed.test")),
        "half of the domain's bound: open again"
    );
    assert!(credits.iter().any(|c| matches!(c, Credit::Room { allowed: 450, .. })));
    assert!(r.core.has_room());
}

#[test]
fn no_transaction_starts_while_the_collector_is_behind() {
    let mut r = Rig::new(config());
    r.send("routed.test", 1);
    let dest = r.opened().remove(0);
    r.ready(&dest);
    r.core.collector(true, 0);
    assert!(
        r.core.next_txn(&dest, r.now).is_none(),
        "its queue refused the last batch"
    );
    r.core.collector(false, 0);
    assert!(r.answer(&dest, 250));
    for _ in 0..=MAX_UNRECORDED_PER_SHARD {
        r.send("routed.test", 1);
    }
    while r.answer(&dest, 250) {}
    assert!(
        dest.has_work(),
        "past MAX_UNRECORDED_PER_SHARD records not yet written, it waits"
    );
    r.core.collector(false, MAX_UNRECORDED_PER_SHARD);
    assert!(r.answer(&dest, 250));
}

#[test]
fn stopping_wakes_parked_connections_and_opens_no_more() {
    let mut r = Rig::new(Config {
        max_connections_per_destination: 1,
        ..config()
    });
    r.send("routed.test", 1);
    let dest = r.opened().remove(0);
    r.ready(&dest);
    assert!(r.answer(&dest, 250));
    r.actions();
    r.core.stop();
    assert!(matches!(r.actions().as_slice(), [Action::WakeAll(_)]));
    assert!(r.core.stopping());
    r.send("routed.test", 5);
    r.close(&dest);
    assert!(r.opened().is_empty(), "no connection opens once stopping");
    assert_eq!(r.core.connections_open(), 0);
}

#[test]
fn two_shards_share_one_cap_in_proportion_to_their_work() {
    let board = Arc::new(Budgets::new(2));
    let cfg = Config {
        max_connections_per_destination: 4,
        ..config()
    };
    let mut a = Rig::with_board(cfg.clone(), board.clone(), 0);
    let mut b = Rig::with_board(cfg, board, 1);
    for _ in 0..40 {
        a.send("routed.test", 1);
    }
    let da = a.opened().remove(0);
    a.ready(&da);
    for _ in 0..3 {
        a.at(0.0);
        a.ready(&da);
    }
    a.opened();
    assert_eq!(a.core.connections_open(), 4, "alone, shard 0 takes the whole cap");
    for _ in 0..40 {
        b.send("routed.test", 1);
    }
    assert!(b.opened().is_empty(), "the cap is taken");
    // Both rebalance: each gets half, and shard 0's extra connections leave.
    a.at(1.0);
    a.timeout();
    b.at(1.0);
    b.timeout();
    a.at(2.0);
    a.timeout();
    let leaving = (0..4).filter(|_| a.core.should_leave(&da)).count();
    assert_eq!(leaving, 2, "shard 0 gives two connections back");
    a.core.session_ended(&da, true, true);
    a.core.connection_closed(&da, None, a.now);
    a.core.session_ended(&da, true, true);
    a.core.connection_closed(&da, None, a.now);
    b.at(3.0);
    b.timeout();
    let opened = b.opened();
    assert_eq!(opened.len(), 1, "shard 1 probes first");
    b.ready(&opened[0]);
    assert_eq!(b.opened().len(), 1);
    assert_eq!(a.core.connections_open() + b.core.connections_open(), 4);
}

#[test]
fn a_destination_over_its_message_rate_waits_for_its_next_slot_and_holds_up_nothing_else() {
    let mut r = Rig::shaped(config(), "[\"routed.test\"]\nmax_message_rate = \"10/s\"\n");
    for _ in 0..3 {
        r.send("routed.test", 1);
    }
    let dest = r.opened().remove(0);
    r.ready(&dest);
    r.actions();
    assert!(r.answer(&dest, 250), "the first slot is free");
    assert!(!r.answer(&dest, 250), "the next is 100 ms away");
    assert_eq!(r.core.next_paced(), Some(r.t0 + Duration::from_millis(100)));
    // Another domain's destination is not paced.
    r.send("mx.test", 1);
    let Some(Action::Resolve(d)) = r.actions().pop() else {
        panic!("a lookup")
    };
    r.core.resolved(&d, mx("mail.mx.test", 300), r.now);
    let other = r.opened().remove(0);
    r.ready(&other);
    assert!(r.answer(&other, 250));
    r.at(0.099);
    r.timeout();
    assert!(!r.core.work_now(&dest, r.now));
    dest.parked.set(1);
    r.at(0.1);
    r.timeout();
    assert!(
        r.actions()
            .iter()
            .any(|a| matches!(a, Action::Wake(d) if Rc::ptr_eq(d, &dest))),
        "its slot wakes a parked connection"
    );
    assert!(r.core.work_now(&dest, r.now));
    assert!(r.answer(&dest, 250));
    assert!(!r.answer(&dest, 250));
    r.at(0.2);
    assert!(r.answer(&dest, 250));
    assert!(!dest.has_work());
}

#[test]
fn shaping_sets_a_destinations_connections_and_recipients_per_transaction() {
    let mut r = Rig::shaped(
        config(),
        "[\"routed.test\"]\nmax_connections = 2\nmax_rcpts_per_txn = 3\nmax_connection_rate = \"1/s\"\n",
    );
    r.send("routed.test", 7);
    let dest = r.opened().remove(0);
    assert_eq!(dest.cap(), 2);
    let sizes: Vec<usize> = dest.queue.borrow().iter().map(|t| t.job.rcpt_count()).collect();
    assert_eq!(sizes, [3, 3, 1], "split to the destination's max_rcpts_per_txn");
    r.ready(&dest);
    assert!(
        r.opened().is_empty(),
        "max_connection_rate: the next connection is a second away"
    );
    r.at(1.0);
    r.timeout();
    assert_eq!(r.opened().len(), 1);
    r.ready(&dest);
    r.send("routed.test", 7);
    r.at(2.0);
    r.timeout();
    assert!(r.opened().is_empty(), "max_connections = 2");
    while r.answer(&dest, 250) {}
    let delivered: Vec<u32> = r.outcomes().iter().map(|o| o.1).collect();
    assert_eq!(delivered.len(), 14);
}

#[test]
fn a_shared_destinations_rate_is_divided_as_its_connections_are() {
    let (mut a, mut b) = Rig::pair("[\"routed.test\"]\nmax_connections = 4\nmax_message_rate = \"100/s\"\n");
    for _ in 0..50 {
        a.send("routed.test", 1);
        b.send("routed.test", 1);
    }
    let da = a.opened().remove(0);
    a.ready(&da);
    a.opened();
    let db = b.opened();
    for r in [&mut a, &mut b] {
        r.at(0.05);
        r.timeout();
    }
    let db = match db.first() {
        Some(d) => d.clone(),
        None => b.opened().remove(0),
    };
    b.ready(&db);
    // Each takes a slot; the next one is as far as its share of the rate says.
    let mut gaps = Vec::new();
    for (r, d) in [(&mut a, &da), (&mut b, &db)] {
        assert!(r.answer(d, 250));
        assert!(!r.answer(d, 250));
        gaps.push(r.core.next_paced().unwrap() - r.now);
    }
    let total: f64 = gaps.iter().map(|g| 1.0 / g.as_secs_f64()).sum();
    assert!(
        gaps.iter().all(|g| *g > Duration::from_millis(10)),
        "neither has the whole rate: {gaps:?}"
    );
    assert!(total <= 100.0 + 1e-3, "together at most 100/s: {total} ({gaps:?})");
}

#[test]
fn a_suspension_holds_the_queue_without_using_attempts_and_ends_exactly_on_time() {
    let mut r = Rig::shaped(
        config(),
        "[[\"routed.test\".automation]]\nname = \"tss04\"\nregex = '\\[TSS04\\]'\naction = \"suspend\"\nduration = \"60s\"\n",
    );
    for _ in 0..3 {
        r.send("routed.test", 1);
    }
    let dest = r.opened().remove(0);
    r.ready(&dest);
    r.actions();
    r.refuse_mail(
        &dest,
        421,
        "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
    );
    assert!(dest.suspended(r.now));
    let log = String::from_utf8(r.core.take_outcomes().unwrap().log).unwrap();
    assert_eq!(log.lines().count(), 1, "the attempt that drew it is logged");
    assert!(
        log.contains("\"outcome\":\"deferred\"") && log.contains("\"rule\":\"tss04\""),
        "a deferral that waits for a suspension names its rule: {log}"
    );
    assert_eq!(
        dest.queue.borrow().len(),
        3,
        "it waits in the queue, not on the retry schedule"
    );
    assert!(
        r.core.next_txn(&dest, r.now).is_none(),
        "nothing is sent while suspended"
    );
    // New work for it waits too, without an attempt or a record.
    r.send("routed.test", 1);
    assert_eq!(dest.queue.borrow().len(), 4);
    assert!(r.outcomes().is_empty());
    assert!(r.opened().is_empty());
    let snap = r.core.snapshot(false, r.now);
    assert_eq!(snap.active_rules.len(), 1, "/status lists it");
    assert_eq!(
        (snap.active_rules[0].rule.as_str(), snap.active_rules[0].action),
        ("tss04", "suspend")
    );
    assert_eq!(
        snap.rule_firings,
        [(("routed.test".to_string(), "tss04".to_string(), "suspend"), 1)]
    );
    r.at(60.0 - 0.001);
    r.timeout();
    assert!(r.core.next_txn(&dest, r.now).is_none());
    r.at(60.0);
    r.timeout();
    assert!(!dest.suspended(r.now), "lifted at its end");
    let attempts: Vec<u32> = std::iter::from_fn(|| r.core.next_txn(&dest, r.now))
        .map(|t| t.attempt)
        .collect();
    assert_eq!(attempts, [2, 1, 1, 1], "only the one that was tried used an attempt");
    let snap = r.core.snapshot(false, r.now);
    assert!(snap.active_rules.is_empty());
    assert_eq!(
        snap.shaped_seconds,
        [(("routed.test".to_string(), "suspend"), 60.0)],
        "the time it spent suspended"
    );
    // Per domain too (a domain with a label of its own), and it stays.
    r.at(100.0);
    let snap = r.core.snapshot(true, r.now);
    let d = snap.domains.iter().find(|d| d.name == "routed.test").unwrap();
    assert_eq!(d.gauges.throttled_seconds, 60.0);
}

#[test]
fn an_override_lowers_the_limits_for_its_duration_and_is_lifted() {
    let mut r = Rig::shaped(
        Config {
            max_connections_per_destination: 10,
            ..config()
        },
        "[[default.automation]]\nregex = 'Server busy'\ntrigger = { threshold = \"2/1min\" }\naction = { set = { max_connections = 1, max_message_rate = \"1/s\", max_rcpts_per_txn = 2, pipeline_window = 1 } }\nduration = \"10m\"\n",
    );
    for _ in 0..10 {
        r.send("routed.test", 1);
    }
    let dest = r.opened().remove(0);
    r.ready(&dest);
    r.ready(&dest);
    assert_eq!(dest.cap(), 10);
    let busy = |r: &mut Rig, dest: &Rc<Dest<TestJob>>| {
        r.refuse_mail(
            dest,
            451,
            "4.7.500 Server busy. Please try again later from [192.0.2.1].",
        )
    };
    busy(&mut r, &dest);
    assert_eq!(dest.cap(), 10, "one hit of two");
    busy(&mut r, &dest);
    assert_eq!(dest.cap(), 1, "fired: one connection");
    let limits = r.core.snapshot(false, r.now).limits;
    assert!(
        limits.contains(&(("default".to_string(), "max_connections"), 1.0)),
        "{limits:?}"
    );
    assert!(
        limits.contains(&(("default".to_string(), "max_message_rate"), 1.0)),
        "{limits:?}"
    );
    assert_eq!(dest.message_rate(), Some("1/s".parse().unwrap()));
    assert_eq!(dest.pipeline_window(), 1, "for connections opened while it is in force");
    assert_eq!(dest.pipeline_window_max(), 1, "and it does not grow past the rule's");
    let queued = dest.queue.borrow().len();
    r.send("routed.test", 5);
    assert_eq!(
        dest.queue.borrow().len(),
        queued + 3,
        "five recipients in transactions of two"
    );
    assert!(r.core.should_leave(&dest), "connections over the new cap leave");
    assert!(r.answer(&dest, 250));
    assert!(!r.answer(&dest, 250), "one a second");
    r.at(600.0);
    r.timeout();
    assert_eq!(dest.cap(), 10, "lifted after its duration");
    assert_eq!(dest.message_rate(), None);
    assert_eq!(
        (dest.rcpts_per_txn(), dest.pipeline_window(), dest.pipeline_window_max()),
        (
            dest.policy.max_rcpts_per_txn,
            dest.policy.pipeline_window,
            dest.policy.pipeline_window_max
        )
    );
    assert!(dest.policy.pipeline_window_max > dest.policy.pipeline_window);
    assert!(r.answer(&dest, 250));
    assert!(r.answer(&dest, 250));
}

#[test]
fn a_connection_told_there_is_work_finds_it_even_before_its_shard_has_a_part_of_the_rate() {
    let (mut a, mut b) = Rig::pair("[\"routed.test\"]\nmax_connections = 2\nmax_message_rate = \"100/s\"\n");
    a.send("routed.test", 1);
    a.send("routed.test", 1);
    let da = a.opened().remove(0);
    a.ready(&da);
    a.opened();
    // Shard 0 holds the whole rate; shard 1 gets a connection slot only once 0 lets one go.
    b.send("routed.test", 1);
    assert!(b.opened().is_empty());
    a.core.session_ended(&da, true, false);
    a.core.connection_closed(&da, None, a.now);
    b.at(0.001);
    b.timeout();
    let db = b.opened().remove(0);
    b.ready(&db);
    for _ in 0..3 {
        let told = b.core.work_now(&db, b.now);
        let found = b.core.next_txn(&db, b.now);
        assert_eq!(told, found.is_some(), "work_now and next_txn agree");
        if let Some(t) = found {
            db.queue.borrow_mut().push_front(t);
            break;
        }
        b.at(b.now.duration_since(b.t0).as_secs_f64() + 0.05);
        a.at(b.now.duration_since(a.t0).as_secs_f64());
        a.timeout();
        b.timeout();
    }
}

#[test]
fn a_rule_one_shard_fires_is_in_force_on_the_others_that_carry_the_destination() {
    let (mut a, mut b) = Rig::pair(
        "[[\"routed.test\".automation]]\nname = \"tss04\"\nregex = 'TSS04'\naction = \"suspend\"\nduration = \"60s\"\n",
    );
    for r in [&mut a, &mut b] {
        r.send("routed.test", 1);
        r.send("routed.test", 1);
    }
    let da = a.opened().remove(0);
    let db = b.opened().remove(0);
    a.ready(&da);
    b.ready(&db);
    a.refuse_mail(&da, 421, "4.7.0 [TSS04] Messages temporarily deferred");
    assert!(da.suspended(a.now));
    assert!(!db.suspended(b.now), "not before shard 1 looks");
    b.at(0.05);
    b.timeout();
    assert!(db.suspended(b.now), "shard 1 applies it at its next look");
    assert!(b.core.next_txn(&db, b.now).is_none());
    b.at(60.0);
    b.timeout();
    assert!(!db.suspended(b.now), "and lifts it at the same end");
    assert!(b.core.next_txn(&db, b.now).is_some());
}

#[test]
fn recipients_held_by_a_suspension_expire_at_their_max_age_not_when_it_ends() {
    let mut r = Rig::shaped(
        config(),
        "[[\"routed.test\".automation]]\nregex = 'TSS04'\naction = \"suspend\"\nduration = \"200s\"\n",
    );
    for _ in 0..3 {
        r.send("routed.test", 1);
    }
    let dest = r.opened().remove(0);
    r.ready(&dest);
    r.refuse_mail(&dest, 421, "4.7.0 [TSS04] Messages temporarily deferred");
    r.outcomes();
    // One more joins the queue later: it expires later.
    r.at(50.0);
    r.send("routed.test", 1);
    r.timeout();
    assert!(r.outcomes().is_empty());
    r.at(100.0 - 0.001);
    r.timeout();
    assert!(r.outcomes().is_empty(), "not before max_age (100 s)");
    r.at(100.0);
    r.timeout();
    let o = r.outcomes();
    assert_eq!(o.len(), 3, "the three of the start expire at 100 s");
    assert!(
        o.iter()
            .all(|o| o.2 == Outcome::Expired && o.3.contains("was suspended")),
        "{o:?}"
    );
    assert!(dest.suspended(r.now), "still suspended");
    r.at(150.0);
    r.timeout();
    assert_eq!(r.outcomes().len(), 1, "the later one at 150 s");
    assert_eq!(r.core.snapshot(false, r.now).held, 0);
    r.at(200.0);
    r.timeout();
    assert!(!dest.suspended(r.now));
    assert!(r.core.next_txn(&dest, r.now).is_none());
}

/// A destination's queue gives back the room a burst took once it drains.
#[test]
fn a_drained_queue_gives_back_its_room() {
    let mut r = Rig::shaped(config(), "[\"routed.test\"]\nmax_rcpts_per_txn = 1\n");
    for _ in 0..50 {
        r.send("routed.test", 100);
    }
    let dest = r.opened().remove(0);
    assert_eq!(dest.queue.borrow().len(), 5_000);
    assert!(dest.queue.borrow().capacity() >= 5_000);
    r.ready(&dest);
    for i in 0..4_990u64 {
        assert!(r.answer(&dest, 250), "transaction {i}");
        if i % 100 == 0 {
            // The collector has written them.
            r.outcomes();
            r.core.collector(false, i + 1);
        }
    }
    let q = dest.queue.borrow();
    assert_eq!(q.len(), 10);
    assert!(q.capacity() <= 2 * 1024, "capacity {} for 10 queued", q.capacity());
}

#[test]
fn waiting_recipients_come_back_as_the_transactions_they_were_in_the_order_deferred() {
    let mut r = Rig::new(config());
    r.send("routed.test", 3);
    r.send("routed.test", 2);
    let dest = r.opened().remove(0);
    r.ready(&dest);
    r.at(0.25);
    assert!(r.answer(&dest, 451));
    r.at(0.5);
    assert!(r.answer(&dest, 451));
    assert_eq!(r.outcomes().len(), 5);
    assert_eq!(r.core.snapshot(false, r.now).retry_backlog, 5);
    r.at(1.2);
    r.timeout();
    assert!(r.core.next_txn(&dest, r.now).is_none(), "nothing is due before 1.25 s");
    r.at(1.3);
    r.timeout();
    let first = r.core.next_txn(&dest, r.now).expect("the first job is due at 1.25 s");
    assert!(r.core.next_txn(&dest, r.now).is_none(), "the second is not due yet");
    r.at(1.5);
    r.timeout();
    let second = r.core.next_txn(&dest, r.now).expect("the second job, due at 1.5 s");
    for (txn, line, n) in [(&first, 1, 3), (&second, 2, 2)] {
        assert_eq!(txn.job.line, line);
        let want: Vec<_> = (0..n).map(|i| (format!("r{i}@routed.test"), i)).collect();
        assert_eq!(txn.job.rcpts, want, "its recipients, in order, in one transaction");
        assert_eq!(txn.attempt, 2);
        assert_eq!(txn.first_seen, r.t0, "max_age still runs from when it was first seen");
    }
    assert_eq!(first.first_attempt, Some(r.t0 + Duration::from_millis(250)));
    assert_eq!(second.first_attempt, Some(r.t0 + Duration::from_millis(500)));
    assert_eq!(r.core.snapshot(false, r.now).retry_backlog, 0);
}
