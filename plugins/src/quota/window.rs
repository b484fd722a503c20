//! The sliding-window counter behind `quota`: per key, the count of the current fixed window
//! and of the previous one; the previous count is weighted by how much of it still overlaps
//! the sliding window (`prev * (W - elapsed) / W + curr`). One number per window, exact
//! integer inputs, smooth at window edges: a burst at the end of one window still counts at
//! the start of the next, so nothing lets 2x the limit through at a boundary.
//!
//! Windows are aligned to the Unix epoch, so every gateway (and Redis) agrees on them.

/// The numbers of one quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Requests per window advertised to clients (`limit`).
    pub quota: u64,
    /// Requests per window actually accepted (`limit + burst`).
    pub ceiling: u64,
    pub window_ms: u64,
}

/// The outcome for one request, with what the response headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests left right now (after this one), for `RateLimit: r=`.
    pub remaining: u64,
    /// Milliseconds until a request would be allowed again (0 when one is).
    pub retry_after_ms: u64,
    /// Milliseconds until the quota is reported to reset (`RateLimit: t=`): the end of the
    /// current window, or `retry_after_ms` when nothing is left.
    pub reset_ms: u64,
}

/// The weighted count of the sliding window, in thousandths of a request (integer math).
fn estimate_milli(p: &Policy, prev: u64, curr: u64, elapsed_ms: u64) -> u128 {
    let w = u128::from(p.window_ms.max(1));
    let overlap = w.saturating_sub(u128::from(elapsed_ms));
    u128::from(prev) * overlap * 1000 / w + u128::from(curr) * 1000
}

/// Whether one more request fits, given the counts before it.
pub fn admits(p: &Policy, prev: u64, curr: u64, elapsed_ms: u64) -> bool {
    estimate_milli(p, prev, curr, elapsed_ms) + 1000 <= u128::from(p.ceiling) * 1000
}

/// Describes a decision. `curr` counts this request if it was allowed.
pub fn describe(p: &Policy, allowed: bool, prev: u64, curr: u64, elapsed_ms: u64) -> Decision {
    let ceiling = u128::from(p.ceiling) * 1000;
    let est = estimate_milli(p, prev, curr, elapsed_ms);
    let remaining = ceiling.saturating_sub(est) / 1000;
    let remaining = u64::try_from(remaining).unwrap_or(u64::MAX).min(p.quota);
    let retry_after_ms = if admits(p, prev, curr, elapsed_ms) {
        0
    } else {
        wait_ms(p, prev, curr, elapsed_ms)
    };
    let window_left = p.window_ms.saturating_sub(elapsed_ms);
    Decision {
        allowed,
        remaining,
        retry_after_ms,
        reset_ms: if remaining == 0 {
            retry_after_ms.max(1)
        } else {
            window_left
        },
    }
}

