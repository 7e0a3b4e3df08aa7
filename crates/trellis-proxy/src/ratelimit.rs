//! Local rate limiting: a token bucket per workload inbound port or per route (Istio needs
//! an EnvoyFilter for this; Trellis makes it part of the snapshot). Over the limit a request
//! gets 429 with response flag RL and `x-ratelimit-*` headers.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;

/// `max` requests at once, refilled with `per_fill` every `interval`.
#[derive(Debug)]
pub struct TokenBucket {
    pub max: u32,
    pub per_fill: u32,
    pub interval: Duration,
    state: Mutex<(u32, Instant)>,
}

impl TokenBucket {
    pub fn new(max: u32, per_fill: u32, interval: Duration) -> TokenBucket {
        TokenBucket {
            max,
            per_fill,
            interval,
            state: Mutex::new((max, Instant::now())),
        }
    }

    /// Takes a token; `Err` carries the time until the next refill.
    pub fn try_take(&self) -> Result<u32, Duration> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(s.1);
        let fills = (elapsed.as_nanos() / self.interval.as_nanos().max(1)) as u64;
        if fills > 0 {
            let add = u64::from(self.per_fill).saturating_mul(fills);
            s.0 =
                u32::try_from((u64::from(s.0) + add).min(u64::from(self.max))).unwrap_or(self.max);
            s.1 += self
                .interval
                .saturating_mul(u32::try_from(fills).unwrap_or(u32::MAX));
        }
        if s.0 == 0 {
            return Err(self
                .interval
                .saturating_sub(now.saturating_duration_since(s.1)));
        }
        s.0 -= 1;
        Ok(s.0)
    }

    /// The 429 answer for a request over the limit.
    pub fn limited(&self, retry_in: Duration) -> Response<ProxyBody> {
        let mut r = crate::http::local_reply(
            StatusCode::TOO_MANY_REQUESTS,
            "RL",
            "local rate limit exceeded".to_string(),
        );
        let h = r.headers_mut();
        h.insert("x-ratelimit-limit", HeaderValue::from(self.max));
        h.insert("x-ratelimit-remaining", HeaderValue::from(0u32));
        let secs = retry_in.as_millis().div_ceil(1000).max(1) as u64;
        h.insert("x-ratelimit-reset", HeaderValue::from(secs));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_in_steps() {
        let b = TokenBucket::new(3, 2, Duration::from_millis(100));
        assert_eq!(b.try_take(), Ok(2));
        assert_eq!(b.try_take(), Ok(1));
        assert_eq!(b.try_take(), Ok(0));
        assert!(b.try_take().is_err());
        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(b.try_take(), Ok(1), "two tokens came back");
        assert_eq!(b.try_take(), Ok(0));
        assert!(b.try_take().is_err());
    }
}
