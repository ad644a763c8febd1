//! Spoke's Kubernetes control plane, shared by spoke-server and spoke-agent, on kube-rs
//! (rustls + ring) and k8s-openapi:
//!
//! - [`client`]: one way to build a client: `--kubeconfig` (kube's loader: `exec` and
//!   `auth-provider` credentials, `proxy-url`, token files, client certificates) or, without
//!   it, the in-cluster service account; plus a tower layer that times and counts requests.
//! - [`token_review`]: one TokenReview (agent token authentication on the server).
//! - [`leases`]: upstream's lease-based HA: the server's Lease (create, renew, garbage-collect
//!   expired ones) and the lease counter (a watch, not polling) used by agents and servers.
//! - [`csr`]: agent client certificates from the CertificateSigningRequest API, and the
//!   opt-in approver.
pub mod client;
pub mod csr;
pub mod leases;
pub mod token_review;

pub use k8s_openapi;
pub use kube;

/// `http_response_code`/`http_status_code` and `reason` of a failed API call, as client-go
/// reports them (`APIStatus`): the Status body's code and reason when there is one.
pub fn api_status(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(s) => {
            let reason = if s.reason.is_empty() {
                client::reason_for_code(s.code).to_string()
            } else {
                s.reason.clone()
            };
            Some((s.code, reason))
        }
        _ => None,
    }
}

/// Whether `e` is an API answer with HTTP status `code`.
pub fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The error and its causes on one line (hyper and kube often repeat their cause).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
