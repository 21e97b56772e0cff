//! What the maintenance round has to look at, and when: the writer's memory
//! of the topics and subscriptions that may have work, so that an idle round
//! costs nothing however many of them exist. Pure bookkeeping, no I/O; the
//! writer (`Writer::maintain`) does the looking.
//!
//! A topic is due when something changed it (a publish, an ack, a seek, a
//! purge, a subscription deleted, its settings updated) or when its next
//! message passes the retention or the max age; a subscription (exclusive
//! writers only) when one of its leases may have passed its deadline. After
//! a look, the writer sets when the next one is needed, or nothing until
//! the next change.

use std::collections::{BTreeSet, HashMap};

use crate::model::Micros;

/// Most topics, and most subscriptions, one round looks at, and the page of
/// a full pass: a round stays short within its group commit, and a larger
/// backlog takes several rounds back to back (`MaintenanceReport::more`).
pub(super) const ROUND_LIMIT: usize = 200;

/// How long a name may have waited, due but left by a round at its limit,
/// before the next round runs at once rather than on the timer. A backlog
/// (a burst of due topics, lease deadlines) drains in rounds back to back,
/// while topics that change all the time are looked at about once a
/// second, as each round used to, not in a loop.
pub(super) const BEHIND: Micros = 1_000_000;

/// How often maintenance on a shared database walks every topic once (a
/// page per round, each round in its own group). Each instance looks at
/// what it changed itself, and when it has work due next; what another
/// instance noted in its memory and did not do, because it stopped without
/// starting again (a restarted instance makes a full pass itself), waits at
/// most this long. At 6,000 topics a pass is 30 short rounds, about 20,000
/// keyed statements: well under 1% of a core, spread over ten minutes.
pub(super) const FULL_PASS_EVERY: Micros = 10 * 60 * 1_000_000;

/// Names, each due at an instant: the earliest first.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    due: HashMap<String, Micros>,
    queue: BTreeSet<(Micros, String)>,
}

impl Schedule {
    /// Makes `name` due at `at` at the latest (an earlier instant it was
    /// already due at stays).
    pub(super) fn mark(&mut self, name: &str, at: Micros) {
        match self.due.get_mut(name) {
            Some(due) if *due <= at => {}
            Some(due) => {
                self.queue.remove(&(*due, name.to_owned()));
                *due = at;
                self.queue.insert((at, name.to_owned()));
            }
            None => {
                self.due.insert(name.to_owned(), at);
                self.queue.insert((at, name.to_owned()));
            }
        }
    }

    /// Takes out up to `limit` names due at or before `now`, the earliest
    /// first.
    pub(super) fn take_due(&mut self, now: Micros, limit: usize) -> Vec<String> {
        let mut taken = Vec::new();
        while taken.len() < limit {
            match self.queue.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            if let Some((_, name)) = self.queue.pop_first() {
                self.due.remove(&name);
                taken.push(name);
            }
        }
        taken
    }

    /// The instant the name due first is due at.
    pub(super) fn first_due(&self) -> Option<Micros> {
        self.queue.first().map(|(at, _)| *at)
    }

    /// How many names are scheduled.
    pub(super) fn len(&self) -> usize {
        self.due.len()
    }
}

/// The writer's maintenance memory.
#[derive(Debug)]
pub(super) struct Sweep {
    /// Topics that may have messages to remove or expire.
    pub(super) topics: Schedule,
    /// Exclusive writers only: subscriptions whose leases may have expired.
    pub(super) subs: Schedule,
    /// What the round in progress (or the last one) took out of the
    /// schedules, to be put back if its transaction does not commit.
    taken: Vec<(Kind, String)>,
    /// The full pass: every topic (and, for an exclusive writer, every
    /// subscription) is looked at once, a page per round.
    pass: Pass,
}

/// Topic or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Topic,
    Sub,
}

/// Where the full pass is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pass {
    /// Pages still to read: the topics after the first name, the
    /// subscriptions after the second (`None`: done).
    Running(Option<String>, Option<String>),
    /// The next pass starts at this instant (`i64::MAX`: never).
    Idle(Micros),
}

/// What a round of the full pass reads: topics after the first name, and
/// subscriptions after the second.
pub(super) type PassPage = (Option<String>, Option<String>);

impl Sweep {
    /// A sweep that starts with a full pass: what happened before this
    /// writer started is not in its memory. `subs` says whether the pass
    /// covers subscriptions too (exclusive writers; a shared database finds
    /// expired leases by a query instead).
    pub(super) fn new(subs: bool) -> Sweep {
        Sweep {
            topics: Schedule::default(),
            subs: Schedule::default(),
            taken: Vec::new(),
            pass: Pass::Running(Some(String::new()), subs.then(String::new)),
        }
    }

    /// Starts a round: what the last one took is settled (its group
    /// committed, or [`Sweep::rolled_back`] put it back already).
    pub(super) fn start_round(&mut self) {
        self.taken.clear();
    }

