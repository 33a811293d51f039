//! HTTP towards one Gitea/Forgejo instance: the token only on the API calls the backend builds
//! and on a release asset's own download routes, re-checked on every redirect hop; pagination
//! by `Link: rel="next"`; bodies read with a cap; and the mapping of statuses and bodies to the
//! domain's errors.

use bytes::Bytes;
use percent_encoding::percent_decode_str;
use reqwest::header::{HeaderMap, HeaderValue, LINK};
use reqwest::{Method, Response, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::model::AssetLink;
use crate::backend::http::{
    is_html, next_link, range_headers, read_capped, send_per_hop, throttled, transport_error,
    MAX_METADATA_BYTES,
};
use crate::registry::{RegistryError, Source, Span};

/// Items per page. Gitea's default cap (`MAX_RESPONSE_ITEMS`); a lower cap cuts it silently,
/// which is harmless as pagination follows the server's `Link`, not our arithmetic.
const PAGE_LIMIT: &str = "50";

/// Largest checksum file read. A `.sha256` file is one line (~100 bytes) and a `SHA256SUMS`
/// line about 70 bytes plus the file name, so 64 KiB holds the sums of several hundred files,
/// far more than a release carries; anything larger is not a checksum file, and reading it
/// would only spend memory.
const MAX_SIDECAR_BYTES: usize = 64 * 1024;

/// Most pages one list may have: 10,000 repositories or releases at Gitea's default 50 a page,
/// the same number of items the GitHub backend's bound allows. A `Link` chain longer than this
/// (an instance that always names a next page) is refused rather than followed forever.
const MAX_PAGES: u64 = 200;

/// Most bytes of JSON read over all the pages of one list. Gitea answers about 3 KB of JSON per
/// repository (with its owner, permissions and settings) and about as much per release with a
/// few assets and short notes, so this holds the 10,000 items [`MAX_PAGES`] lets through; the
/// pages alone, each up to [`MAX_METADATA_BYTES`], would let one list hold over 3 GiB.
const MAX_LIST_BYTES: usize = 32 * 1024 * 1024;

fn unavailable(reason: impl Into<String>) -> RegistryError {
    RegistryError::unavailable(Source::Gitea, reason)
}

/// Which URLs a request may carry the token to, on its first hop and on every redirect.
#[derive(Clone, Copy, Debug)]
enum Grant<'a> {
    /// An API call the backend builds: the token goes to API routes of those shapes, for the
    /// configured organization, on the instance.
    Api,
    /// A release asset: the token goes only to that asset's own download routes on the
    /// instance, `{org}/{repo}/releases/download/{tag}/{name}` and `attachments/{uuid}`.
    Asset(&'a AssetLink),
}

/// One instance, reached through one client.
pub struct Api {
    /// The shared client (connect and read timeouts); it follows no redirect, [`Api::get`]
    /// does, checking each hop.
    http: reqwest::Client,
    /// `ROOT_URL`, ending in `/`; also the one origin the token may be sent to.
    root: Url,
    /// The organization holding the extension repositories: the only owner whose API routes
    /// and release assets the token is sent to.
    org: String,
    /// `token <PAT>`, marked sensitive so it is never printed; `None` is anonymous.
    authorization: Option<HeaderValue>,
}

impl Api {
    pub fn new(
        http: reqwest::Client,
        root: Url,
        org: String,
        authorization: Option<HeaderValue>,
    ) -> Self {
        Self {
            http,
            root,
            org,
            authorization,
        }
    }

    /// The organization holding the extension repositories.
    pub fn org(&self) -> &str {
        &self.org
    }

    /// `{ROOT_URL}api/v1/<segments>`, each segment percent-encoded.
    fn api_url(&self, segments: &[&str]) -> Url {
        let mut url = self.root.clone();
        // Always `Ok`: the configured URL was checked to be http(s).
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["api", "v1"]).extend(segments);
        }
        url
    }

    /// Whether the token may go with a request to `url` under `grant`. A download URL is
    /// written by whoever publishes a release (Forgejo's external assets are free-form links)
    /// and a redirect by whoever answers, so anything but the instance's API routes the backend
    /// calls and the asset's own download routes (another repository's archive, raw file or
    /// asset; another asset's attachment) must not be fetched with the service's token.
    fn carries_token(&self, url: &Url, grant: Grant<'_>) -> bool {
        if url.origin() != self.root.origin()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return false;
        }
        let Some(rest) = url.path().strip_prefix(self.root.path()) else {
            return false;
        };
        let decoded: Option<Vec<String>> = rest
            .split('/')
            .map(|s| {
                percent_decode_str(s)
                    .decode_utf8()
                    .ok()
                    .map(|s| s.into_owned())
            })
            .collect();
        let Some(decoded) = decoded else {
            return false;
        };
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let org = |o: &str| o.eq_ignore_ascii_case(&self.org);
        match grant {
            Grant::Api => match segments.as_slice() {
                ["api", "v1", "version"] => true,
                ["api", "v1", "orgs", o, "repos"] => org(o),
                ["api", "v1", "repos", o, _]
                | ["api", "v1", "repos", o, _, "releases"]
                | ["api", "v1", "repos", o, _, "releases", "tags", _] => org(o),
                _ => false,
            },
            Grant::Asset(asset) => {
                url.query().is_none()
                    && match segments.as_slice() {
                        [o, repo, "releases", "download", tag, name] => {
                            org(o)
                                && repo.eq_ignore_ascii_case(&asset.repo)
                                && *tag == asset.tag
                                && *name == asset.name
                        }
                        ["attachments", uuid] => asset.uuid.as_deref() == Some(*uuid),
                        _ => false,
                    }
            }
        }
    }

    /// Sends a GET with `headers` (on every hop), following its redirects with the token only
    /// on the hops [`Api::carries_token`] accepts under `grant`.
    async fn get(
        &self,
        first: Url,
        grant: Grant<'_>,
        headers: &HeaderMap,
    ) -> Result<Response, RegistryError> {
        send_per_hop(
            &self.http,
            &Method::GET,
            first,
            headers,
            self.authorization.as_ref(),
            |url| self.carries_token(url, grant),
        )
        .await
        .map_err(|e| e.into_registry_error(Source::Gitea))
    }

    /// One JSON object; `Ok(None)` when Gitea answers 404 (missing, or private and not
    /// visible to us).
    pub async fn object<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        what: &str,
    ) -> Result<Option<T>, RegistryError> {
        let response = self
            .get(self.api_url(segments), Grant::Api, &HeaderMap::new())
            .await?;
        match api_status(response, what)? {
            Some(response) => decode(response, what).await.map(Some),
            None => Ok(None),
        }
    }

    /// Every item of a paginated list, following `rel="next"` until it is absent (a short page
    /// does not mean the end), at most [`MAX_PAGES`] pages and [`MAX_LIST_BYTES`] of JSON in
    /// all; `Ok(None)` on 404.
    pub async fn pages<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        what: &str,
    ) -> Result<Option<Vec<T>>, RegistryError> {
        let mut all = Vec::new();
        let mut page: u64 = 1;
        let mut budget = MAX_LIST_BYTES;
        let mut read: u64 = 0;
        loop {
            read += 1;
            let mut url = self.api_url(segments);
            url.query_pairs_mut()
                .append_pair("limit", PAGE_LIMIT)
                .append_pair("page", &page.to_string());
            let Some(response) =
                api_status(self.get(url, Grant::Api, &HeaderMap::new()).await?, what)?
            else {
                return Ok(None);
            };
            // Only the page number is taken from the link: its host is the server's own idea
            // of ROOT_URL, which the token must not follow if it differs from ours.
            let next = match response
                .headers()
                .get(LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_link)
            {
                None => None,
                Some(_) if read >= MAX_PAGES => {
                    return Err(unavailable(format!(
                        "{what}: pagination passes {MAX_PAGES} pages"
                    )))
                }
                Some(link) => match page_of(link) {
                    Some(n) if n > page => Some(n),
                    _ => {
                        return Err(unavailable(format!(
                            "{what}: pagination link does not lead to a later page"
                        )))
                    }
                },
            };
            let bytes = read_json(response, budget.min(MAX_METADATA_BYTES))
                .await?
                .ok_or_else(|| {
                    unavailable(if budget < MAX_METADATA_BYTES {
                        format!("{what}: the pages are larger than {MAX_LIST_BYTES} bytes in all")
                    } else {
                        format!("{what}: larger than {MAX_METADATA_BYTES} bytes")
                    })
                })?;
            budget -= bytes.len();
            all.extend(parse::<Vec<T>>(&bytes, what)?);
            match next {
                Some(n) => page = n,
                None => return Ok(Some(all)),
            }
        }
    }

    /// Starts the download of a release asset, or of the bytes `span` names of it: a 2xx
    /// answer that is not an HTML page (a sign-in page is what an instance requiring sign-in
    /// ends on), else an error.
    pub async fn download(
        &self,
        asset: &AssetLink,
        span: Option<Span>,
        what: &str,
    ) -> Result<Response, RegistryError> {
        let url = Url::parse(&asset.url)
            .map_err(|_| unavailable(format!("{what}: the download URL is not a URL")))?;
        let response = self
            .get(url, Grant::Asset(asset), &range_headers(span))
            .await?;
        let status = response.status();
        if !status.is_success() {
            if let Some(throttled) = throttled(Source::Gitea, &response, what) {
                return Err(throttled);
            }
            return Err(match status {
                StatusCode::UNAUTHORIZED => RegistryError::auth_failed(Source::Gitea),
                _ => unavailable(format!("{what}: download answered HTTP {status}")),
            });
        }
        if is_html(&response) {
            return Err(unavailable(format!(
                "{what}: the download ended on an HTML page (a sign-in page?) instead of the file"
            )));
        }
        Ok(response)
    }

    /// The text of a small asset (a checksum file), read whole up to a cap.
    pub async fn small_text(&self, asset: &AssetLink, what: &str) -> Result<String, RegistryError> {
        let response = self.download(asset, None, what).await?;
        let bytes = read_capped(response, MAX_SIDECAR_BYTES)
            .await
            .map_err(|e| transport_error(Source::Gitea, &e))?
            .ok_or_else(|| unavailable(format!("{what}: larger than {MAX_SIDECAR_BYTES} bytes")))?;
        String::from_utf8(bytes.into()).map_err(|_| unavailable(format!("{what}: not UTF-8 text")))
    }
}

