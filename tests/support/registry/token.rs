//! A bearer-token server for the registry's `auth: token` mode, in process: hyper on a free
//! loopback port, ES256 JWTs signed by a key whose self-signed certificate the registry trusts
//! (`rootcertbundle`) and which each token carries in its `x5c` header, as distribution 2.8
//! requires. Grants exactly the actions asked for that the account holds, like a strict
//! production token server; optionally only on repositories that exist, as GHCR's does (the
//! registry then answers 401 for a missing repository, even to valid credentials).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// `service` of the registry's token config; every token's `aud`.
pub const SERVICE: &str = "test-registry";
/// `issuer` of the registry's token config; every token's `iss`.
pub const ISSUER: &str = "test-token-issuer";

/// What one account may do.
#[derive(Clone, Debug)]
pub struct Account {
    /// Checked against the basic credentials of a token request.
    pub password: String,
    /// Repository actions granted (`pull`, `push`).
    pub actions: Vec<String>,
    /// Whether `registry:catalog:*` is granted.
    pub catalog: bool,
}

/// The running server; it stops when dropped.
pub struct TokenServer {
    /// Where `/token` is served (the registry's `realm`).
    pub addr: SocketAddr,
    /// PEM of the certificate the registry must trust.
    pub cert_pem: String,
    /// Shared with the connection tasks.
    state: Arc<State>,
    /// The accept loop, aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

struct State {
    /// Signs every token.
    key: EncodingKey,
    /// The certificate of `key`, base64 DER, sent in each token's header.
    x5c: String,
    /// Who may log in and what they may do.
    accounts: HashMap<String, Account>,
    /// Pull granted to requests without credentials.
    anonymous_pull: bool,
    /// `expires_in` of every token.
    lifetime: u64,
    /// Token requests answered 200, so tests can see the client's cache at work.
    issued: AtomicUsize,
    /// When set, token requests are granted nothing on repositories outside `existing`.
    existing_only: AtomicBool,
    /// Repositories that hold a manifest, as the push helper reports them.
    existing: Mutex<HashSet<String>>,
}

#[derive(Serialize)]
struct Access {
    /// `repository` or `registry`.
    #[serde(rename = "type")]
    ty: String,
    /// The repository name, or `catalog`.
    name: String,
    /// Granted actions; may be empty (nothing granted).
    actions: Vec<String>,
}

/// The claims distribution checks: `iss`/`aud` against its config, the time window, and
/// `access` against the request.
#[derive(Serialize)]
struct Claims {
    iss: &'static str,
    sub: String,
    aud: &'static str,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Access>,
}

impl TokenServer {
    pub async fn start(
        accounts: HashMap<String, Account>,
        anonymous_pull: bool,
        lifetime: u64,
    ) -> TokenServer {
        let certified = rcgen::generate_simple_self_signed(vec!["test-token-issuer".to_owned()])
            .expect("token signing certificate");
        let key = EncodingKey::from_ec_pem(certified.signing_key.serialize_pem().as_bytes())
            .expect("token signing key");
        let x5c = base64::engine::general_purpose::STANDARD.encode(certified.cert.der());
        let state = Arc::new(State {
            key,
            x5c,
            accounts,
            anonymous_pull,
            lifetime,
            issued: AtomicUsize::new(0),
            existing_only: AtomicBool::new(false),
            existing: Mutex::new(HashSet::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind token server");
        let addr = listener.local_addr().expect("token server address");
        let served = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = served.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(&req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenServer {
            addr,
            cert_pem: certified.cert.pem(),
            state,
            task,
        }
    }

    /// How many tokens were handed out.
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// A token for `scopes` on behalf of `account`, minted directly (the push helper uses it).
    pub fn mint(&self, account: &str, scopes: &[String]) -> String {
        let grants = self.state.accounts.get(account).cloned();
        self.state.token(account, grants.as_ref(), scopes, false)
    }

    /// From now on, grants nothing on a repository that does not exist, like GHCR.
    pub fn grant_existing_repositories_only(&self) {
        self.state.existing_only.store(true, Ordering::SeqCst);
    }

    /// Records that `repo` exists (holds a manifest).
    pub fn note_repository(&self, repo: &str) {
        let mut existing = self.state.existing.lock().expect("existing repositories");
        existing.insert(repo.to_owned());
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl State {
    fn answer<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.uri().path() != "/token" {
            return reply(StatusCode::NOT_FOUND, "{}".into());
        }
        let query: Vec<(String, String)> = req
            .uri()
            .query()
            .map(|q| {
                reqwest::Url::parse(&format!("http://x/?{q}"))
                    .map(|u| u.query_pairs().into_owned().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let scopes: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.clone())
            .collect();
        let credentials = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|raw| String::from_utf8(raw).ok());
        let (subject, account) =
            match credentials {
                Some(pair) => {
                    let (user, password) = pair.split_once(':').unwrap_or((&pair, ""));
                    match self.accounts.get(user) {
                        Some(account) if account.password == password => {
                            (user.to_owned(), Some(account.clone()))
                        }
                        _ => return reply(
                            StatusCode::UNAUTHORIZED,
                            r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#
                                .into(),
                        ),
                    }
                }
                None => (String::new(), None),
            };
        let existing_only = self.existing_only.load(Ordering::SeqCst);
        let token = self.token(&subject, account.as_ref(), &scopes, existing_only);
        self.issued.fetch_add(1, Ordering::SeqCst);
        let body = serde_json::json!({"token": token, "expires_in": self.lifetime});
        reply(StatusCode::OK, body.to_string())
    }

    fn token(
        &self,
        subject: &str,
        account: Option<&Account>,
        scopes: &[String],
        existing_only: bool,
    ) -> String {
        let exists = |name: &str| {
            let existing = self.existing.lock().expect("existing repositories");
            !existing_only || existing.contains(name)
        };
        let access = scopes
            .iter()
            .filter_map(|scope| {
                let (ty, rest) = scope.split_once(':')?;
                let (name, asked) = rest.rsplit_once(':')?;
                let actions = if ty == "registry" && name == "catalog" {
                    if account.is_some_and(|a| a.catalog) {
                        vec!["*".to_owned()]
                    } else {
                        Vec::new()
                    }
                } else if !exists(name) {
                    Vec::new()
                } else {
                    asked
                        .split(',')
                        .filter(|a| match account {
                            Some(acc) => acc.actions.iter().any(|g| g == a),
                            None => self.anonymous_pull && *a == "pull",
                        })
                        .map(str::to_owned)
                        .collect()
                };
                Some(Access {
                    ty: ty.to_owned(),
                    name: name.to_owned(),
                    actions,
                })
            })
            .collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let claims = Claims {
            iss: ISSUER,
            sub: subject.to_owned(),
            aud: SERVICE,
            exp: now + self.lifetime,
            nbf: now - 10,
            iat: now,
            jti: format!("{now}-{}", self.issued.load(Ordering::SeqCst)),
            access,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.x5c = Some(vec![self.x5c.clone()]);
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign token")
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("token server response")
}
