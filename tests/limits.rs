//! The limits that keep a hostile client from holding the service's resources: HEAD of a
//! download answered from metadata without opening a stream.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;
#[path = "support/registry/mod.rs"]
mod registry;

use extension_registry::config::Config;

#[tokio::test]
async fn head_of_a_gitea_download_answers_from_metadata_without_opening_the_stream() {
    use gitea_sim::{artifact_bytes, sha256_hex, GiteaSim, SimConfig, SimRelease, SimRepo};
    let sim = GiteaSim::start(
        SimConfig::new("extensions").repo(
            SimRepo::new("aws_prov").release(
                SimRelease::new("1.0.0", 1_735_689_600)
                    .artifact("aws")
                    .sha256_sidecar(true),
            ),
        ),
    )
    .await;
    let toml = format!(
        "[gitea]\nurl = {:?}\norganization = \"extensions\"\n",
        sim.url()
    );
    let config = Config::parse(&toml, "test.toml", None).unwrap();
    let app = extension_registry::build(&config).unwrap();
    let bytes = artifact_bytes("aws", "1.0.0");
    let path = "/api/v1/extensions/provider/aws/1.0.0";

    let head = app::send(&app, "HEAD", path).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), bytes.len().to_string());
    assert_eq!(head.header("repr-digest"), repr_digest(&sha256_hex(&bytes)));
    assert!(head
        .header("content-disposition")
        .contains("aws-1.0.0.tar.gz"));
    // The checksum sidecar was read; the artifact was not.
    assert_eq!(sim.calls().downloads, 1);

    let get = app::get(&app, path).await;
    assert_eq!(get.body, bytes);
    assert_eq!(get.header("content-length"), bytes.len().to_string());
    assert_eq!(get.header("repr-digest"), head.header("repr-digest"));
    assert!(sim.calls().downloads >= 2);
}

#[tokio::test]
async fn head_of_an_oci_download_answers_from_the_manifest_without_fetching_the_blob() {
    use registry::{Auth, Registry};
    let reg = Registry::start(Auth::Anonymous).await;
    let artifact = vec![42u8; 5000];
    let pushed = reg
        .push("provisioning/aws-provider", "1.2.0", &artifact, &[])
        .await;
    let config = Config::parse(&reg.oci_toml("provisioning", None), "t.toml", None).unwrap();
    let app = extension_registry::build(&config).unwrap();
    let path = "/api/v1/extensions/provider/aws/1.2.0";
    let blob_fetches = || {
        reg.requests()
            .iter()
            .filter(|line| line.contains(&format!("/blobs/{}", pushed.layer)))
            .count()
    };

    let pushing = blob_fetches();
    let head = app::send(&app, "HEAD", path).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), "5000");
    let hex = pushed.layer.strip_prefix("sha256:").unwrap();
    assert_eq!(head.header("repr-digest"), repr_digest(hex));
    assert_eq!(blob_fetches(), pushing);

    let get = app::get(&app, path).await;
    assert_eq!(get.body, artifact);
    assert_eq!(get.header("content-length"), "5000");
    assert_eq!(blob_fetches(), pushing + 1);
}

/// RFC 9530 `Repr-Digest` for a sha256 in hex.
fn repr_digest(hex: &str) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}
