//! The retry policy (SPEC §4): which failures are retried, how long to wait between attempts.
//!
//! Pure functions, so the arithmetic is tested without a clock. Backoff is exponential with
//! *full jitter*: before retry `n` (1-based) the wait is uniform in
//! `[0, min(cap, base · 2^(n-1))]`. A `Retry-After` header on a retryable response replaces
//! the backoff, capped at [`RetryPolicy::retry_after_cap`] (one minute by default).
//!
//! Two halves, as Vector's `RetryLogic` beside its backoff policy: *what* to do with an
//! attempt's result is [`RetryPolicy::classify`] (one pure function, see its table), *when*
//! to retry is [`RetryPolicy::delay`] and `max_retries`.

use std::time::{Duration, SystemTime};

use hyper::header::HeaderValue;

use crate::config::Delivery;

/// Defaults for the backoff; see [`super::EgressOptions`].
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_AFTER_CAP: Duration = Duration::from_secs(60);

/// A destination's retry policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (`delivery.maxRetries`).
    pub max_retries: u32,
    /// Statuses retried besides connection errors and timeouts (`delivery.retryOn`).
    pub retry_on: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub retry_after_cap: Duration,
}

impl RetryPolicy {
    pub fn new(
        delivery: &Delivery,
        backoff_base: Duration,
        backoff_cap: Duration,
        retry_after_cap: Duration,
    ) -> Self {
        RetryPolicy {
            max_retries: delivery.max_retries,
            retry_on: delivery.retry_on.clone(),
            backoff_base,
            backoff_cap,
            retry_after_cap,
        }
    }

    /// With the default backoff constants.
    pub fn from_delivery(delivery: &Delivery) -> Self {
        Self::new(
            delivery,
            DEFAULT_BACKOFF_BASE,
            DEFAULT_BACKOFF_CAP,
            DEFAULT_RETRY_AFTER_CAP,
        )
    }

    /// Whether a response with this status is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        self.retry_on.contains(&status)
    }

    /// The upper bound of the wait before retry `retry` (1-based): `min(cap, base · 2^(retry-1))`.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(31);
        self.backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.backoff_cap)
    }

    /// The full-jitter wait before retry `retry`, given `unit` drawn uniformly from `[0, 1)`.
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.backoff_ceiling(retry).mul_f64(unit)
    }

    /// The wait before retry `retry`: the server's `Retry-After` (capped) when given, else the
    /// jittered backoff.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        match retry_after {
            Some(d) => d.min(self.retry_after_cap),
            None => self.backoff(retry, unit),
        }
    }

    /// [`Self::delay`] with a fresh random draw.
    pub fn random_delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        self.delay(retry, retry_after, rand::random_range(0.0..1.0))
    }
}

/// What an attempt came to, as far as retrying goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// The endpoint answered: its status, and its `Retry-After` when it gave a valid one.
    Response {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No response: timed out, or the connection (or TLS handshake) failed.
    NoResponse,
    /// The access token could not be had; `retryable` when the token endpoint may answer
    /// later (see [`super::auth::AuthError::is_retryable`]).
    TokenFailed { retryable: bool },
    /// The request could not be built (a missing secret…): never sent.
    Unsendable,
}

impl Observed {
    /// The response's status, `None` without one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Observed::Response { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What the round does after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Delivered.
    Success,
    /// A `401` to an OAuth2 token, the first this round: fetch a new token and try again at
    /// once (not a retry).
    RefreshToken,
    /// Retry after the backoff, or after the server's `Retry-After` when given (while
    /// retries are left).
    Retry { retry_after: Option<Duration> },
    /// Failed for good.
    Final,
}