/// Milliseconds until `admits` turns true with no further requests.
fn wait_ms(p: &Policy, prev: u64, curr: u64, elapsed_ms: u64) -> u64 {
    let w = p.window_ms.max(1);
    // Later in this window, the previous window's weight shrinks.
    if curr < p.ceiling && prev > 0 {
        // Smallest e with prev * (w - e) / w + curr + 1 <= ceiling.
        let room = u128::from(p.ceiling - curr - 1); // >= 0
        let prev = u128::from(prev);
        let w128 = u128::from(w);
        // (w - e) <= room * w / prev  =>  e >= w - floor(room * w / prev)
        let e = w128.saturating_sub(room * w128 / prev);
        // Integer rounding can leave it one millisecond short; step until it admits.
        let mut e = u64::try_from(e).unwrap_or(u64::MAX).max(elapsed_ms);
        while e < w && !admits(p, u64::try_from(prev).unwrap_or(u64::MAX), curr, e) {
            e += 1;
        }
        if e < w {
            return e - elapsed_ms;
        }
    }
    // Otherwise in the next window, where this window's count becomes the previous one.
    let into_next = if curr == 0 {
        0
    } else {
        let room = u128::from(p.ceiling.saturating_sub(1));
        let w128 = u128::from(w);
        let mut x =
            u64::try_from(w128.saturating_sub(room * w128 / u128::from(curr))).unwrap_or(u64::MAX);
        while x < w && !admits(p, curr, 0, x) {
            x += 1;
        }
        x
    };
    (w - elapsed_ms.min(w)) + into_next
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: Policy = Policy {
        quota: 10,
        ceiling: 10,
        window_ms: 10_000,
    };

    /// A single key's counters driven by explicit times.
    struct Sim {
        p: Policy,
        id: u64,
        prev: u64,
        curr: u64,
    }

    impl Sim {
        fn new(p: Policy) -> Sim {
            Sim {
                p,
                id: 0,
                prev: 0,
                curr: 0,
            }
        }
        fn hit(&mut self, now_ms: u64) -> Decision {
            let id = now_ms / self.p.window_ms;
            if id != self.id {
                self.prev = if id == self.id + 1 { self.curr } else { 0 };
                self.curr = 0;
                self.id = id;
            }
            let elapsed = now_ms % self.p.window_ms;
            let allowed = admits(&self.p, self.prev, self.curr, elapsed);
            if allowed {
                self.curr += 1;
            }
            describe(&self.p, allowed, self.prev, self.curr, elapsed)
        }
    }

    #[test]
    fn exact_counts_and_smooth_edges() {
        let mut s = Sim::new(P);
        // 10 allowed at the very end of window 0, the 11th refused.
        for i in 0..10 {
            let d = s.hit(9_990);
            assert!(d.allowed);
            assert_eq!(d.remaining, 9 - i);
        }
        let refused = s.hit(9_990);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        // Just after the edge the burst still counts: no second burst of 10.
        let d = s.hit(10_001);
        assert!(!d.allowed, "a fixed window would allow 10 more here");
        // One slot frees after a tenth of the window has passed.
        assert!(!s.hit(10_999).allowed);
        assert!(s.hit(11_000).allowed);
        // Two windows later everything is forgotten.
        let mut fresh = 0;
        for _ in 0..20 {
            if s.hit(30_500).allowed {
                fresh += 1;
            }
        }
        assert_eq!(fresh, 10);
    }

    #[test]
    fn retry_after_is_exact() {
        let mut s = Sim::new(P);
        for _ in 0..10 {
            s.hit(5_000);
        }
        let d = s.hit(5_000);
        assert!(!d.allowed);
        // Window 0 holds 10: the next window must age them to 9 -> 1 s into window 1.
        assert_eq!(d.retry_after_ms, 5_000 + 1_000);
        assert_eq!(d.reset_ms, d.retry_after_ms);
        assert!(!s.hit(10_999).allowed);
        assert!(s.hit(11_000).allowed);
    }

    #[test]
    fn burst_raises_the_ceiling_not_the_advertised_quota() {
        let p = Policy {
            quota: 10,
            ceiling: 15,
            window_ms: 1_000,
        };
        let mut s = Sim::new(p);
        let allowed = (0..20).filter(|_| s.hit(100).allowed).count();
        assert_eq!(allowed, 15);
        assert_eq!(describe(&p, true, 0, 1, 0).remaining, 10);
    }

    /// Request times over four windows, half of them within 300 ms of a window edge.
    fn edge_heavy_time() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..40_000,
            (1u64..4, -300i64..300).prop_map(|(k, off)| (k * 10_000).saturating_add_signed(off)),
        ]
    }

    proptest! {
        /// Never more than the ceiling inside one fixed window, and never more than twice
        /// the ceiling in any sliding window (the theoretical bound of the estimator is
        /// far tighter for real traffic; this guards against arithmetic slips).
        #[test]
        fn bounded(times in proptest::collection::vec(0u64..40_000, 1..400)) {
            let mut times = times;
            times.sort_unstable();
            let mut s = Sim::new(P);
            let mut allowed_at = Vec::new();
            for t in times {
                if s.hit(t).allowed {
                    allowed_at.push(t);
                }
            }
            for w in 0..4 {
                let n = allowed_at.iter().filter(|t| **t / 10_000 == w).count() as u64;
                prop_assert!(n <= P.ceiling);
            }
            for start in (0..40_000).step_by(500) {
                let n = allowed_at.iter().filter(|t| **t >= start && **t < start + 10_000).count() as u64;
                prop_assert!(n <= 2 * P.ceiling);
            }
        }

        /// Smoothness: any interval of length d <= W admits at most
        /// ceiling * (1 + d / W) + 1 requests, so a burst at a window edge gets about one
        /// ceiling through, not two (a fixed window admits 2 x ceiling across an edge for
        /// any d). Times cluster around window edges, where a fixed window fails.
        #[test]
        fn smooth_over_any_interval(
            times in proptest::collection::vec(edge_heavy_time(), 1..400),
            d in 1u64..=10_000,
        ) {
            let mut times = times;
            times.sort_unstable();
            let mut s = Sim::new(P);
            let allowed_at: Vec<u64> = times.into_iter().filter(|t| s.hit(*t).allowed).collect();
            let bound = P.ceiling + P.ceiling * d / P.window_ms + 1;
            for (i, start) in allowed_at.iter().enumerate() {
                let n = allowed_at[i..].iter().take_while(|t| **t < start + d).count() as u64;
                prop_assert!(n <= bound, "{n} admitted in {d} ms from {start} (bound {bound})");
            }
        }

        /// After a refusal, waiting exactly retry_after admits the next request, and one
        /// millisecond less does not.
        #[test]
        fn retry_after_is_tight(n in 1u64..30, at in 0u64..10_000) {
            let mut s = Sim::new(P);
            for _ in 0..n {
                s.hit(at);
            }
            let d = s.hit(at);
            if !d.allowed {
                let (prev, curr, id) = (s.prev, s.curr, s.id);
                let later = at + d.retry_after_ms;
                let mut probe = Sim { p: P, id, prev, curr };
                prop_assert!(probe.hit(later).allowed);
                if d.retry_after_ms > 0 {
                    let mut probe = Sim { p: P, id, prev, curr };
                    prop_assert!(!probe.hit(later - 1).allowed);
                }
            }
        }
    }
}
