//! Registry identity tokens: the OAuth2 refresh tokens that `docker login`
//! keeps for some registries (Azure Container Registry among them) and
//! kubelet passes from an imagePullSecret as `AuthConfig.identity_token`.
//!
//! oci-client asks token services only anonymously or with a password, so
//! the exchange is here, as the distribution spec's OAuth2 token flow has
//! it: the registry's `/v2/` names its token service in a Bearer
//! challenge; a POST of the refresh token to that service
//! (`grant_type=refresh_token`) answers an access token for the
//! repository, which the pull then sends as a registry token. The
//! challenge is parsed by `http-auth`, the crate oci-client uses for it.
//!
//! The refresh token is a long-lived secret: it goes only to the token
//! service the image's own registry names, and over plain HTTP only when
//! that service's host is one the registry config allows plain HTTP for.

use std::time::Duration;

use http_auth::ChallengeParser;
use serde::Deserialize;

use super::pull::PullError;

/// Who we are to the token service (OAuth2 `client_id`).
const CLIENT_ID: &str = "carapace";

/// The token service a registry's Bearer challenge names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
}

/// The Bearer challenge among those of a `WWW-Authenticate` header.
pub fn bearer_challenge(header: &str) -> Option<Challenge> {
    ChallengeParser::new(header).find_map(|c| {
        let c = c.ok()?;
        if !c.scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let param = |name: &str| {
            c.params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_unescaped())
        };
        Some(Challenge {
            realm: param("realm")?,
            service: param("service"),
        })
    })
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    access_token: String,
    /// What older token services call it.
    #[serde(default)]
    token: String,
}

/// Exchanges `identity_token` for an access token to pull `repository`
/// from the registry at `base` (`http[s]://host[:port]`). `plain_http_ok`
/// says whether a `host[:port]` may be reached over plain HTTP. `None`:
/// the registry wants no token (the pull goes on anonymously).
pub async fn access_token(
    base: &str,
    repository: &str,
    identity_token: &str,
    plain_http_ok: impl Fn(&str) -> bool,
) -> Result<Option<String>, PullError> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| PullError::Unavailable(format!("HTTP client: {e}")))?;
    let unavailable =
        |what: &str, e: reqwest::Error| PullError::Unavailable(format!("{what}: {e}"));

    let probe = client
        .get(format!("{base}/v2/"))
        .send()
        .await
        .map_err(|e| unavailable(&format!("reaching {base}/v2/"), e))?;
    if probe.status().is_success() {
        return Ok(None);
    }
    let challenge = probe
        .headers()
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(bearer_challenge)
        .ok_or_else(|| {
            PullError::Unauthenticated(format!(
                "registry {base} names no token service (no Bearer challenge), which an identity token needs"
            ))
        })?;
    let realm = reqwest::Url::parse(&challenge.realm).map_err(|e| {
        PullError::InvalidContent(format!(
            "registry {base} named a token service that is not a URL ({:?}: {e})",
            challenge.realm
        ))
    })?;
    let realm_host = match (realm.host_str(), realm.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => String::new(),
    };
    match realm.scheme() {
        "https" => {}
        "http" if plain_http_ok(&realm_host) => {}
        _ => {
            return Err(PullError::Unauthenticated(format!(
                "registry {base} named the token service {realm}; an identity token goes only over HTTPS, or plain HTTP to a host the registry config allows it for"
            )))
        }
    }

    let scope = format!("repository:{repository}:pull");
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", identity_token),
        ("client_id", CLIENT_ID),
        ("scope", &scope),
    ];
    if let Some(service) = &challenge.service {
        form.push(("service", service));
    }
    let answer = client
        .post(realm.clone())
        .form(&form)
        .send()
        .await
        .map_err(|e| unavailable(&format!("reaching the token service {realm}"), e))?;
    let status = answer.status();
    let body = answer
        .bytes()
        .await
        .map_err(|e| unavailable(&format!("reading the token service {realm}"), e))?;
    if status == reqwest::StatusCode::UNAUTHORIZED
        || status == reqwest::StatusCode::FORBIDDEN
        || status == reqwest::StatusCode::BAD_REQUEST
    {
        return Err(PullError::Unauthenticated(format!(
            "the token service {realm} refused the identity token (HTTP {status}; check the pod's imagePullSecrets)"
        )));
    }
    if !status.is_success() {
        return Err(PullError::Unavailable(format!(
            "the token service {realm} answered HTTP {status}"
        )));
    }
    let parsed: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
        PullError::InvalidContent(format!("the token service {realm} answered no token: {e}"))
    })?;
    let token = if parsed.access_token.is_empty() {
        parsed.token
    } else {
        parsed.access_token
    };
    if token.is_empty() {
        return Err(PullError::InvalidContent(format!(
            "the token service {realm} answered an empty token"
        )));
    }
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_challenge_is_found_among_others() {
        let c = bearer_challenge(
            r#"Basic realm="x", Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
            }
        );
        assert_eq!(bearer_challenge(r#"Basic realm="registry""#), None);
        assert_eq!(bearer_challenge(r#"Bearer service="no realm""#), None);
        assert_eq!(bearer_challenge("%%% not a challenge"), None);
    }

    #[tokio::test]
    async fn a_token_service_over_plain_http_elsewhere_never_gets_the_token() {
        // A registry whose challenge names a plain-HTTP token service on a
        // host not allowed plain HTTP: refused before anything is sent.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let posts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = posts.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if buf[..n].starts_with(b"POST") {
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let head = "HTTP/1.1 401 X\r\nWWW-Authenticate: Bearer realm=\"http://auth.invalid/token\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                let _ = s.write_all(head.as_bytes()).await;
            }
        });
        let err = access_token(&format!("http://{host}"), "a/b", "secret", |h| h == host)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, PullError::Unauthenticated(m) if m.contains("only over HTTPS")),
            "{err:?}"
        );
        assert_eq!(posts.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
