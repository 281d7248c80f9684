//! Provisioning: when to plan (the batching window). Pure logic in explicit time, shared
//! by the controller (wall clock) and the simulator (simulated clock). What to launch is
//! [`crate::planner::plan`], given in-flight launches as `in_flight` nodes whose
//! `requested` holds only their DaemonSet overhead, so pending pods that fit a launching
//! node are placed on it and never trigger a second launch.

use std::time::Duration;

/// Batching settings: wait until no new pending pod has appeared for `idle`, but never
/// longer than `max` after the first one (Karpenter's 1 s / 10 s defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSettings {
    pub idle: Duration,
    pub max: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(1),
            max: Duration::from_secs(10),
        }
    }
}

/// The batching window's state. Times are durations since an arbitrary epoch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batcher {
    settings: BatchSettings,
    opened: Option<Duration>,
    last_seen: Duration,
    last_count: usize,
}

impl Batcher {
    /// A closed window.
    pub fn new(settings: BatchSettings) -> Self {
        Batcher {
            settings,
            ..Default::default()
        }
    }

    /// Observe how many provisionable pods are pending at `now`. Returns true when the
    /// window closes and a plan should be made.
    pub fn observe(&mut self, now: Duration, pending: usize) -> bool {
        if pending == 0 {
            self.opened = None;
            self.last_count = 0;
            return false;
        }
        let opened = *self.opened.get_or_insert(now);
        // Only a new pod keeps the window open: pods leaving the set (bound by the
        // scheduler to room that came up meanwhile) do not, or a burst binding at the
        // scheduler's pace would hold the window to its maximum.
        if pending > self.last_count {
            self.last_seen = now;
        }
        self.last_count = pending;
        if now.saturating_sub(self.last_seen) >= self.settings.idle
            || now.saturating_sub(opened) >= self.settings.max
        {
            self.opened = None;
            self.last_count = 0;
            return true;
        }
        false
    }

    /// When the open window will close at the latest (None when closed).
    pub fn deadline(&self) -> Option<Duration> {
        self.opened
            .map(|o| (o + self.settings.max).min(self.last_seen + self.settings.idle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn window_closes_after_idle_or_max() {
        let mut b = Batcher::new(BatchSettings::default());
        assert!(!b.observe(s(0), 0));
        assert!(!b.observe(s(0), 3));
        assert_eq!(b.deadline(), Some(s(1000)));
        assert!(!b.observe(s(500), 3));
        assert!(b.observe(s(1000), 3), "idle for 1 s");
        // Pods keep arriving: the window closes at 10 s regardless.
        let mut b = Batcher::new(BatchSettings::default());
        let mut closed_at = None;
        for t in (0..20_000).step_by(500) {
            if b.observe(s(t), 1 + t as usize / 500) {
                closed_at = Some(t);
                break;
            }
        }
        assert_eq!(closed_at, Some(10_000));
        // Pods leaving the set (bound elsewhere) do not hold the window open.
        let mut b = Batcher::new(BatchSettings::default());
        assert!(!b.observe(s(0), 50));
        assert!(!b.observe(s(400), 40));
        assert!(!b.observe(s(800), 30));
        assert!(
            b.observe(s(1000), 20),
            "idle for 1 s since the last new pod"
        );
    }
}
