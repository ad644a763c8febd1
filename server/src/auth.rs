//! Agent token authentication (upstream `--agent-namespace`, `--agent-service-account`,
//! `--authentication-audience`): every agent `Connect` must carry exactly one
//! `authorization: Bearer <token>` value; the token is checked with a TokenReview
//! (`authentication.k8s.io/v1`) against kube-apiserver, which must answer authenticated, without
//! error, for the user `system:serviceaccount:<namespace>:<service-account>`. No caching: every
//! connect costs one review, as upstream.
//!
//! This module is the policy. The TokenReview itself goes through the shared kube-rs client
//! (`spoke_k8s`), configured as kube loads it: `--kubeconfig` (any credential kube supports:
//! client certificates, tokens and token files, `exec` and `auth-provider` plugins, `proxy-url`)
//! or the in-cluster service account.
//!
//! Rate limit (`--kubeconfig-qps`/`--kubeconfig-burst`; kube-rs has no client-side limiter): a
//! token bucket in front of the reviews. `0` means the default of 50 QPS / burst 100 (client-go's
//! 5/10 would make a reconnect storm of a few hundred agents wait for minutes); a negative QPS
//! disables the limit. A review that would have to wait longer than 10 s for a token is refused
//! with `Unavailable` (the agent retries).

use spoke_k8s::k8s_openapi::api::authentication::v1::TokenReviewStatus;
use spoke_k8s::token_review::{self, ReviewError};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

/// Bound on one TokenReview round trip (connect, TLS, request, response).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a review waits for the rate limiter before being refused.
const MAX_RATE_WAIT: Duration = Duration::from_secs(10);
/// `--kubeconfig-qps=0` / `--kubeconfig-burst=0`.
pub const DEFAULT_QPS: f32 = 50.0;
pub const DEFAULT_BURST: u32 = 100;
const BEARER: &str = "Bearer ";

/// Checks agents' bearer tokens with TokenReviews.
pub struct TokenAuth {
    namespace: String,
    service_account: String,
    audience: String,
    client: spoke_k8s::kube::Client,
    /// The API server's URL, for messages.
    endpoint: String,
    limiter: Option<RateLimiter>,
}

impl TokenAuth {
    /// `client` talks to `endpoint` (the API server's URL, for messages).
    pub fn new(
        client: spoke_k8s::kube::Client,
        endpoint: &str,
        namespace: &str,
        service_account: &str,
        audience: &str,
    ) -> Self {
        tracing::info!(
            endpoint,
            namespace,
            service_account,
            audience,
            "agent token authentication enabled (TokenReview)"
        );
        Self {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            audience: audience.to_string(),
            client,
            endpoint: endpoint.to_string(),
            limiter: RateLimiter::new(DEFAULT_QPS, DEFAULT_BURST),
        }
    }

    /// `--kubeconfig-qps` / `--kubeconfig-burst`: 0 keeps the defaults (50 / 100), a negative QPS
    /// disables rate limiting.
    pub fn with_rate_limit(mut self, qps: f32, burst: u32) -> Self {
        let qps = if qps == 0.0 { DEFAULT_QPS } else { qps };
        let burst = if burst == 0 { DEFAULT_BURST } else { burst };
        self.limiter = RateLimiter::new(qps, burst);
        self
    }

    /// Checks the `authorization` metadata of an agent's Connect request.
    pub async fn authenticate(&self, md: &MetadataMap) -> Result<(), Status> {
        let agent_id = md
            .get("agentid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        match self.review(md).await {
            Ok(username) => {
                tracing::debug!(agent_id, username, "agent token authenticated");
                Ok(())
            }
            Err(f) => {
                tracing::warn!(
                    agent_id,
                    code = ?f.code,
                    reason = %f.reason,
                    "agent token authentication failed: connect refused"
                );
                Err(Status::new(
                    f.code,
                    format!("agent token authentication failed: {}", f.reason),
                ))
            }
        }
    }