impl RetryPolicy {
    /// The retry logic, one row per case:
    ///
    /// | attempt                                   | decision                          |
    /// |-------------------------------------------|-----------------------------------|
    /// | `2xx`                                     | [`Decision::Success`]             |
    /// | `401`, OAuth2, first this round           | [`Decision::RefreshToken`]        |
    /// | `401`, OAuth2, again                      | retry (no `Retry-After`) if `401` is in `retryOn`, else final |
    /// | a `retryOn` status (`401` without OAuth2 included) | retry, honouring `Retry-After` |
    /// | any other status                          | [`Decision::Final`]               |
    /// | timeout, connection error                 | retry                             |
    /// | token fetch failure                       | retry if retryable, else final    |
    /// | request not buildable                     | final                             |
    ///
    /// `oauth2`: the destination authorizes with OAuth2; `refreshed_after_401`: this round
    /// already fetched a new token after a `401`.
    pub fn classify(
        &self,
        observed: &Observed,
        oauth2: bool,
        refreshed_after_401: bool,
    ) -> Decision {
        match *observed {
            Observed::Response { status, .. } if (200..300).contains(&status) => Decision::Success,
            Observed::Response { status: 401, .. } if oauth2 && !refreshed_after_401 => {
                Decision::RefreshToken
            }
            Observed::Response { status: 401, .. } if oauth2 => {
                if self.retries_status(401) {
                    Decision::Retry { retry_after: None }
                } else {
                    Decision::Final
                }
            }
            Observed::Response {
                status,
                retry_after,
            } => {
                if self.retries_status(status) {
                    Decision::Retry { retry_after }
                } else {
                    Decision::Final
                }
            }
            Observed::NoResponse | Observed::TokenFailed { retryable: true } => {
                Decision::Retry { retry_after: None }
            }
            Observed::TokenFailed { retryable: false } | Observed::Unsendable => Decision::Final,
        }
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (a date in the past gives zero).
/// Anything else is ignored (`None`).
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Very large numbers saturate; the cap applies later.
        return Some(Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::from_delivery(&Delivery::default())
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = policy();
        assert_eq!(p.backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(p.backoff_ceiling(2), Duration::from_millis(200));
        assert_eq!(p.backoff_ceiling(5), Duration::from_millis(1600));
        assert_eq!(p.backoff_ceiling(8), Duration::from_secs(10));
        assert_eq!(p.backoff_ceiling(1000), Duration::from_secs(10));
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let p = policy();
        assert_eq!(p.backoff(3, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(3, 0.5), Duration::from_millis(200));
        assert!(p.backoff(3, 0.999_999) <= Duration::from_millis(400));
        assert_eq!(p.backoff(3, f64::NAN), Duration::ZERO);
        for _ in 0..1000 {
            assert!(p.random_delay(2, None) <= Duration::from_millis(200));
        }
    }

    #[test]
    fn retry_after_overrides_and_is_capped() {
        let p = policy();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3)), 0.9),
            Duration::from_secs(3)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600)), 0.9),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(
            parse_retry_after(&v("1"), now),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            parse_retry_after(&v(" 120 "), now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&v(&later), now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&v(&earlier), now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&v("soon"), now), None);
        assert_eq!(parse_retry_after(&v("-1"), now), None);
        assert_eq!(
            parse_retry_after(&v("99999999999999999999999"), now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn retryable_statuses_follow_retry_on() {
        let p = policy();
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(p.retries_status(s));
        }
        for s in [400, 401, 404, 501] {
            assert!(!p.retries_status(s));
        }
    }

    /// One row per case of [`RetryPolicy::classify`], with the wait before the first retry
    /// (jitter drawn as 0) for the retried ones.
    #[test]
    fn classify_one_row_each() {
        use Decision::*;
        let p = policy();
        let mut with_401 = policy();
        with_401.retry_on.push(401);
        let secs = Duration::from_secs;
        let response = |status: u16| Observed::Response {
            status,
            retry_after: None,
        };
        let after = |status: u16, d: Duration| Observed::Response {
            status,
            retry_after: Some(d),
        };
        // (row, policy, attempt, oauth2, refreshed after a 401, decision, first wait)
        type Row<'a> = (
            &'a str,
            &'a RetryPolicy,
            Observed,
            bool,
            bool,
            Decision,
            Option<Duration>,
        );
        let rows: Vec<Row> = vec![
            ("200", &p, response(200), false, false, Success, None),
            ("204", &p, response(204), true, true, Success, None),
            (
                "401 OAuth2 first",
                &p,
                response(401),
                true,
                false,
                RefreshToken,
                None,
            ),
            (
                "401 OAuth2 again",
                &p,
                response(401),
                true,
                true,
                Final,
                None,
            ),
            (
                "401 OAuth2 again, retryOn 401",
                &with_401,
                after(401, secs(3)),
                true,
                true,
                Retry { retry_after: None },
                Some(Duration::ZERO),
            ),
            ("401 bearer", &p, response(401), false, false, Final, None),
            (
                "401 bearer, retryOn 401",
                &with_401,
                after(401, secs(3)),
                false,
                false,
                Retry {
                    retry_after: Some(secs(3)),
                },
                Some(secs(3)),
            ),
            (
                "408",
                &p,
                response(408),
                false,
                false,
                Retry { retry_after: None },
                Some(Duration::ZERO),
            ),
            (
                "429",
                &p,
                response(429),
                false,
                false,
                Retry { retry_after: None },
                Some(Duration::ZERO),
            ),
            (
                "500",
                &p,
                response(500),
                false,
                false,
                Retry { retry_after: None },
                Some(Duration::ZERO),
            ),
            (
                "502",
                &p,
                response(502),
                false,
                false,
                Retry { retry_after: None },
                Some(Duration::ZERO),
            ),
            (
                "503",
                &p,
                response(503),
                false,
                false,
                Retry { retry_after: None },
                Some(Duration::ZERO),
            ),
            (
                "504",
                &p,
                response(504),
                false,
                false,
                Retry { retry_after: None },
                Some(Duration::ZERO),
            ),
            ("400", &p, response(400), false, false, Final, None),
            ("404", &p, response(404), true, false, Final, None),
            ("501", &p, response(501), false, false, Final, None),
            (
                "non-retryOn with Retry-After",
                &p,
                after(400, secs(3)),
                false,
                false,
                Final,
                None,
            ),
            (
                "429 Retry-After honoured",
                &p,
                after(429, secs(3)),
                false,
                false,
                Retry {
                    retry_after: Some(secs(3)),
                },
                Some(secs(3)),
            ),
            (
                "503 Retry-After capped",
                &p,
                after(503, secs(3600)),
                false,
                false,
                Retry {
                    retry_after: Some(secs(3600)),
                },
                Some(secs(60)),
            ),
            (
                "timeout or connection error",
                &p,
                Observed::NoResponse,
                false,
                false,
                Retry { retry_after: None },
                Some(Duration::ZERO),
            ),
            (
                "token fetch failure, retryable",
                &p,
                Observed::TokenFailed { retryable: true },
                true,
                false,
                Retry { retry_after: None },
                Some(Duration::ZERO),
            ),
            (
                "token fetch failure, final",
                &p,
                Observed::TokenFailed { retryable: false },
                true,
                false,
                Final,
                None,
            ),
            (
                "request not buildable",
                &p,
                Observed::Unsendable,
                false,
                false,
                Final,
                None,
            ),
        ];
        for (row, policy, observed, oauth2, refreshed, decision, wait) in rows {
            assert_eq!(
                policy.classify(&observed, oauth2, refreshed),
                decision,
                "{row}"
            );
            let first_wait = match decision {
                Retry { retry_after } => Some(policy.delay(1, retry_after, 0.0)),
                _ => None,
            };
            assert_eq!(first_wait, wait, "{row}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_on_the_paused_clock() {
        let p = policy();
        let start = tokio::time::Instant::now();
        let mut total = Duration::ZERO;
        for retry in 1..=p.max_retries {
            let d = p.random_delay(retry, None);
            total += d;
            tokio::time::sleep(d).await;
        }
        // Timer resolution is 1 ms: each sleep rounds up by less than that.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= total && elapsed <= total + Duration::from_millis(p.max_retries as u64),
            "{elapsed:?} vs {total:?}"
        );
        assert!(total <= Duration::from_millis(300));
    }
}
