//! Who may send events: named sources, each with its own secrets.
//!
//! A request proves its source in one of two ways, checked on the raw body before it is parsed:
//! - `Authorization: Bearer <token>`: what a PostHog Webhook destination sends as a custom header;
//! - a Standard Webhooks signature: `webhook-id`, `webhook-timestamp` and `webhook-signature`
//!   (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`), with the timestamp within a tolerance of
//!   now so that a captured request cannot be replayed later.
//!
//! Comparisons take the same time whatever the secret (tokens are compared as SHA-256 digests,
//! signatures with `subtle`). A source may hold several secrets of each kind, so one can be
//! rotated without downtime: add the new one, switch the sender, remove the old one. Secrets are
//! read from environment variables or files, never from the configuration file or a rule file,
//! and are never printed (their `Debug` is redacted).

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

impl SecretRef {
    /// The secret's text, trimmed of surrounding whitespace (a file usually ends in a newline).
    pub fn read(&self) -> Result<String, String> {
        let text = match self {
            SecretRef::Env(name) => std::env::var(name)
                .map_err(|_| format!("the environment variable {name} is not set"))?,
            SecretRef::File(path) => {
                crate::user_file::read_text(path, crate::user_file::SECRET_FILE)
                    .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?
            }
        };
        let text = text.trim().to_string();
        if text.is_empty() {
            return Err(format!("{} is empty", self.describe()));
        }
        Ok(text)
    }

    fn describe(&self) -> String {
        match self {
            SecretRef::Env(name) => format!("the environment variable {name}"),
            SecretRef::File(path) => format!("the secret file {}", path.display()),
        }
    }
}

/// `[sources.NAME]` in `tripline.toml`: where one sender's secrets are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Environment variables holding bearer tokens (two during a rotation).
    #[serde(default)]
    pub bearer_token_env: Vec<String>,
    /// Files holding bearer tokens.
    #[serde(default)]
    pub bearer_token_file: Vec<PathBuf>,
    /// Environment variables holding Standard Webhooks secrets (`whsec_...`).
    #[serde(default)]
    pub signing_secret_env: Vec<String>,
    /// Files holding Standard Webhooks secrets.
    #[serde(default)]
    pub signing_secret_file: Vec<PathBuf>,
    /// Environment variables holding read tokens: they open `/users`, `/aggregates`,
    /// `/explain` and `/status` for this source's rules only (a tenant).
    #[serde(default)]
    pub read_token_env: Vec<String>,
    /// Files holding read tokens.
    #[serde(default)]
    pub read_token_file: Vec<PathBuf>,
}

impl SourceConfig {
    /// Takes the secret files' paths relative to the configuration file's folder.
    pub fn relative_to(&mut self, relative: impl Fn(&Path) -> PathBuf) {
        for p in self
            .bearer_token_file
            .iter_mut()
            .chain(self.signing_secret_file.iter_mut())
            .chain(self.read_token_file.iter_mut())
        {
            *p = relative(p);
        }
    }

    fn tokens(&self) -> impl Iterator<Item = SecretRef> + '_ {
        (self.bearer_token_env.iter().cloned().map(SecretRef::Env))
            .chain(self.bearer_token_file.iter().cloned().map(SecretRef::File))
    }

    fn read_tokens(&self) -> impl Iterator<Item = SecretRef> + '_ {
        (self.read_token_env.iter().cloned().map(SecretRef::Env))
            .chain(self.read_token_file.iter().cloned().map(SecretRef::File))
    }

    fn signing_secrets(&self) -> impl Iterator<Item = SecretRef> + '_ {
        (self.signing_secret_env.iter().cloned().map(SecretRef::Env)).chain(
            self.signing_secret_file
                .iter()
                .cloned()
                .map(SecretRef::File),
        )
    }
}

/// The HMAC key of a Standard Webhooks secret (`whsec_` + base64) read from `from`.
pub fn signing_key(secret: &str, from: &SecretRef) -> Result<Vec<u8>, String> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = BASE64.decode(encoded).map_err(|_| {
        format!(
            "the signing secret in {} is not a Standard Webhooks secret (`whsec_` followed by base64)",
            from.describe()
        )
    })?;
    if key.len() < MIN_SIGNING_KEY_BYTES {
        return Err(format!(
            "the signing secret in {} is too short: it must decode to at least {MIN_SIGNING_KEY_BYTES} bytes",
            from.describe()
        ));
    }
    Ok(key)
}