    /// Takes out the names of `kind` due at `now`, at most `limit`, and
    /// remembers them until the round is settled.
    pub(super) fn take_due(&mut self, kind: Kind, now: Micros, limit: usize) -> Vec<String> {
        let names = match kind {
            Kind::Topic => self.topics.take_due(now, limit),
            Kind::Sub => self.subs.take_due(now, limit),
        };
        self.taken.extend(names.iter().map(|n| (kind, n.clone())));
        names
    }

    /// Sets when a name taken out by this round is due again (`None`: not
    /// until something changes it).
    pub(super) fn again(&mut self, kind: Kind, name: &str, at: Option<Micros>) {
        if let Some(at) = at {
            match kind {
                Kind::Topic => self.topics.mark(name, at),
                Kind::Sub => self.subs.mark(name, at),
            }
        }
    }

    /// The round's transaction did not commit: what it took out is due
    /// again at once, since what it found or did may not have happened.
    pub(super) fn rolled_back(&mut self) {
        for (kind, name) in std::mem::take(&mut self.taken) {
            self.again(kind, &name, Some(i64::MIN));
        }
    }

    /// The page the full pass reads this round, if one is running (or due
    /// to start at `now`).
    pub(super) fn pass_page(&mut self, now: Micros) -> Option<PassPage> {
        match &self.pass {
            Pass::Idle(at) if now < *at => None,
            Pass::Idle(_) => {
                self.pass = Pass::Running(Some(String::new()), None);
                Some((Some(String::new()), None))
            }
            Pass::Running(topics, subs) => Some((topics.clone(), subs.clone())),
        }
    }

    /// Where the pass goes on from (`None`s: it is complete, and the next
    /// one starts at `next`).
    pub(super) fn pass_read(&mut self, page: PassPage, next: Micros) {
        self.pass = match page {
            (None, None) => Pass::Idle(next),
            (topics, subs) => Pass::Running(topics, subs),
        };
    }

    /// True while a full pass is running.
    pub(super) fn passing(&self) -> bool {
        matches!(self.pass, Pass::Running(..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_keep_the_earliest_instant_and_come_out_in_order() {
        let mut s = Schedule::default();
        s.mark("b", 20);
        s.mark("a", 30);
        s.mark("a", 10);
        s.mark("a", 40);
        s.mark("c", 50);
        assert_eq!(s.len(), 3);
        assert_eq!(s.take_due(9, 10), Vec::<String>::new());
        assert_eq!(s.take_due(25, 10), vec!["a", "b"]);
        assert_eq!(s.take_due(25, 10), Vec::<String>::new());
        assert_eq!(s.take_due(i64::MAX, 10), vec!["c"]);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn a_round_takes_at_most_its_limit() {
        let mut s = Schedule::default();
        for i in 0..5 {
            s.mark(&format!("t{i}"), i);
        }
        assert_eq!(s.take_due(100, 2), vec!["t0", "t1"]);
        assert_eq!(s.first_due(), Some(2));
        assert_eq!(s.take_due(100, 10).len(), 3);
    }

    #[test]
    fn what_a_failed_round_took_is_due_again() {
        let mut sweep = Sweep::new(true);
        sweep.topics.mark("t", 5);
        sweep.subs.mark("s", 5);
        sweep.start_round();
        assert_eq!(sweep.take_due(Kind::Topic, 10, 10), vec!["t"]);
        assert_eq!(sweep.take_due(Kind::Sub, 10, 10), vec!["s"]);
        // The look found nothing more to do...
        sweep.again(Kind::Topic, "t", None);
        // ...but its group did not commit.
        sweep.rolled_back();
        assert_eq!(sweep.take_due(Kind::Topic, 10, 10), vec!["t"]);
        assert_eq!(sweep.take_due(Kind::Sub, 10, 10), vec!["s"]);
        // A committed round's takings are not put back.
        sweep.start_round();
        sweep.rolled_back();
        assert_eq!(sweep.topics.len() + sweep.subs.len(), 0);
    }

    #[test]
    fn the_full_pass_runs_once_then_again_when_due() {
        let mut sweep = Sweep::new(false);
        assert!(sweep.passing());
        assert_eq!(sweep.pass_page(0), Some((Some(String::new()), None)));
        sweep.pass_read((Some("m".into()), None), 100);
        assert_eq!(sweep.pass_page(1), Some((Some("m".into()), None)));
        sweep.pass_read((None, None), 100);
        assert!(!sweep.passing());
        assert_eq!(sweep.pass_page(99), None);
        assert_eq!(sweep.pass_page(100), Some((Some(String::new()), None)));
        let mut exclusive = Sweep::new(true);
        assert_eq!(
            exclusive.pass_page(0),
            Some((Some(String::new()), Some(String::new())))
        );
        exclusive.pass_read((None, None), i64::MAX);
        assert_eq!(exclusive.pass_page(i64::MAX - 1), None);
    }
}
