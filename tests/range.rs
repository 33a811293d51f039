//! Range downloads through the whole stack, from every backend: the local directory, the real
//! OCI registry (`docker-registry`) and the Gitea simulator (honouring `Range`, ignoring it,
//! and answering the wrong part). A download resumed at an offset must put the artifact back
//! together byte for byte; a range past the end is a 416; what the service cannot answer as
//! one range (several ranges, a failed `If-Range`) is the whole artifact.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;
#[path = "support/registry/mod.rs"]
mod registry;

use extension_registry::config::Config;
use extension_registry::stack::HttpService;
use gitea_sim::{artifact_bytes, sha256_hex, GiteaSim, Ranges, SimConfig, SimRelease, SimRepo};

use app::{send_with as send, Answer};

async fn ranged(app: &HttpService, uri: &str, range: &str) -> Answer {
    send(app, "GET", uri, &[("range", range)]).await
}

/// Everything a download of `artifact` at `uri` must do with ranges, whichever backend
/// serves it.
async fn check_ranges(app: &HttpService, uri: &str, artifact: &[u8]) {
    let size = artifact.len();
    let etag = format!("\"sha256:{}\"", sha256_hex(artifact));

    // HEAD and a plain GET announce ranges and the strong ETag If-Range is checked against.
    let head = send(app, "HEAD", uri, &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("accept-ranges"), "bytes");
    assert_eq!(head.header("etag"), etag);
    assert_eq!(head.header("content-length"), size.to_string());
    // Range is for GET alone: a HEAD with one describes the whole.
    let head = send(app, "HEAD", uri, &[("range", "bytes=0-9")]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), size.to_string());
    let whole = send(app, "GET", uri, &[]).await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.header("accept-ranges"), "bytes");
    assert_eq!(whole.header("etag"), etag);
    assert!(whole.headers.get("content-range").is_none());
    assert_eq!(&whole.body[..], artifact);
    // A client holding the artifact revalidates it by its digest: 304, as documented.
    for method in ["GET", "HEAD"] {
        let held = send(app, method, uri, &[("if-none-match", &etag)]).await;
        assert_eq!(held.status, 304, "{method}");
        assert_eq!(held.header("etag"), etag);
        assert!(held.body.is_empty());
    }

    // A download cut at k and resumed there puts the artifact back together.
    let k = size / 3;
    let first = ranged(app, uri, &format!("bytes=0-{}", k - 1)).await;
    assert_eq!(first.status, 206, "{:?}", first.body);
    assert_eq!(
        first.header("content-range"),
        format!("bytes 0-{}/{size}", k - 1)
    );
    assert_eq!(first.header("content-length"), k.to_string());
    assert_eq!(first.header("accept-ranges"), "bytes");
    assert_eq!(first.header("etag"), etag);
    assert_eq!(first.header("content-type"), "application/octet-stream");
    assert!(first.headers.get("content-encoding").is_none());
    let rest = ranged(app, uri, &format!("bytes={k}-")).await;
    assert_eq!(rest.status, 206);
    assert_eq!(
        rest.header("content-range"),
        format!("bytes {k}-{}/{size}", size - 1)
    );
    assert_eq!(rest.header("content-length"), (size - k).to_string());
    let joined = [first.body.as_ref(), rest.body.as_ref()].concat();
    assert_eq!(sha256_hex(&joined), sha256_hex(artifact));

    // The end clamped to the artifact, and the last n bytes.
    let tail = ranged(app, uri, &format!("bytes={}-{}", size - 5, size + 100)).await;
    assert_eq!(tail.status, 206);
    assert_eq!(&tail.body[..], &artifact[size - 5..]);
    let suffix = ranged(app, uri, "bytes=-10").await;
    assert_eq!(suffix.status, 206);
    assert_eq!(
        suffix.header("content-range"),
        format!("bytes {}-{}/{size}", size - 10, size - 1)
    );
    assert_eq!(&suffix.body[..], &artifact[size - 10..]);

    // Past the end, and `-0`: 416 with the size, as a JSON error.
    for range in [format!("bytes={size}-"), "bytes=-0".to_owned()] {
        let refused = ranged(app, uri, &range).await;
        assert_eq!(refused.status, 416, "{range}");
        assert_eq!(refused.header("content-range"), format!("bytes */{size}"));
        assert_eq!(refused.json()["error"], "range_not_satisfiable");
    }

    // What is not one byte range is ignored: the whole artifact.
    for range in ["bytes=0-1,5-6", "bytes=9-3", "items=0-1", "bytes=x-"] {
        let answer = ranged(app, uri, range).await;
        assert_eq!(answer.status, 200, "{range}");
        assert_eq!(&answer.body[..], artifact, "{range}");
    }

    // If-Range: the range while the ETag is the artifact's, else the whole.
    let from_k = format!("bytes={k}-");
    let same = send(
        app,
        "GET",
        uri,
        &[("range", from_k.as_str()), ("if-range", etag.as_str())],
    )
    .await;
    assert_eq!(same.status, 206);
    assert_eq!(&same.body[..], &artifact[k..]);
    let other = format!("\"sha256:{}\"", "0".repeat(64));
    let weak = format!("W/{etag}");
    for validator in [
        other.as_str(),
        weak.as_str(),
        "Sat, 01 Nov 2025 00:00:00 GMT",
    ] {
        let changed = send(
            app,
            "GET",
            uri,
            &[("range", from_k.as_str()), ("if-range", validator)],
        )
        .await;
        assert_eq!(changed.status, 200, "{validator}");
        assert_eq!(&changed.body[..], artifact, "{validator}");
    }
}

