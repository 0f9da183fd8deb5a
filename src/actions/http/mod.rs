//! The `[http]` action: fill in a request from an event, queue it, deliver it to an endpoint
//! the operator declared (Slack, Mailgun, any webhook).
//!
//! A rule names an endpoint of `tripline.toml` (`endpoint = "slack"`), never an address, so rule
//! files cannot send events anywhere the operator did not choose. The request is filled in when
//! the rule acts, queued in the same transaction as the decision, and delivered by the outbox
//! with retries that survive restarts; the body is stored as it will be sent, so that every
//! attempt sends the same bytes with the same `Idempotency-Key`.
//!
//! - `mod.rs`: the `[http]` table, its compile, and the request an event becomes.
//! - `body.rs`: `json` and `form` bodies: templates, and values that keep their type.
//! - `endpoint.rs`: `[endpoints.NAME]` in `tripline.toml`, with its secrets.
//! - `send.rs`: delivery (reqwest), and what each answer means.

pub mod body;
pub mod endpoint;
pub mod send;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::sync::Arc;
use toml::Spanned;

use super::{Action, Compile, Delivery, Destinations, Input, Kind, Output, Sender};
use crate::actions::email::template_check::Known;
use crate::diag::did_you_mean;
use crate::store::queue::read_payload;
use body::{Part, Written};

/// The kind's name, as its table is written.
pub const KIND: &str = "http";

/// The `[http]` kind.
pub struct Http;

/// `[http]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// The name of an endpoint declared in `tripline.toml` (`[endpoints.NAME]`).
    pub endpoint: Spanned<String>,
    /// `POST` (the default) or `PUT`.
    #[serde(default)]
    pub method: Option<Spanned<String>>,
    /// Added to the endpoint's address; may use `{{...}}` fields, each segment percent-encoded.
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// A JSON body: a table whose strings are templates.
    #[serde(default)]
    pub json: Option<Spanned<Written>>,
    /// A form body (`application/x-www-form-urlencoded`, what Mailgun takes).
    #[serde(default)]
    pub form: Option<Spanned<Written>>,
}

/// How the body is made.
#[derive(Debug)]
enum Body {
    Json(Part),
    Form(Vec<(String, Part)>),
}

/// A compiled `[http]` table.
#[derive(Debug)]
pub struct HttpAction {
    endpoint: String,
    method: Method,
    /// The path's segments, each a template, and where the path is written.
    path: Vec<Part>,
    body: Body,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Post,
    Put,
}

/// A request as queued: everything the sender needs, except the endpoint's address and secrets
/// (read from the settings when it is sent, so that a rotated secret applies to it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub endpoint: String,
    pub method: Method,
    /// Path segments added to the endpoint's address, not yet percent-encoded.
    pub path: Vec<String>,
    pub content_type: String,
    pub body: String,
    /// The same for every attempt: derived from the rule and the event.
    pub idempotency_key: String,
}

impl Kind for Http {
    type Config = HttpConfig;

    fn compile(config: Spanned<HttpConfig>, cx: &mut Compile) -> Option<Box<dyn Action>> {
        let table_span = config.span();
        let h = config.into_inner();
        let endpoint = h.endpoint.get_ref().clone();
        if !cx.declared.endpoints.contains(&endpoint) {
            let hint = match did_you_mean(&endpoint, cx.declared.endpoints.iter().map(String::as_str)) {
                Some(close) => format!("did you mean \"{close}\"?"),
                None if cx.declared.endpoints.is_empty() => "no endpoint is declared: the operator declares them in tripline.toml as [endpoints.NAME], and the commands read that file when given --config tripline.toml".into(),
                None => format!("the endpoints declared in tripline.toml are: {}", cx.declared.endpoints.iter().cloned().collect::<Vec<_>>().join(", ")),
            };
            cx.problems.add(
                h.endpoint.span(),
                format!("there is no endpoint \"{endpoint}\""),
                Some(hint),
            );
        }
        let method = match h.method.as_ref().map(|m| m.get_ref().to_ascii_uppercase()) {
            None => Method::Post,
            Some(m) if m == "POST" => Method::Post,
            Some(m) if m == "PUT" => Method::Put,
            Some(_) => {
                let span = h.method.as_ref().map_or(0..0, Spanned::span);
                cx.problems
                    .add(span, "`method` must be \"POST\" or \"PUT\"", None);
                Method::Post
            }
        };
        let mut c = body::Compiler {
            prefix: format!("rule:{}:http", cx.rule),
            cx,
            next: 0,
        };
        let path = match &h.path {
            Some(path) => path_segments(path.get_ref())
                .into_iter()
                .filter_map(|segment| {
                    let key = c.template(&segment, path.span(), "`path`")?;
                    Some(Part::Text {
                        key,
                        span: path.span(),
                    })
                })
                .collect(),
            None => Vec::new(),
        };
        let body = match (h.json, h.form) {
            (Some(json), None) => c.json(json).map(Body::Json),
            (None, Some(form)) => c.form(form).map(Body::Form),
            (Some(_), Some(form)) => {
                c.cx.problems.add(form.span(), "give `json` or `form`, not both", None);
                None
            }
            (None, None) => {
                c.cx.problems.add(
                    table_span,
                    "[http] has no body",
                    Some("add json = { text = \"...\" } (or form = { ... } for a form)".into()),
                );
                None
            }
        }?;
        Some(Box::new(HttpAction {
            endpoint,
            method,
            path,
            body,
        }))
    }