/// A bearer token must be at least this long: short ones can be guessed.
pub const MIN_TOKEN_CHARS: usize = 16;
/// A signing secret must decode to at least this many bytes (the Standard Webhooks minimum).
pub const MIN_SIGNING_KEY_BYTES: usize = 24;
/// How many `v1,` signatures of one header are tried (a sender signs with one or two keys).
const MAX_SIGNATURES_TRIED: usize = 8;

/// Whether the request carries a sign-in cookie made, less than [`COOKIE_LIFETIME`] before
/// `now_unix`, for a token whose digest is one of `digests`.
fn signed_cookie(headers: &HeaderMap, digests: &[[u8; 32]], now_unix: u64) -> bool {
    let cookies = headers.get_all(axum::http::header::COOKIE).into_iter();
    let values = cookies
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'));
    let mut given = values.filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='));
    given.any(|value| {
        let Some(issued) = value.split('.').next().and_then(|t| t.parse::<u64>().ok()) else {
            return false;
        };
        let fresh = issued <= now_unix && now_unix - issued < COOKIE_LIFETIME.as_secs();
        fresh
            && digests
                .iter()
                .any(|t| bool::from(cookie_value(t, issued).as_bytes().ct_eq(value.as_bytes())))
    })
}

/// A token long enough to be a secret, or why not.
fn check_length(token: &str, from: &SecretRef) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(format!(
            "the token in {} is shorter than {MIN_TOKEN_CHARS} characters; \
             make a long random one, for example with `openssl rand -hex 32`",
            from.describe()
        ));
    }
    Ok(())
}

/// The name of the status page's login cookie.
pub const COOKIE: &str = "tripline_admin";

/// How long the status page's sign-in lasts.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// The sign-in cookie's value for a token whose SHA-256 is `digest`, made at `issued_unix`: the
/// time, and an HMAC-SHA256 of it keyed by the digest. It opens the admin endpoints until
/// [`COOKIE_LIFETIME`] after it was made, and stops with the token.
pub fn cookie_value(digest: &[u8; 32], issued_unix: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(digest).expect("HMAC takes any key length");
    mac.update(issued_unix.to_string().as_bytes());
    let tag: String = (mac.finalize().into_bytes().iter())
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{issued_unix}.{tag}")
}

/// One sender, with its secrets loaded.
pub struct Source {
    pub name: String,
    /// SHA-256 digests of the bearer tokens: compared digest to digest, so every comparison has
    /// the same length and takes the same time.
    tokens: Vec<[u8; 32]>,
    /// HMAC keys (the decoded `whsec_` secrets).
    signing_keys: Vec<Vec<u8>>,
    /// SHA-256 digests of its read tokens (see [`SourceConfig::read_token_env`]).
    read_tokens: Vec<[u8; 32]>,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("tokens", &self.tokens.len())
            .field("signing_keys", &self.signing_keys.len())
            .finish()
    }
}

