//! HTTP towards one Gitea/Forgejo instance: the token on calls to that instance only, pagination
//! by `Link: rel="next"`, and the mapping of statuses and bodies to the domain's errors.

use reqwest::header::{HeaderValue, AUTHORIZATION, LINK};
use reqwest::{Response, StatusCode, Url};
use serde::de::DeserializeOwned;

use crate::backend::http::{is_html, next_link, throttled, transport_error};
use crate::registry::{RegistryError, Source};

/// Items per page. Gitea's default cap (`MAX_RESPONSE_ITEMS`); a lower cap cuts it silently,
/// which is harmless as pagination follows the server's `Link`, not our arithmetic.
const PAGE_LIMIT: &str = "50";

/// Largest checksum file read, so a wrong asset cannot make us buffer an artifact.
const MAX_SIDECAR_BYTES: usize = 1 << 20;

fn unavailable(reason: String) -> RegistryError {
    RegistryError::unavailable(Source::Gitea, reason)
}

/// One instance, reached through one client.
pub struct Api {
    /// The shared client (connect and read timeouts, redirect policy).
    http: reqwest::Client,
    /// `ROOT_URL`, ending in `/`; also the one origin the token may be sent to.
    root: Url,
    /// `token <PAT>`, marked sensitive so it is never printed; `None` is anonymous.
    authorization: Option<HeaderValue>,
}

impl Api {
    pub fn new(http: reqwest::Client, root: Url, authorization: Option<HeaderValue>) -> Self {
        Self {
            http,
            root,
            authorization,
        }
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

    /// Whether the token may go with a request to `url`: only to the configured instance, and
    /// there only to the API and to release assets. A download URL is written by whoever
    /// publishes a release (Forgejo's external assets are free-form links), so a link to any
    /// other page of the instance must not be fetched with the service's token.
    fn carries_token(&self, url: &Url) -> bool {
        if url.origin() != self.root.origin() {
            return false;
        }
        let Some(rest) = url.path().strip_prefix(self.root.path()) else {
            return false;
        };
        let mut segments = rest.split('/');
        let release_asset = matches!(
            (
                segments.next(),
                segments.next(),
                segments.next(),
                segments.next()
            ),
            (Some(_), Some(_), Some("releases"), Some("download"))
        );
        rest.starts_with("api/v1/") || rest.starts_with("attachments/") || release_asset
    }

    /// Sends a GET, with the token only where [`Api::carries_token`] allows it.
    async fn get(&self, url: Url) -> Result<Response, RegistryError> {
        let mut request = self.http.get(url.clone());
        if let Some(value) = &self.authorization {
            if self.carries_token(&url) {
                request = request.header(AUTHORIZATION, value.clone());
            }
        }
        request
            .send()
            .await
            .map_err(|e| transport_error(Source::Gitea, &e))
    }

    /// One JSON object; `Ok(None)` when Gitea answers 404 (missing, or private and not
    /// visible to us).
    pub async fn object<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        what: &str,
    ) -> Result<Option<T>, RegistryError> {
        let response = self.get(self.api_url(segments)).await?;
        match api_status(response, what)? {
            Some(response) => decode(response, what).await.map(Some),
            None => Ok(None),
        }
    }

    /// Every item of a paginated list, following `rel="next"` until it is absent (a short page
    /// does not mean the end); `Ok(None)` on 404.
    pub async fn pages<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        what: &str,
    ) -> Result<Option<Vec<T>>, RegistryError> {
        let mut all = Vec::new();
        let mut page: u64 = 1;
        loop {
            let mut url = self.api_url(segments);
            url.query_pairs_mut()
                .append_pair("limit", PAGE_LIMIT)
                .append_pair("page", &page.to_string());
            let Some(response) = api_status(self.get(url).await?, what)? else {
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
                Some(link) => match page_of(link) {
                    Some(n) if n > page => Some(n),
                    _ => {
                        return Err(unavailable(format!(
                            "{what}: pagination link does not lead to a later page"
                        )))
                    }
                },
            };
            all.extend(decode::<Vec<T>>(response, what).await?);
            match next {
                Some(n) => page = n,
                None => return Ok(Some(all)),
            }
        }
    }

    /// Starts a download: a 2xx answer that is not an HTML page (a sign-in page is what an
    /// instance requiring sign-in ends on), else an error.
    pub async fn download(&self, url: &str, what: &str) -> Result<Response, RegistryError> {
        let url = Url::parse(url)
            .map_err(|_| unavailable(format!("{what}: the download URL is not a URL")))?;
        let response = self.get(url).await?;
        let status = response.status();
        if !status.is_success() {
            if let Some(throttled) = throttled(Source::Gitea, &response, what) {
                return Err(throttled);
            }
            return Err(match status {
                StatusCode::UNAUTHORIZED => RegistryError::BackendAuthFailed {
                    backend: Source::Gitea,
                },
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
    pub async fn small_text(&self, url: &str, what: &str) -> Result<String, RegistryError> {
        let mut response = self.download(url, what).await?;
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport_error(Source::Gitea, &e))?
        {
            if bytes.len() + chunk.len() > MAX_SIDECAR_BYTES {
                return Err(unavailable(format!(
                    "{what}: larger than {MAX_SIDECAR_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        String::from_utf8(bytes).map_err(|_| unavailable(format!("{what}: not UTF-8 text")))
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
        StatusCode::UNAUTHORIZED => Err(RegistryError::BackendAuthFailed {
            backend: Source::Gitea,
        }),
        StatusCode::FORBIDDEN => Err(unavailable(format!(
            "{what}: HTTP 403 (the token lacks a scope, or the instance requires sign-in)"
        ))),
        _ => Err(unavailable(format!("{what}: HTTP {status}"))),
    }
}

async fn decode<T: DeserializeOwned>(response: Response, what: &str) -> Result<T, RegistryError> {
    let bytes = response
        .bytes()
        .await
        .map_err(|e| transport_error(Source::Gitea, &e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| unavailable(format!("{what}: malformed or unexpected JSON ({e})")))
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

    #[test]
    fn the_token_goes_only_to_the_api_and_release_assets_of_the_instance() {
        let api = Api::new(
            reqwest::Client::new(),
            Url::parse("https://h.test/git/").unwrap(),
            None,
        );
        let carries = |u: &str| api.carries_token(&Url::parse(u).unwrap());
        assert!(carries("https://h.test/git/api/v1/orgs/o/repos"));
        assert!(carries(
            "https://h.test/git/o/aws_prov/releases/download/1.0.0/aws.tar.gz"
        ));
        assert!(carries("https://h.test/git/attachments/0b6a1c2e"));
        assert!(!carries(
            "https://h.test/git/o/private_repo/archive/main.tar.gz"
        ));
        assert!(!carries("https://h.test/git/user/settings"));
        assert!(!carries("https://h.test/elsewhere/api/v1/x"));
        assert!(!carries("https://h.test:8443/git/api/v1/x"));
        assert!(!carries("http://h.test/git/api/v1/x"));
        assert!(!carries("https://storage.test/git/api/v1/x"));
    }

    #[test]
    fn api_urls_keep_the_sub_path_and_encode_pieces() {
        let api = Api::new(
            reqwest::Client::new(),
            Url::parse("https://h/git/").unwrap(),
            None,
        );
        assert_eq!(
            api.api_url(&["repos", "o", "a/b?c"]).as_str(),
            "https://h/git/api/v1/repos/o/a%2Fb%3Fc"
        );
    }
}
