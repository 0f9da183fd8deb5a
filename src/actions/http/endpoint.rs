//! `[endpoints.NAME]` in `tripline.toml`: where HTTP deliveries may go, declared by the operator.
//!
//! A rule names an endpoint and never an address, so a rule file cannot send events anywhere the
//! operator did not choose. Secrets (a URL with a token in it, a bearer token, a password, a
//! signing secret) come from environment variables or files, never from the configuration file;
//! they are read once at start, and never stored with the deliveries (a delivery holds the
//! endpoint's name, so a rotated secret applies to deliveries already queued).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use indexmap::IndexMap;
use reqwest::Url;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ingest::auth::{SecretRef, signing_key};
use crate::units::parse_duration;

/// `[endpoints.NAME]`, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The address deliveries go to (a rule's `path` is added to it).
    pub url: Option<String>,
    /// An environment variable holding the address, for one that is a secret itself (a Slack
    /// incoming-webhook URL).
    pub url_env: Option<String>,
    /// A file holding the address.
    pub url_file: Option<PathBuf>,
    /// Headers sent with every delivery (not secrets: those have keys of their own).
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// An environment variable holding a token sent as `Authorization: Bearer <token>`.
    pub bearer_env: Option<String>,
    /// A file holding that token.
    pub bearer_file: Option<PathBuf>,
    /// The user name of HTTP basic authentication (Mailgun's is `api`).
    pub user: Option<String>,
    /// An environment variable holding the basic-authentication password.
    pub password_env: Option<String>,
    /// A file holding that password.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding a Standard Webhooks secret (`whsec_...`): every delivery
    /// is then signed (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    pub signing_secret_env: Option<String>,
    /// A file holding that secret.
    pub signing_secret_file: Option<PathBuf>,
    /// How long one attempt may take, connecting and the answer together ("10s").
    pub timeout: Option<String>,
    /// Attempts to this endpoint at once.
    pub max_in_flight: Option<usize>,
    /// How long a delivery is retried before it fails for good ("1 day").
    pub max_age: Option<String>,
}

/// The headers tripline sets itself, which `headers` may not change.
const OWN_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "content-length",
    "host",
    "idempotency-key",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// The most attempts one endpoint may have at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// The longest `timeout`: a longer one would hold the endpoint's slots (and a stop of the
/// service's sender) for no good reason.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// One endpoint, with its secrets read.
pub struct Endpoint {
    pub name: String,
    /// The address (possibly a secret: never shown).
    pub url: Url,
    /// `headers`, and the authorization, sent with every delivery.
    pub headers: HeaderMap,
    /// The Standard Webhooks key, decoded.
    pub signing_key: Option<Vec<u8>>,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub max_age: Duration,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("signed", &self.signing_key.is_some())
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

/// Every declared endpoint, by name.
pub type Endpoints = IndexMap<String, Endpoint>;

/// The secret of a pair of `_env` / `_file` keys, if either is given.
fn secret(
    what: &str,
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<(String, SecretRef)>, String> {
    let place = match (env, file) {
        (Some(_), Some(_)) => {
            return Err(format!("give `{what}_env` or `{what}_file`, not both"));
        }
        (Some(name), None) => SecretRef::Env(name.clone()),
        (None, Some(path)) => SecretRef::File(path.clone()),
        (None, None) => return Ok(None),
    };
    Ok(Some((place.read()?, place)))
}

/// Whether `name` may name an endpoint (or a source): letters, digits, `_` and `-`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl EndpointConfig {
    /// Takes the secret files' paths relative to the configuration file's folder.
    pub fn relative_to(&mut self, relative: impl Fn(&Path) -> PathBuf) {
        for p in [
            &mut self.url_file,
            &mut self.bearer_file,
            &mut self.password_file,
            &mut self.signing_secret_file,
        ]
        .into_iter()
        .flatten()
        {
            *p = relative(p);
        }
    }
}

impl Endpoint {
    /// Checks `config` and reads its secrets. Each problem names the key, the variable or the
    /// file, never a secret.
    pub fn load(name: &str, config: &EndpointConfig) -> Result<Endpoint, String> {
        if !is_valid_name(name) {
            return Err(format!(
                "the endpoint name `{name}` may only hold letters, digits, `_` and `-`"
            ));
        }
        let url = match (&config.url, secret("url", &config.url_env, &config.url_file)?) {
            (Some(_), Some(_)) => return Err("give `url` or `url_env` (or `url_file`), not both".into()),
            (Some(url), None) => {
                let parsed = parse_url(url)?;
                if !parsed.username().is_empty() || parsed.password().is_some() {
                    return Err("`url` holds a user name or password, which are secrets: give them as `user` and `password_env`".into());
                }
                parsed
            }
            // Not quoted in the message: it may be a secret.
            (None, Some((url, _))) => parse_url(&url)
                .map_err(|_| "the address in `url_env` (or `url_file`) is not an http:// or https:// URL".to_string())?,
            (None, None) => return Err(format!("the endpoint `{name}` has no address: give it `url`, `url_env` or `url_file`")),
        };
        let mut headers = HeaderMap::new();
        for (key, value) in &config.headers {
            let header = HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| format!("`{key}` is not a header name"))?;
            if OWN_HEADERS.contains(&header.as_str()) {
                return Err(format!(
                    "the header `{key}` is set by tripline (authorization has `bearer_env` and `user` + `password_env`)"
                ));
            }
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("the value of the header `{key}` cannot be sent (line breaks or control characters)"))?;
            headers.insert(header, value);
        }
        let bearer = secret("bearer", &config.bearer_env, &config.bearer_file)?.map(|s| s.0);
        let password = secret("password", &config.password_env, &config.password_file)?.map(|s| s.0);
        let authorization = match (bearer, &config.user, password) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err("give a bearer token or a user and password, not both".into());
            }
            (Some(token), None, None) => Some(format!("Bearer {token}")),
            (None, Some(user), Some(password)) => {
                Some(format!("Basic {}", BASE64.encode(format!("{user}:{password}"))))
            }
            (None, Some(_), None) => {
                return Err("`user` needs `password_env` or `password_file`".into());
            }
            (None, None, Some(_)) => return Err("a password needs `user`".into()),
            (None, None, None) => None,
        };
        if let Some(authorization) = authorization {
            let mut value = HeaderValue::from_str(&authorization)
                .map_err(|_| "the token or password holds characters a header cannot".to_string())?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let signing_key =
            match secret("signing_secret", &config.signing_secret_env, &config.signing_secret_file)? {
                Some((secret, from)) => Some(signing_key(&secret, &from)?),
                None => None,
            };
        let duration = |key: &str, text: &Option<String>, default: Duration| match text {
            Some(text) => parse_duration(text)
                .map_err(|e| format!("`{key}`: {e}"))
                .and_then(|d| {
                    if d.is_zero() {
                        Err(format!("`{key}` must be longer than 0"))
                    } else {
                        Ok(d)
                    }
                }),
            None => Ok(default),
        };
        let timeout = duration("timeout", &config.timeout, Duration::from_secs(10))?;
        if timeout > MAX_TIMEOUT {
            return Err(format!(
                "`timeout` may be at most {}",
                crate::units::format_duration(MAX_TIMEOUT)
            ));
        }
        let max_in_flight = config.max_in_flight.unwrap_or(4);
        if !(1..=MAX_IN_FLIGHT).contains(&max_in_flight) {
            return Err(format!("`max_in_flight` must be from 1 to {MAX_IN_FLIGHT}"));
        }
        Ok(Endpoint {
            name: name.to_string(),
            url,
            headers,
            signing_key,
            timeout,
            max_in_flight,
            max_age: duration("max_age", &config.max_age, Duration::from_secs(86_400))?,
        })
    }
}