impl Source {
    /// Reads the secrets `config` points at. Each problem names the variable or file, never the
    /// secret.
    pub fn load(name: &str, config: &SourceConfig) -> Result<Source, String> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "the source name `{name}` may only hold letters, digits, `_` and `-`"
            ));
        }
        let mut source = Source::named(name);
        for r in config.tokens() {
            source.add_token(&r.read()?, &r)?;
        }
        for r in config.read_tokens() {
            let token = r.read()?;
            check_length(&token, &r)?;
            source
                .read_tokens
                .push(Sha256::digest(token.as_bytes()).into());
        }
        for r in config.signing_secrets() {
            source.add_signing_secret(&r.read()?, &r)?;
        }
        if source.tokens.is_empty() && source.signing_keys.is_empty() {
            return Err(format!(
                "the source `{name}` has no secret: give it `bearer_token_env`, `bearer_token_file`, \
                 `signing_secret_env` or `signing_secret_file`"
            ));
        }
        Ok(source)
    }

    /// A source with no secrets yet (for the environment's default source).
    pub fn named(name: &str) -> Source {
        Source {
            name: name.to_string(),
            tokens: Vec::new(),
            signing_keys: Vec::new(),
            read_tokens: Vec::new(),
        }
    }

    /// Adds a bearer token read from `from`.
    pub fn add_token(&mut self, token: &str, from: &SecretRef) -> Result<(), String> {
        check_length(token, from)?;
        self.tokens.push(Sha256::digest(token.as_bytes()).into());
        Ok(())
    }

    /// Whether the request's `Authorization: Bearer` token is one of this source's read tokens.
    pub fn accepts_reader(&self, headers: &HeaderMap) -> bool {
        bearer_token(headers).is_some_and(|token| {
            let digest: [u8; 32] = Sha256::digest(token).into();
            self.read_tokens
                .iter()
                .any(|t| bool::from(t.ct_eq(&digest)))
        })
    }

    /// Adds a Standard Webhooks secret (`whsec_` + base64) read from `from`.
    pub fn add_signing_secret(&mut self, secret: &str, from: &SecretRef) -> Result<(), String> {
        self.signing_keys.push(signing_key(secret, from)?);
        Ok(())
    }

    /// Whether the request's `Authorization: Bearer` token is one of this source's tokens (how
    /// the admin token is checked).
    pub fn accepts_bearer(&self, headers: &HeaderMap) -> bool {
        bearer_token(headers)
            .is_some_and(|token| self.has_token_digest(&Sha256::digest(token).into()))
    }

    /// Whether `token` is one of this source's tokens (the status page's login form).
    pub fn accepts_token(&self, token: &str) -> bool {
        self.has_token_digest(&Sha256::digest(token.as_bytes()).into())
    }

    /// Whether the request carries a status page's sign-in cookie made for one of this
    /// source's tokens less than [`COOKIE_LIFETIME`] before `now_unix` (see [`cookie_value`]).
    /// Every cookie of that name is looked at: another page of the same site may have set one.
    pub fn accepts_cookie(&self, headers: &HeaderMap, now_unix: u64) -> bool {
        signed_cookie(headers, &self.tokens, now_unix)
    }

    /// The same, for a cookie made with one of its read tokens.
    pub fn accepts_reader_cookie(&self, headers: &HeaderMap, now_unix: u64) -> bool {
        signed_cookie(headers, &self.read_tokens, now_unix)
    }

    /// The digests of every token it has, sending and reading.
    pub fn token_digests(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.tokens.iter().chain(&self.read_tokens)
    }

    /// Whether `token` is one of its read tokens (the status page's sign-in form).
    pub fn accepts_read_token(&self, token: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.read_tokens
            .iter()
            .any(|t| bool::from(t.ct_eq(&digest)))
    }

    fn has_token_digest(&self, digest: &[u8; 32]) -> bool {
        self.tokens.iter().any(|t| bool::from(t.ct_eq(digest)))
    }

    /// Whether any token or signing secret was added.
    pub fn has_secrets(&self) -> bool {
        !self.tokens.is_empty() || !self.signing_keys.is_empty()
    }
}

/// Why a request was not accepted as coming from a source. Only logged (at debug level): the
/// sender is told nothing but 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Neither a bearer token nor the three signature headers.
    NoCredentials,
    /// A bearer token that no source has.
    UnknownToken,
    /// A signature header that cannot be read, or a timestamp that is not a number.
    MalformedSignature,
    /// The timestamp is too far from now: possibly a replay.
    StaleTimestamp,
    /// No signature matches any source's secret (wrong secret or changed body).
    BadSignature,
}

impl Refusal {
    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NoCredentials => "no_credentials",
            Refusal::UnknownToken => "unknown_token",
            Refusal::MalformedSignature => "malformed_signature",
            Refusal::StaleTimestamp => "stale_timestamp",
            Refusal::BadSignature => "bad_signature",
        }
    }
}

/// Every configured source.
#[derive(Debug, Default)]
pub struct Sources {
    sources: Vec<Source>,
    tolerance: Duration,
}

impl Sources {
    /// `sources` (each with at least one secret), and how far a signature's timestamp may be
    /// from now.
    pub fn new(sources: Vec<Source>, tolerance: Duration) -> Sources {
        Sources { sources, tolerance }
    }