#[tokio::test]
async fn local_downloads_serve_ranges() {
    let (app, _) = app::sample_app();
    let artifact =
        std::fs::read(app::samples().join("provider/aws/1.1.0/aws-1.1.0.tar.gz")).unwrap();
    assert!(artifact.len() > 30, "the sample is too small to cut");
    check_ranges(&app, "/api/v1/extensions/provider/aws/1.1.0", &artifact).await;
}

/// Deterministic bytes standing in for a `.tar.gz`.
fn tarball(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31)).collect()
}

#[tokio::test]
async fn oci_downloads_pass_ranges_to_the_registry() {
    let reg = registry::Registry::start(registry::Auth::Anonymous).await;
    let artifact = tarball(5000);
    reg.push("provisioning/aws-provider", "1.0.0", &artifact, &[])
        .await;
    let toml = format!(
        "[local]\npath = {:?}\n{}",
        app::samples().display().to_string(),
        reg.oci_toml("provisioning", None)
    );
    let config = Config::parse(&toml, "range.toml", None).unwrap();
    let app = extension_registry::build(&config).unwrap();
    check_ranges(
        &app,
        "/api/v1/extensions/provider/aws/1.0.0?source=oci",
        &artifact,
    )
    .await;
    // The registry itself served the parts (its access log shows 206 answers to blob GETs),
    // rather than the service cutting them from whole blobs.
    let log = std::fs::read_to_string(reg.dir().join("access.log")).unwrap();
    let partial_blobs = log
        .lines()
        .filter(|line| line.contains("/blobs/") && line.contains("\" 206 "))
        .count();
    assert!(partial_blobs >= 5, "{log}");
}

async fn gitea_app(ranges: Ranges, storage_redirect: bool) -> (GiteaSim, HttpService) {
    let mut sim = SimConfig::new("extensions").repo(
        SimRepo::new("aws_prov").release(
            SimRelease::new("1.0.0", 1_735_600_000)
                .artifact("aws")
                .sha256_sidecar(true),
        ),
    );
    sim.ranges = ranges;
    if storage_redirect {
        sim = sim.storage_redirect();
    }
    let sim = GiteaSim::start(sim).await;
    let mut config = app::local_config(&app::samples(), "");
    config.gitea = vec![sim.gitea_config()];
    let app = extension_registry::build(&config).unwrap();
    (sim, app)
}

const GITEA_URI: &str = "/api/v1/extensions/provider/aws/1.0.0?source=gitea";

#[tokio::test]
async fn gitea_downloads_pass_ranges_to_the_asset_host() {
    let artifact = artifact_bytes("aws", "1.0.0");
    for storage_redirect in [false, true] {
        let (sim, app) = gitea_app(Ranges::Honour, storage_redirect).await;
        check_ranges(&app, GITEA_URI, &artifact).await;
        assert!(sim.calls().ranged_downloads > 0);
    }
}

#[tokio::test]
async fn an_asset_host_ignoring_range_gets_the_whole_served_as_a_200() {
    let artifact = artifact_bytes("aws", "1.0.0");
    let (sim, app) = gitea_app(Ranges::Ignore, false).await;
    let answer = ranged(&app, GITEA_URI, "bytes=10-19").await;
    assert_eq!(answer.status, 200);
    assert!(answer.headers.get("content-range").is_none());
    assert_eq!(answer.header("content-length"), artifact.len().to_string());
    assert_eq!(&answer.body[..], &artifact[..]);
    assert_eq!(sim.calls().ranged_downloads, 1);
}

#[tokio::test]
async fn an_asset_host_answering_another_part_never_makes_a_wrong_206() {
    let artifact = artifact_bytes("aws", "1.0.0");
    let (sim, app) = gitea_app(Ranges::OffByOne, false).await;
    let answer = ranged(&app, GITEA_URI, "bytes=10-19").await;
    assert_eq!(answer.status, 200);
    assert!(answer.headers.get("content-range").is_none());
    assert_eq!(&answer.body[..], &artifact[..]);
    // The wrong part was asked for, refused, and the whole asked for again.
    assert_eq!(sim.calls().ranged_downloads, 1);
    assert!(sim.calls().downloads >= 2);
}