fn parse_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text.trim()).map_err(|e| format!("`url` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err("`url` must start with http:// or https://".into());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> Result<Endpoint, String> {
        Endpoint::load("e", &toml::from_str(toml).unwrap())
    }

    #[test]
    fn an_endpoint_needs_one_address_and_keeps_secrets_out_of_the_file() {
        assert!(load("url = \"https://hooks.example.com/x\"").is_ok());
        let e = load("").unwrap_err();
        assert!(e.contains("has no address"), "{e}");
        let e = load("url = \"ftp://x\"").unwrap_err();
        assert!(e.contains("http://"), "{e}");
        let e = load("url = \"https://u:p@x.example.com\"").unwrap_err();
        assert!(e.contains("password_env"), "{e}");
        let e = load("url = \"https://x\"\nheaders = { Authorization = \"Bearer x\" }").unwrap_err();
        assert!(e.contains("set by tripline"), "{e}");
        let e = load("url = \"https://x\"\nurl_env = \"TRIPLINE_TEST_NO_SUCH_VAR\"").unwrap_err();
        assert!(e.contains("is not set") || e.contains("not both"), "{e}");
        let e = load("url = \"https://x\"\nuser = \"api\"").unwrap_err();
        assert!(e.contains("password_env"), "{e}");
        let e = load("url = \"https://x\"\nmax_in_flight = 0").unwrap_err();
        assert!(e.contains("max_in_flight"), "{e}");
        let e = load("url = \"https://x\"\ntimeout = \"soon\"").unwrap_err();
        assert!(e.contains("timeout"), "{e}");
        let e = load("url = \"https://x\"\ntimeout = \"1h\"").unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn basic_authentication_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "key-123\n").unwrap();
        let config = EndpointConfig {
            url: Some("https://api.mailgun.net".into()),
            user: Some("api".into()),
            password_file: Some(password),
            ..EndpointConfig::default()
        };
        let e = Endpoint::load("mailgun", &config).unwrap();
        assert_eq!(
            e.headers[AUTHORIZATION],
            format!("Basic {}", BASE64.encode("api:key-123"))
        );
        assert_eq!(
            (e.timeout, e.max_in_flight, e.max_age),
            (Duration::from_secs(10), 4, Duration::from_secs(86_400))
        );
        assert!(!format!("{e:?}").contains("key-123"));
    }
}
