//! Pacing: a destination's `max_message_rate` and `max_connection_rate`
//! as slots in time, one per event at the rate's interval. A slot that
//! passed while nobody asked is not saved up beyond a short `SLACK` (it
//! absorbs wake-ups that come late on a busy machine), so over any span the
//! rate is exceeded by at most SLACK's worth, and a destination that waited
//! gets no more than that as a burst. Plain numbers: `now` is passed in, and
//! a refusal says when the next slot is.

use std::time::{Duration, Instant};

/// How far behind the next slot may fall and still be caught up: a wake-up
/// that comes a little late does not lose its slot.
pub const SLACK: Duration = Duration::from_millis(20);

#[derive(Debug, Default, Clone, Copy)]
pub struct Pacer {
    next: Option<Instant>,
}

impl Pacer {
    /// Takes a slot at `now` if one is due, spacing slots `interval` apart;
    /// otherwise answers when the next one is.
    pub fn take(&mut self, now: Instant, interval: Duration) -> Result<(), Instant> {
        let next = self.next.unwrap_or(now);
        if now < next {
            return Err(next);
        }
        let floor = now.checked_sub(SLACK).unwrap_or(now);
        self.next = Some(next.max(floor) + interval);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_at_the_interval_and_are_not_saved_up() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let every = Duration::from_millis(10);
        let mut p = Pacer::default();
        assert_eq!(p.take(ms(0), every), Ok(()));
        assert_eq!(p.take(ms(3), every), Err(ms(10)));
        assert_eq!(p.take(ms(10), every), Ok(()));
        // Woken 2 ms late: the slot after keeps the schedule.
        assert_eq!(p.take(ms(22), every), Ok(()));
        assert_eq!(p.take(ms(25), every), Err(ms(30)));
        // Idle for a second: SLACK's worth of slots at once, not a hundred.
        let burst = (0..100).filter(|_| p.take(ms(1000), every).is_ok()).count();
        assert_eq!(burst as u128, SLACK.as_millis() / 10 + 1);
        assert_eq!(p.take(ms(1000), every), Err(ms(1010)));
    }

    #[test]
    fn over_any_span_the_rate_is_kept() {
        let t0 = Instant::now();
        let every = Duration::from_micros(500);
        let mut p = Pacer::default();
        let mut taken = 0;
        // Asked every 300 µs for a second: at most 2,000 slots (+1 for the first).
        for i in 0..3334u64 {
            if p.take(t0 + Duration::from_micros(i * 300), every).is_ok() {
                taken += 1;
            }
        }
        assert!((1990..=2001).contains(&taken), "{taken}");
    }
}