    async fn review(&self, md: &MetadataMap) -> Result<String, Failure> {
        let token = bearer_token(md)?;
        if let Some(limiter) = &self.limiter {
            match limiter.reserve(MAX_RATE_WAIT) {
                Some(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                Some(_) => {}
                None => return Err(Failure::unavailable(
                    "too many TokenReviews in flight (--kubeconfig-qps/--kubeconfig-burst limit)",
                )),
            }
        }
        let audiences = [self.audience.clone()];
        let status = token_review::review(&self.client, token, &audiences, REQUEST_TIMEOUT)
            .await
            .map_err(|e| self.unavailable(e))?;
        check_review(&status, &self.audience)?;
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        check_username(&username, &self.namespace, &self.service_account)?;
        Ok(username)
    }

    /// A review that got no usable answer: the agent is told to retry.
    fn unavailable(&self, e: ReviewError) -> Failure {
        let endpoint = &self.endpoint;
        Failure::unavailable(match e {
            ReviewError::Timeout(t) => {
                format!("TokenReview request to {endpoint} timed out after {t:?}")
            }
            ReviewError::Transport(why) => {
                format!("TokenReview request to {endpoint} failed: {why}")
            }
            ReviewError::Invalid(why) => format!("TokenReview response is not valid: {why}"),
            ReviewError::Api { code, message } => {
                let hint = match code {
                    401 => " (spoke-server's own kubeconfig credentials were rejected)",
                    403 => " (spoke-server needs the system:auth-delegator ClusterRole)",
                    _ => "",
                };
                format!("TokenReview answered HTTP {code}{hint}: {}", clip(&message))
            }
        })
    }
}

/// Why a connect is refused: the gRPC code and a log/status text (never containing the token).
#[derive(Debug, PartialEq, Eq)]
struct Failure {
    code: Code,
    reason: String,
}

impl Failure {
    fn unauthenticated(reason: impl Into<String>) -> Self {
        Self {
            code: Code::Unauthenticated,
            reason: reason.into(),
        }
    }
    fn denied(reason: impl Into<String>) -> Self {
        Self {
            code: Code::PermissionDenied,
            reason: reason.into(),
        }
    }
    fn unavailable(reason: impl Into<String>) -> Self {
        Self {
            code: Code::Unavailable,
            reason: reason.into(),
        }
    }
}

/// The token of the single `authorization: Bearer <token>` value.
fn bearer_token(md: &MetadataMap) -> Result<&str, Failure> {
    let values: Vec<_> = md.get_all("authorization").iter().collect();
    let value =
        match values.as_slice() {
            [] => return Err(Failure::unauthenticated(
                "no authorization metadata (agent started without --service-account-token-path?)",
            )),
            [v] => *v,
            more => {
                return Err(Failure::unauthenticated(format!(
                    "too many ({}) authorization values, expected one",
                    more.len()
                )))
            }
        };
    let value = value
        .to_str()
        .map_err(|_| Failure::unauthenticated("authorization value is not ASCII"))?;
    let Some(token) = value.strip_prefix(BEARER) else {
        return Err(Failure::unauthenticated(format!(
            "authorization value does not have the {BEARER:?} prefix"
        )));
    };
    // A token file read verbatim may end with a newline: tokens never contain whitespace.
    let token = token.trim();
    if token.is_empty() {
        return Err(Failure::unauthenticated("empty bearer token"));
    }
    Ok(token)
}

fn check_review(status: &TokenReviewStatus, audience: &str) -> Result<(), Failure> {
    if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
        return Err(Failure::unauthenticated(format!(
            "TokenReview error: {}",
            clip(error)
        )));
    }
    if status.authenticated != Some(true) {
        return Err(Failure::unauthenticated(format!(
            "TokenReview: token not authenticated (invalid, expired, or not for audience {audience:?})"
        )));
    }
    // An audience-aware apiserver echoes the matching audience; an empty list is accepted as
    // upstream does (it never looks at status.audiences).
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.is_empty() && !audiences.iter().any(|a| a == audience) {
        return Err(Failure::unauthenticated(format!(
            "TokenReview: token audiences {audiences:?} do not include {audience:?}"
        )));
    }
    Ok(())
}

/// `username` must be exactly `system:serviceaccount:<namespace>:<service_account>`.
fn check_username(username: &str, namespace: &str, service_account: &str) -> Result<(), Failure> {
    let parts: Vec<&str> = username.split(':').collect();
    let [system, kind, ns, sa] = parts.as_slice() else {
        return Err(Failure::denied(format!(
            "TokenReview user {username:?} is not a service account (expected system:serviceaccount:{namespace}:{service_account})"
        )));
    };
    if *system != "system" || *kind != "serviceaccount" {
        return Err(Failure::denied(format!(
            "TokenReview user {username:?} is not a service account (expected system:serviceaccount:{namespace}:{service_account})"
        )));
    }
    if *ns != namespace {
        return Err(Failure::denied(format!(
            "service account token from namespace {ns:?}, expected {namespace:?}"
        )));
    }
    if *sa != service_account {
        return Err(Failure::denied(format!(
            "token of service account {sa:?}, expected {service_account:?}"
        )));
    }
    Ok(())
}

