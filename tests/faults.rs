//! The fault matrix (README, "Fault matrix"): the simulated faults the rows are made of.

#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;

use std::time::Duration;

use gitea_sim::fault_modes::{Certificate, Fault};
use gitea_sim::{GiteaSim, SimConfig, SimRelease, SimRepo};

/// How long any request here may take before the test fails.
const PROMPT: Duration = Duration::from_secs(10);
const ORG: &str = "extensions";

/// A simulated instance holding the warm and the cold key.
async fn gitea(sim: SimConfig) -> GiteaSim {
    let repo = |name: &str| {
        SimRepo::new(&format!("{name}_prov"))
            .release(SimRelease::new("1.0.0", 1_735_689_600).artifact(name))
    };
    GiteaSim::start(sim.repo(repo("aws")).repo(repo("gcp"))).await
}

// ---------------------------------------------------------------------------------------------
// The harness itself: each simulated fault is what its row says it is.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_simulated_faults_are_what_they_claim() {
    let sim = gitea(SimConfig::new(ORG)).await;
    let url = format!("{}api/v1/repos/{ORG}/aws_prov", sim.url());
    let http = reqwest::Client::builder()
        .read_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let status_of = |fault| {
        sim.set_fault(fault);
        let request = http.get(&url).send();
        async move { tokio::time::timeout(PROMPT, request).await.unwrap() }
    };

    assert!(status_of(Fault::Delay(Duration::from_secs(60)))
        .await
        .unwrap_err()
        .is_timeout());

    let truncated = status_of(Fault::TruncatedBody).await.unwrap();
    assert_eq!(truncated.status(), 200);
    assert_eq!(truncated.content_length(), Some(4096));
    assert!(truncated.bytes().await.is_err(), "the body is cut short");

    let before = sim.requests_about("aws_prov");
    let looping = status_of(Fault::RedirectLoop).await.unwrap_err();
    assert!(looping.is_redirect(), "{looping}");
    // The first request and reqwest's ten redirects, all to the same place.
    assert_eq!(sim.requests_about("aws_prov") - before, 11);

    let revoked = status_of(Fault::RevokedToken).await.unwrap();
    assert_eq!(revoked.status(), 401);
    for (fault, status) in [
        (Fault::TooManyRequests(120), 429),
        (Fault::Maintenance(90), 503),
    ] {
        let refused = status_of(fault).await.unwrap();
        assert_eq!(refused.status(), status);
        let wait = if status == 429 { "120" } else { "90" };
        assert_eq!(refused.headers()["retry-after"], wait);
    }
    assert_eq!(status_of(Fault::None).await.unwrap().status(), 200);

    // TLS: trusted while the certificate comes from the simulator's CA, refused once it is
    // self-signed; each request is a new connection, so a new handshake.
    let sim = gitea(SimConfig::new(ORG).tls()).await;
    let url = format!("{}api/v1/version", sim.url());
    let ca = reqwest::Certificate::from_pem(sim.ca_pem().as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    for _ in 0..2 {
        assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    }
    sim.present(Certificate::SelfSigned);
    let refused = http.get(&url).send().await.unwrap_err();
    assert!(refused.is_connect(), "{refused:?}");
    assert_eq!(sim.tls_handshakes(), 3);
    assert_eq!(sim.calls().version, 2);
}