    /// Every source.
    pub fn all(&self) -> impl Iterator<Item = &Source> {
        self.sources.iter()
    }

    /// The source whose read token the request's bearer token is, or whose status page
    /// sign-in cookie it carries, if one.
    pub fn reader(&self, headers: &HeaderMap, now_unix: u64) -> Option<&str> {
        (self.sources.iter())
            .find(|s| s.accepts_reader(headers) || s.accepts_reader_cookie(headers, now_unix))
            .map(|s| s.name.as_str())
    }

    /// The digest of `token` when it is a source's read token (the sign-in form).
    pub fn read_token(&self, token: &str) -> Option<[u8; 32]> {
        (self.sources.iter().any(|s| s.accepts_read_token(token)))
            .then(|| Sha256::digest(token.as_bytes()).into())
    }

    /// No source: requests are not authenticated (only allowed on loopback).
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The sources' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sources.iter().map(|s| s.name.as_str())
    }

    /// How the request says who sent it, judged from its headers alone.
    pub fn credentials(headers: &HeaderMap) -> Credentials {
        let has = |name: &str| headers.contains_key(name);
        if bearer_token(headers).is_some() {
            Credentials::Bearer
        } else if has("webhook-id") && has("webhook-timestamp") && has("webhook-signature") {
            Credentials::Signature
        } else {
            Credentials::None
        }
    }

    /// The source whose bearer token the request carries: decided from the headers, before any
    /// of the body is read.
    pub fn bearer(&self, headers: &HeaderMap) -> Result<&Source, Refusal> {
        let token = bearer_token(headers).ok_or(Refusal::NoCredentials)?;
        let digest: [u8; 32] = Sha256::digest(token).into();
        self.sources
            .iter()
            .find(|s| s.has_token_digest(&digest))
            .ok_or(Refusal::UnknownToken)
    }

    /// The source whose Standard Webhooks secret signed this request's headers and raw body, and
    /// the delivery's `webhook-id`. `now_unix` is the current time, for the signature's
    /// timestamp.
    pub fn signed<'h>(
        &self,
        headers: &'h HeaderMap,
        body: &[u8],
        now_unix: i64,
    ) -> Result<(&Source, &'h str), Refusal> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(id), Some(timestamp), Some(signatures)) = (
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
        ) else {
            return Err(Refusal::NoCredentials);
        };
        let sent: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| Refusal::MalformedSignature)?;
        if now_unix.abs_diff(sent) > self.tolerance.as_secs() {
            return Err(Refusal::StaleTimestamp);
        }
        let given: Vec<Vec<u8>> = signatures
            .split_whitespace()
            .filter_map(|s| s.strip_prefix("v1,"))
            .take(MAX_SIGNATURES_TRIED)
            .filter_map(|s| BASE64.decode(s).ok())
            .collect();
        if given.is_empty() {
            return Err(Refusal::MalformedSignature);
        }
        self.sources
            .iter()
            .find(|source| {
                source.signing_keys.iter().any(|key| {
                    let expected = sign(key, id, timestamp.trim(), body);
                    given
                        .iter()
                        .any(|g| bool::from(g.as_slice().ct_eq(&expected)))
                })
            })
            .map(|source| (source, id))
            .ok_or(Refusal::BadSignature)
    }
}

/// What a request carries to say who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    Bearer,
    Signature,
    None,
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
}