fn clip(s: &str) -> String {
    const MAX: usize = 300;
    let s = s.trim();
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limit.

/// Token bucket handing out reservations: a caller sleeps until its token is due.
struct RateLimiter {
    qps: f64,
    burst: f64,
    /// (tokens, at): may go negative = reservations waiting.
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// `None` (unlimited) for a negative or non-finite QPS.
    fn new(qps: f32, burst: u32) -> Option<Self> {
        if !(qps > 0.0 && qps.is_finite()) {
            return None;
        }
        let burst = f64::from(burst.max(1));
        Some(Self {
            qps: f64::from(qps),
            burst,
            state: Mutex::new((burst, Instant::now())),
        })
    }

    /// How long to wait for a token, or `None` (nothing reserved) if longer than `max_wait`.
    fn reserve(&self, max_wait: Duration) -> Option<Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, at) = *state;
        let refilled =
            (tokens + now.saturating_duration_since(at).as_secs_f64() * self.qps).min(self.burst);
        let left = refilled - 1.0;
        let wait = if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.qps)
        };
        if wait > max_wait {
            *state = (refilled, now);
            return None;
        }
        *state = (left, now);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spoke_k8s::k8s_openapi::api::authentication::v1::UserInfo;
    use tonic::metadata::MetadataValue;

    const AUD: &str = "system:konnectivity-server";
    const GOOD_USER: &str = "system:serviceaccount:kube-system:konnectivity-agent";

    fn md(values: &[&str]) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert("agentid", MetadataValue::from_static("agent-1"));
        for v in values {
            md.append(
                "authorization",
                MetadataValue::try_from(*v).expect("ascii value"),
            );
        }
        md
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(&md(&["Bearer abc.def"])), Ok("abc.def"));
        assert_eq!(bearer_token(&md(&["Bearer abc.def \t"])), Ok("abc.def"));
        let err = |values: &[&str]| bearer_token(&md(values)).expect_err("must be refused");
        let missing = err(&[]);
        assert_eq!(missing.code, Code::Unauthenticated);
        assert!(missing.reason.contains("no authorization"), "{missing:?}");
        let two = err(&["Bearer a", "Bearer b"]);
        assert_eq!(two.code, Code::Unauthenticated);
        assert!(two.reason.contains("too many (2)"), "{two:?}");
        for bad in ["bearer abc", "Basic abc", "abc", "Bearerabc"] {
            let e = err(&[bad]);
            assert_eq!(e.code, Code::Unauthenticated);
            assert!(e.reason.contains("prefix"), "{bad}: {e:?}");
            assert!(
                !e.reason.contains("abc"),
                "the token must not be echoed: {e:?}"
            );
        }
        assert!(err(&["Bearer "]).reason.contains("empty"));
    }

    #[test]
    fn username_must_be_the_configured_service_account() {
        let check = |u: &str| check_username(u, "kube-system", "konnectivity-agent");
        assert_eq!(check(GOOD_USER), Ok(()));
        for (user, code, needle) in [
            (
                "system:serviceaccount:default:konnectivity-agent",
                Code::PermissionDenied,
                "namespace \"default\"",
            ),
            (
                "system:serviceaccount:kube-system:other",
                Code::PermissionDenied,
                "service account \"other\"",
            ),
            ("admin", Code::PermissionDenied, "not a service account"),
            (
                "system:node:kube-system:konnectivity-agent",
                Code::PermissionDenied,
                "not a service account",
            ),
            (
                "system:serviceaccount:kube-system:konnectivity-agent:extra",
                Code::PermissionDenied,
                "not a service account",
            ),
            ("", Code::PermissionDenied, "not a service account"),
        ] {
            let e = check(user).expect_err(user);
            assert_eq!(e.code, code, "{user}");
            assert!(e.reason.contains(needle), "{user}: {}", e.reason);
        }
    }

    #[test]
    fn review_status_checks() {
        let status = |authenticated: bool, auds: &[&str], error: &str| TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo {
                username: Some(GOOD_USER.into()),
                ..Default::default()
            }),
            audiences: Some(auds.iter().map(|s| s.to_string()).collect()),
            error: Some(error.into()).filter(|e: &String| !e.is_empty()),
        };
        assert_eq!(check_review(&status(true, &[AUD], ""), AUD), Ok(()));
        assert_eq!(check_review(&status(true, &[], ""), AUD), Ok(()));
        assert!(check_review(&status(false, &[AUD], ""), AUD)
            .expect_err("unauthenticated")
            .reason
            .contains("not authenticated"));
        assert!(check_review(&status(true, &[AUD], "boom"), AUD)
            .expect_err("error")
            .reason
            .contains("boom"));
        assert!(check_review(&status(true, &["other"], ""), AUD)
            .expect_err("audience")
            .reason
            .contains("audiences"));
    }

    #[test]
    fn rate_limiter_reserves_and_refuses_past_max_wait() {
        assert!(RateLimiter::new(-1.0, 10).is_none());
        let l = RateLimiter::new(1.0, 2).expect("limited");
        let max = Duration::from_secs(3);
        assert_eq!(l.reserve(max), Some(Duration::ZERO));
        assert_eq!(l.reserve(max), Some(Duration::ZERO));
        let w = l.reserve(max).expect("third waits ~1 s");
        assert!(
            w > Duration::from_millis(900) && w <= Duration::from_secs(1),
            "{w:?}"
        );
        let w = l.reserve(max).expect("fourth waits ~2 s");
        assert!(w > Duration::from_millis(1900), "{w:?}");
        let w = l.reserve(max).expect("fifth waits ~3 s");
        assert!(w > Duration::from_millis(2900), "{w:?}");
        assert_eq!(
            l.reserve(max),
            None,
            "past max wait: refused, nothing reserved"
        );
    }
}
