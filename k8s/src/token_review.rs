//! One TokenReview (`authentication.k8s.io/v1`): what spoke-server's agent token
//! authentication asks the API server. The policy (who may connect) stays in spoke-server.
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use std::time::Duration;

/// Why a review got no answer to judge.
#[derive(Debug)]
pub enum ReviewError {
    /// No answer within the bound.
    Timeout(Duration),
    /// The API server answered with an error status.
    Api { code: u16, message: String },
    /// No answer: connection, TLS, credentials of the client itself.
    Transport(String),
    /// An answer that is not a TokenReview.
    Invalid(String),
}

/// Posts a TokenReview of `token` for `audiences`, bounded by `timeout`.
pub async fn review(
    client: &kube::Client,
    token: &str,
    audiences: &[String],
    timeout: Duration,
) -> Result<TokenReviewStatus, ReviewError> {
    let api: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(audiences.to_vec()),
        },
        ..Default::default()
    };
    let answer = tokio::time::timeout(timeout, api.create(&PostParams::default(), &review))
        .await
        .map_err(|_| ReviewError::Timeout(timeout))?;
    match answer {
        Ok(r) => Ok(r.status.unwrap_or_default()),
        Err(kube::Error::Api(s)) => Err(ReviewError::Api {
            code: s.code,
            message: s.message.clone(),
        }),
        Err(kube::Error::SerdeError(e)) => Err(ReviewError::Invalid(e.to_string())),
        Err(e) => Err(ReviewError::Transport(crate::error_chain(&e))),
    }
}