/// Maps an API answer: 2xx passes, 404 is `None`, everything else an error naming `what`.
fn api_status(response: Response, what: &str) -> Result<Option<Response>, RegistryError> {
    let status = response.status();
    if let Some(throttled) = throttled(Source::Gitea, &response, what) {
        return Err(throttled);
    }
    match status {
        s if s.is_success() => Ok(Some(response)),
        StatusCode::NOT_FOUND => Ok(None),
        // A wrong token gets 401 on every route, public ones too.
        StatusCode::UNAUTHORIZED => Err(RegistryError::auth_failed(Source::Gitea)),
        StatusCode::FORBIDDEN => Err(unavailable(format!(
            "{what}: HTTP 403 (the token lacks a scope, or the instance requires sign-in)"
        ))),
        _ => Err(unavailable(format!("{what}: HTTP {status}"))),
    }
}

/// Parses a JSON answer read whole, up to [`MAX_METADATA_BYTES`].
async fn decode<T: DeserializeOwned>(response: Response, what: &str) -> Result<T, RegistryError> {
    let bytes = read_json(response, MAX_METADATA_BYTES)
        .await?
        .ok_or_else(|| unavailable(format!("{what}: larger than {MAX_METADATA_BYTES} bytes")))?;
    parse(&bytes, what)
}