    fn sender(to: &Destinations) -> anyhow::Result<Option<Arc<dyn Sender>>> {
        Ok(Some(match to {
            Destinations::Settings(settings) => Arc::new(send::HttpSender::new(
                settings.endpoints.clone(),
            )?),
            Destinations::Files(dir) => Arc::new(send::IntoFiles::new(dir)?),
        }))
    }
}

/// The segments of a `path` as written, split at each `/` outside `{{...}}`; empty ones (a
/// leading or doubled `/`) are left out.
fn path_segments(path: &str) -> Vec<String> {
    let mut segments = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut rest = path;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("{{") {
            depth += 1;
        } else if rest.starts_with("}}") && depth > 0 {
            depth -= 1;
        }
        let step = if rest.starts_with("{{") || rest.starts_with("}}") { 2 } else { c.len_utf8() };
        if c == '/' && depth == 0 {
            segments.push(std::mem::take(&mut current));
        } else {
            current.push_str(&rest[..step]);
        }
        rest = &rest[step..];
    }
    segments.push(current);
    segments.retain(|s| !s.is_empty());
    segments
}

impl HttpAction {
    /// The request's `Idempotency-Key`: the same for the same rule and event, whatever the
    /// attempt or the process (events without a uuid are known by their content).
    fn idempotency_key(&self, input: &Input) -> String {
        let mut hasher = Sha256::new();
        hasher.update(input.rule.as_bytes());
        hasher.update([0]);
        match input.event.uuid.as_str() {
            Some(uuid) => hasher.update(uuid.as_bytes()),
            None => hasher.update(input.event.template_context().to_string().as_bytes()),
        }
        let digest = hasher.finalize();
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Action for HttpAction {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn run(&self, input: &Input) -> Result<Output, String> {
        let data = input.template_data();
        let rendering = input.templates.rendering(&data);
        let fail = |e: String| format!("request not sent: {e}");
        let mut path = Vec::with_capacity(self.path.len());
        for part in &self.path {
            let segment = match part.render(&rendering, &data).map_err(fail)? {
                Value::String(s) => s,
                other => other.to_string(),
            };
            // A URL parser drops tabs and line breaks, so "..\t" would climb out of the
            // endpoint's path: such a segment is refused, not cleaned. The message does not
            // repeat it: it is event data.
            if segment.is_empty()
                || segment == "."
                || segment == ".."
                || segment.chars().any(char::is_control)
            {
                return Err(fail(
                    "a part of `path` came out empty, as `.` or `..`, or with a control character, which cannot be part of an address".into(),
                ));
            }
            path.push(segment);
        }
        let (content_type, body) = match &self.body {
            Body::Json(part) => (
                "application/json",
                part.render(&rendering, &data).map_err(fail)?.to_string(),
            ),
            Body::Form(fields) => (
                "application/x-www-form-urlencoded",
                body::render_form(fields, &rendering, &data).map_err(fail)?,
            ),
        };
        let request = Request {
            endpoint: self.endpoint.clone(),
            method: self.method,
            path,
            content_type: content_type.into(),
            body,
            idempotency_key: self.idempotency_key(input),
        };
        Ok(Output::Delivery(request.into_delivery()))
    }

    fn summary(&self) -> Value {
        json!({"kind": KIND, "endpoint": self.endpoint, "method": self.method})
    }

    fn check(&self, known: &Known, cx: &mut Compile) {
        let mut templates: Vec<(&str, &Range<usize>)> = Vec::new();
        self.path.iter().for_each(|p| p.templates(&mut templates));
        match &self.body {
            Body::Json(part) => part.templates(&mut templates),
            Body::Form(fields) => fields.iter().for_each(|(_, p)| p.templates(&mut templates)),
        }
        for (key, span) in templates {
            cx.check_inline_template(key, span, known);
        }
    }

    fn delivered(&self) -> bool {
        true
    }
}

impl Request {
    /// A delivery in its endpoint's own lane: each endpoint has its own bound on requests at
    /// once.
    pub fn into_delivery(self) -> Delivery {
        let endpoint = self.endpoint.clone();
        Delivery::new(KIND, endpoint.clone(), Some(endpoint), &self)
    }

    /// The request a delivery holds, if it is one.
    pub fn of(delivery: &Delivery) -> Option<Request> {
        if delivery.kind != KIND {
            return None;
        }
        Request::from_payload(&delivery.payload).ok()
    }

    /// The request a stored payload holds.
    pub fn from_payload(payload: &serde_json::Map<String, Value>) -> serde_json::Result<Request> {
        read_payload(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_splits_at_slashes_outside_fields() {
        assert_eq!(
            path_segments("/v3/{{properties.[a/b]}}/messages/"),
            ["v3", "{{properties.[a/b]}}", "messages"]
        );
        assert_eq!(path_segments(""), Vec::<String>::new());
    }
}
