//! Building the kube-rs client: configuration loaded as kube loads it (`--kubeconfig`, else the
//! in-cluster service account), rustls with ring, and an optional tower layer that reports each
//! request's method, path, status and latency (the lease metrics are built on it).
use anyhow::{Context, Result};
use futures::future::BoxFuture;
use http::{Method, Request, Response, Uri};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

/// One finished API request as the [`ObserveLayer`] saw it.
#[derive(Debug)]
pub struct Call<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    /// HTTP status; `None` when no answer came (connection refused, TLS, timeout).
    pub code: Option<u16>,
    /// Until the response head (for a watch: until the stream started).
    pub latency: Duration,
}

/// Called once per request.
pub type Observer = Arc<dyn Fn(&Call<'_>) + Send + Sync>;

/// Loads the client configuration: the kubeconfig at `kubeconfig` (its current context) or,
/// when it is empty, the in-cluster service account. `flag` names the flag in errors.
pub async fn load_config(flag: &str, kubeconfig: &str) -> Result<kube::Config> {
    if kubeconfig.is_empty() {
        return kube::Config::incluster()
            .with_context(|| format!("no {flag} given and no in-cluster configuration"));
    }
    let file = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("{flag} {kubeconfig}: cannot read the kubeconfig"))?;
    kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("{flag} {kubeconfig}"))
}

/// A client for `config`, with `observer` (if any) seeing every request.
pub fn build(config: kube::Config, observer: Option<Observer>) -> Result<kube::Client> {
    let builder = kube::client::ClientBuilder::try_from(config)
        .context("cannot build the Kubernetes client (TLS or credentials)")?;
    let client = match observer {
        Some(f) => builder.with_layer(&ObserveLayer(f)).build(),
        None => builder.build(),
    };
    Ok(client)
}

/// [`load_config`] then [`build`]; also returns the API server's URL for logs.
pub async fn connect(
    flag: &str,
    kubeconfig: &str,
    content_type: &str,
    observer: Option<Observer>,
) -> Result<(kube::Client, String)> {
    let mut config = load_config(flag, kubeconfig).await?;
    if content_type != "application/json" && !content_type.is_empty() {
        tracing::debug!(
            content_type,
            "--kube-api-content-type: kube-rs speaks JSON to the API server; the setting is accepted and not used"
        );
    }
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    let url = config.cluster_url.to_string();
    Ok((build(config, observer)?, url))
}

const USER_AGENT: &str = concat!("spoke/", env!("CARGO_PKG_VERSION"));

/// The reason client-go gives an error answer without a Status reason.
pub fn reason_for_code(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

/// Tower layer calling an [`Observer`] for every request.
#[derive(Clone)]
pub struct ObserveLayer(pub Observer);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            observer: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    observer: Observer,
}

impl<S, B, RB> tower::Service<Request<B>> for Observe<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let observer = self.observer.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let rsp = fut.await;
            observer(&Call {
                method: &method,
                uri: &uri,
                code: rsp.as_ref().ok().map(|r| r.status().as_u16()),
                latency: start.elapsed(),
            });
            rsp
        })
    }
}

/// Whether `uri` asks for a watch (`watch=true` or `watch=1`).
pub fn is_watch(uri: &Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1" | "watch=True"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_queries() {
        let u: Uri = "/apis/coordination.k8s.io/v1/namespaces/a/leases?labelSelector=x&watch=true"
            .parse()
            .expect("uri");
        assert!(is_watch(&u));
        let u: Uri = "/apis/coordination.k8s.io/v1/namespaces/a/leases?watchx=true"
            .parse()
            .expect("uri");
        assert!(!is_watch(&u));
        assert_eq!(reason_for_code(409), "Conflict");
    }
}