/// The Standard Webhooks HMAC-SHA256 of `id.timestamp.body` under `key`.
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn sources(token: Option<&str>, whsec: Option<&str>) -> Sources {
        let mut s = Source::named("posthog");
        let from = SecretRef::Env("TEST".into());
        if let Some(t) = token {
            s.add_token(t, &from).unwrap();
        }
        if let Some(w) = whsec {
            s.add_signing_secret(w, &from).unwrap();
        }
        Sources::new(vec![s], Duration::from_secs(300))
    }

    /// The source of a request, as the server decides it: by bearer token if there is one, else
    /// by signature.
    fn authenticate<'s>(
        sources: &'s Sources,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<&'s Source, Refusal> {
        match Sources::credentials(headers) {
            Credentials::Bearer => sources.bearer(headers),
            _ => sources.signed(headers, body, now).map(|(s, _)| s),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// The test vector of the Standard Webhooks specification.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn spec_headers(signature: &str) -> HeaderMap {
        headers(&[
            ("webhook-id", SPEC_ID),
            ("webhook-timestamp", &SPEC_TIMESTAMP.to_string()),
            ("webhook-signature", signature),
        ])
    }

    #[test]
    fn the_specification_test_vector_verifies() {
        let s = sources(None, Some(SPEC_SECRET));
        let ok = authenticate(&s, &spec_headers(SPEC_SIGNATURE), SPEC_BODY, SPEC_TIMESTAMP);
        assert_eq!(ok.unwrap().name, "posthog");
        // Several signatures, one of them right (a sender rotating its key).
        let two = format!("v1,AAAA {SPEC_SIGNATURE}");
        assert!(authenticate(&s, &spec_headers(&two), SPEC_BODY, SPEC_TIMESTAMP).is_ok());
    }

    #[test]
    fn a_changed_body_a_stale_timestamp_or_a_bad_header_is_refused() {
        let s = sources(None, Some(SPEC_SECRET));
        let h = spec_headers(SPEC_SIGNATURE);
        assert_eq!(
            authenticate(&s, &h, br#"{"test": 2432232315}"#, SPEC_TIMESTAMP).unwrap_err(),
            Refusal::BadSignature
        );
        assert_eq!(
            authenticate(&s, &h, SPEC_BODY, SPEC_TIMESTAMP + 301).unwrap_err(),
            Refusal::StaleTimestamp
        );
        assert_eq!(
            authenticate(&s, &h, SPEC_BODY, SPEC_TIMESTAMP - 301).unwrap_err(),
            Refusal::StaleTimestamp
        );
        assert!(authenticate(&s, &h, SPEC_BODY, SPEC_TIMESTAMP + 300).is_ok());
        assert_eq!(
            authenticate(&s, &spec_headers("v2,abc"), SPEC_BODY, SPEC_TIMESTAMP).unwrap_err(),
            Refusal::MalformedSignature
        );
        assert_eq!(
            authenticate(&s, &HeaderMap::new(), SPEC_BODY, SPEC_TIMESTAMP).unwrap_err(),
            Refusal::NoCredentials
        );
    }

    #[test]
    fn bearer_tokens_match_exactly_and_either_of_two_works() {
        let mut s = Source::named("posthog");
        let from = SecretRef::Env("TEST".into());
        s.add_token("old-token-0123456789", &from).unwrap();
        s.add_token("new-token-0123456789", &from).unwrap();
        let s = Sources::new(vec![s], Duration::from_secs(300));
        for token in ["old-token-0123456789", "new-token-0123456789"] {
            let h = headers(&[("authorization", &format!("Bearer {token}"))]);
            assert!(authenticate(&s, &h, b"", 0).is_ok(), "{token}");
        }
        for wrong in [
            "Bearer old-token-012345678",
            "Bearer old-token-01234567890",
            "Basic old-token-0123456789",
            "Bearer",
        ] {
            let h = headers(&[("authorization", wrong)]);
            assert!(authenticate(&s, &h, b"", 0).is_err(), "{wrong}");
        }
        let lower = headers(&[("authorization", "bearer new-token-0123456789")]);
        assert!(authenticate(&s, &lower, b"", 0).is_ok());
    }

    #[test]
    fn weak_secrets_are_refused_at_start_up_without_showing_them() {
        let mut s = Source::named("x");
        let from = SecretRef::Env("X_TOKEN".into());
        let e = s.add_token("short", &from).unwrap_err();
        assert!(e.contains("X_TOKEN") && !e.contains("short\""), "{e}");
        let e = s
            .add_signing_secret("whsec_not base64!", &from)
            .unwrap_err();
        assert!(e.contains("not a Standard Webhooks secret"), "{e}");
        let e = s.add_signing_secret("whsec_c2hvcnQ=", &from).unwrap_err();
        assert!(e.contains("too short"), "{e}");
        assert!(Source::load("bad name", &SourceConfig::default()).is_err());
    }
}