/// An answer's bytes, read whole up to `cap`; `None` when it is larger.
async fn read_json(response: Response, cap: usize) -> Result<Option<Bytes>, RegistryError> {
    read_capped(response, cap)
        .await
        .map_err(|e| transport_error(Source::Gitea, &e))
}

/// Parses JSON. What the parser says about the bytes is logged (with the request's id), not
/// returned: it may quote them.
fn parse<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| {
        tracing::warn!(%what, error = %e, "gitea answered malformed or unexpected JSON");
        unavailable(format!("{what}: malformed or unexpected JSON"))
    })
}

/// The `page` query parameter of a link.
fn page_of(link: &str) -> Option<u64> {
    let url = Url::parse(link).ok()?;
    let page = url
        .query_pairs()
        .find(|(k, _)| k == "page")
        .and_then(|(_, v)| v.parse().ok());
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_next_in_giteas_link_order() {
        let h = "<https://h/git/api/v1/orgs/o/repos?limit=50&page=3>; rel=\"next\",<https://h/git/api/v1/orgs/o/repos?limit=50&page=5>; rel=\"last\",<https://h/git/api/v1/orgs/o/repos?limit=50&page=1>; rel=\"first\"";
        assert_eq!(next_link(h).and_then(page_of), Some(3));
        let last_page = "<https://h/a?page=1>; rel=\"first\",<https://h/a?page=4>; rel=\"prev\"";
        assert_eq!(next_link(last_page), None);
        assert_eq!(
            next_link("<https://h/a?page=2>; rel=next"),
            Some("https://h/a?page=2")
        );
        assert_eq!(page_of("https://h/a?limit=50"), None);
    }

    fn api(root: &str) -> Api {
        Api::new(
            reqwest::Client::new(),
            Url::parse(root).unwrap(),
            "o".into(),
            None,
        )
    }

    #[test]
    fn the_token_goes_only_to_the_api_calls_the_backend_builds() {
        let api = api("https://h.test/git/");
        let carries = |u: &str| api.carries_token(&Url::parse(u).unwrap(), Grant::Api);
        assert!(carries(
            "https://h.test/git/api/v1/orgs/o/repos?limit=50&page=2"
        ));
        assert!(carries("https://h.test/git/api/v1/orgs/O/repos"));
        assert!(carries("https://h.test/git/api/v1/repos/o/aws_prov"));
        assert!(carries(
            "https://h.test/git/api/v1/repos/o/aws_prov/releases?page=1"
        ));
        assert!(carries(
            "https://h.test/git/api/v1/repos/o/aws_prov/releases/tags/v1.0%2Frc%201"
        ));
        assert!(carries("https://h.test/git/api/v1/version"));
        for refused in [
            "https://h.test/git/api/v1/repos/other/aws_prov/releases/tags/v1.0.0",
            "https://h.test/git/api/v1/repos/o/aws_prov/releases/tags/v1.0.0/assets",
            "https://h.test/git/api/v1/repos/o/secret/archive/main.tar.gz",
            "https://h.test/git/api/v1/repos/o/secret/raw/README.md",
            "https://h.test/git/api/v1/repos/o/secret/media/x",
            "https://h.test/git/api/v1/repos/other/aws_prov/releases",
            "https://h.test/git/api/v1/orgs/other/repos",
            "https://h.test/git/api/v1/user",
            "https://h.test/git/o/aws_prov/releases/download/1.0.0/aws.tar.gz",
            "https://h.test/git/user/settings",
            "https://h.test/elsewhere/api/v1/version",
            "https://h.test:8443/git/api/v1/version",
            "http://h.test/git/api/v1/version",
            "https://storage.test/git/api/v1/version",
            "https://u:p@h.test/git/api/v1/version",
        ] {
            assert!(!carries(refused), "{refused}");
        }
    }

    #[test]
    fn the_token_goes_only_to_the_assets_own_download_routes() {
        let api = api("https://h.test/git/");
        let asset = AssetLink {
            url: String::new(),
            repo: "aws_prov".into(),
            tag: "v1.0/rc 1".into(),
            name: "aws 1.tar.gz".into(),
            uuid: Some("8f14e45f-ceea-467f-a0e6-3a1b2c9d7e11".into()),
            stamp: None,
        };
        let carries = |u: &str| api.carries_token(&Url::parse(u).unwrap(), Grant::Asset(&asset));
        assert!(carries(
            "https://h.test/git/o/aws_prov/releases/download/v1.0%2Frc%201/aws%201.tar.gz"
        ));
        assert!(carries(
            "https://h.test/git/attachments/8f14e45f-ceea-467f-a0e6-3a1b2c9d7e11"
        ));
        for refused in [
            // Another repository's asset, archive or API route of the same instance.
            "https://h.test/git/o/secret_prov/releases/download/v1.0%2Frc%201/aws%201.tar.gz",
            "https://h.test/git/other/aws_prov/releases/download/v1.0%2Frc%201/aws%201.tar.gz",
            "https://h.test/git/o/aws_prov/releases/download/v2/aws%201.tar.gz",
            "https://h.test/git/o/aws_prov/releases/download/v1.0%2Frc%201/other.tar.gz",
            "https://h.test/git/o/aws_prov/releases/download/v1.0/rc%201/aws%201.tar.gz",
            "https://h.test/git/o/aws_prov/archive/main.tar.gz",
            "https://h.test/git/api/v1/repos/o/secret/archive/main.tar.gz",
            "https://h.test/git/attachments/00000000-0000-0000-0000-000000000000",
            "https://h.test/git/o/aws_prov/releases/download/v1.0%2Frc%201/aws%201.tar.gz?x=1",
            "https://storage.test/git/attachments/8f14e45f-ceea-467f-a0e6-3a1b2c9d7e11",
        ] {
            assert!(!carries(refused), "{refused}");
        }
    }

    #[test]
    fn api_urls_keep_the_sub_path_and_encode_pieces() {
        let api = api("https://h/git/");
        assert_eq!(
            api.api_url(&["repos", "o", "a/b?c"]).as_str(),
            "https://h/git/api/v1/repos/o/a%2Fb%3Fc"
        );
    }
}
