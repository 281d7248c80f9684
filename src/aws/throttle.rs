//! Client-side token buckets in front of EC2's own. EC2 throttles each account per
//! region with a token bucket per API action (non-mutating actions such as the Describe
//! calls: 100 tokens, refilled at 20 a second; mutating actions: 50, refilled at 5 a
//! second) and answers `RequestLimitExceeded` beyond them. A burst of launches that runs into them
//! fails calls that then wait for retries, and starves every other client of the
//! account; pacing the calls here keeps cooper inside the same budget instead.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// One bucket: `capacity` calls at once, `refill_per_second` after that.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    refill_per_second: f64,
    state: Mutex<(f64, Instant)>,
    /// Tokens taken so far: the calls this bucket paced.
    taken: std::sync::atomic::AtomicU64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, refill_per_second: f64) -> TokenBucket {
        TokenBucket {
            capacity: f64::from(capacity.max(1)),
            refill_per_second: refill_per_second.max(1e-3),
            state: Mutex::new((f64::from(capacity.max(1)), Instant::now())),
            taken: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many calls this bucket has paced.
    pub fn taken(&self) -> u64 {
        self.taken.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until a token is free and take it. Waiters queue on the bucket's lock, so
    /// they are served in turn.
    pub async fn acquire(&self) {
        let mut state = self.state.lock().await;
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.refill_per_second)
            .min(self.capacity);
        *last = now;
        if *tokens < 1.0 {
            let wait = (1.0 - *tokens) / self.refill_per_second;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            *tokens = 1.0;
            *last = Instant::now();
        }
        *tokens -= 1.0;
        self.taken
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// EC2's request-rate buckets, as cooper paces its calls. EC2 keeps one bucket per API
/// action (a burst of CreateFleet calls does not use up TerminateInstances), so the
/// mutating actions each have their own here too.
#[derive(Debug)]
pub struct Ec2Buckets {
    /// Describe* calls (one bucket for all of them: stricter than EC2).
    pub describe: TokenBucket,
    /// CreateFleet.
    pub create_fleet: TokenBucket,
    /// CreateTags.
    pub create_tags: TokenBucket,
    /// CreateLaunchTemplate.
    pub create_launch_template: TokenBucket,
    /// TerminateInstances.
    pub terminate: TokenBucket,
}

impl Ec2Buckets {
    /// Calls paced by the mutating actions' buckets together.
    pub fn mutating_taken(&self) -> u64 {
        [
            &self.create_fleet,
            &self.create_tags,
            &self.create_launch_template,
            &self.terminate,
        ]
        .iter()
        .map(|b| b.taken())
        .sum()
    }
}

impl Default for Ec2Buckets {
    /// EC2's default account buckets (see the module docs).
    fn default() -> Self {
        let mutating = || TokenBucket::new(50, 5.0);
        Ec2Buckets {
            describe: TokenBucket::new(100, 20.0),
            create_fleet: mutating(),
            create_tags: mutating(),
            create_launch_template: mutating(),
            terminate: mutating(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_is_served_at_once_then_paced_at_the_refill_rate() {
        tokio::time::pause();
        let bucket = TokenBucket::new(5, 2.0);
        let start = Instant::now();
        for _ in 0..5 {
            bucket.acquire().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(1),
            "the burst waits for nothing"
        );
        for _ in 0..4 {
            bucket.acquire().await;
        }
        // Four more at two a second: two seconds.
        let waited = start.elapsed().as_secs_f64();
        assert!((waited - 2.0).abs() < 0.01, "{waited}");
        // After a quiet spell the bucket is full again, but never fuller.
        tokio::time::advance(Duration::from_secs(60)).await;
        let again = Instant::now();
        for _ in 0..5 {
            bucket.acquire().await;
        }
        assert!(again.elapsed() < Duration::from_millis(1));
        bucket.acquire().await;
        let waited = again.elapsed().as_secs_f64();
        assert!((waited - 0.5).abs() < 0.01, "{waited}");
    }
}
