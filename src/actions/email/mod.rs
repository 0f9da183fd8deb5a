//! The `[email]` action: render an email from templates, queue it, deliver it.
//!
//! Rendering is strict: a field the event lacks, or a `to` that is not an address, fails the
//! email with a reason instead of sending something half filled; so does a template that would
//! cost more than the bounds of `templates.rs` allow. Rendered emails are queued in the durable
//! outbox, and `send.rs` delivers them (SMTP, or `.eml` files).
//!
//! - `mod.rs`: the `[email]` table, its compile, and rendering an event into an email.
//! - `templates.rs`: the templates folder, compiled, and rendering within bounds.
//! - `template_check.rs`: what templates use, checked when rules load.
//! - `send.rs`: delivery.

pub mod send;
pub mod template_check;
pub mod templates;

use lettre::Message;
use lettre::message::{Mailbox, MultiPart};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::ops::Range;
use std::sync::{Arc, LazyLock};
use toml::Spanned;

use super::{Action, Compile, Delivery, Destinations, Input, Kind, Output, Sender};
use crate::store::queue::read_payload;
use crate::diag::did_you_mean;
use template_check::{Known, Place};
use templates::{ReferenceKind, Templates, template_diagnostic};

/// The kind's name, as its table is written.
pub const KIND: &str = "email";

/// The `[email]` kind.
pub struct Email;

/// `[email]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Recipient address; may use `{{...}}` fields.
    pub to: Spanned<String>,
    /// Subject line; may use `{{...}}` fields.
    pub subject: Spanned<String>,
    /// Name of the body template: `templates/<name>.text.hbs` (and optional `.html.hbs`).
    pub template: Spanned<String>,
    /// Sender address; the server's `--email-from` when absent.
    #[serde(default)]
    pub from: Option<Spanned<String>>,
}

/// A compiled `[email]` table. The `to` and `subject` lines are registered in the rule set's
/// templates under the keys held here.
#[derive(Debug, Clone)]
pub struct EmailAction {
    pub template: String,
    pub to_key: String,
    pub subject_key: String,
    pub from: Option<Mailbox>,
    /// Where `to` and `subject` are in the rule file, to point at them.
    spans: [Range<usize>; 2],
}

impl Kind for Email {
    type Config = EmailConfig;

    fn compile(config: Spanned<EmailConfig>, cx: &mut Compile) -> Option<Box<dyn Action>> {
        let e = config.into_inner();
        let template = e.template.get_ref().clone();
        if !cx.templates.has_body(&template) {
            if cx.templates.file_of(&template, false).is_some() {
                cx.problems.add(
                    e.template.span(),
                    format!("the template \"{template}\" cannot be used: {template}.text.hbs has a problem"),
                    Some("see the problem reported for that file".into()),
                );
            } else {
                let hint = match did_you_mean(&template, cx.templates.body_names()) {
                    Some(close) => format!("did you mean \"{close}\"?"),
                    None => {
                        let names: Vec<&str> = cx.templates.body_names().collect();
                        if names.is_empty() {
                            "the templates folder has no templates yet".into()
                        } else {
                            format!("the templates that exist are: {}", names.join(", "))
                        }
                    }
                };
                cx.problems.add(
                    e.template.span(),
                    format!("there is no template \"{template}\": tripline looked for {template}.text.hbs in the templates folder"),
                    Some(hint),
                );
            }
        }
        let to_key = inline_key(cx.rule, "to");
        let subject_key = inline_key(cx.rule, "subject");
        for (key, text, what) in [
            (&to_key, &e.to, "`to`"),
            (&subject_key, &e.subject, "`subject`"),
        ] {
            if let Err(err) = cx.templates.add_inline(key, text.get_ref()) {
                let d = template_diagnostic(cx.problems.file, cx.problems.source, &err);
                cx.problems
                    .add(text.span(), format!("{what}: {}", d.message), d.hint);
            }
        }
        let from = match &e.from {
            Some(from) => {
                match from.get_ref().parse() {
                    Ok(m) => Some(m),
                    Err(_) => {
                        cx.problems.add(
                        from.span(),
                        "`from` is not an email address",
                        Some("write from = \"Growth team <growth@example.com>\" or just the address".into()),
                    );
                        None
                    }
                }
            }
            None => None,
        };
        // Returned even with problems (which keep the rule from loading), so that its
        // templates are checked too and every problem shows at once.
        Some(Box::new(EmailAction {
            template,
            to_key,
            subject_key,
            from,
            spans: [e.to.span(), e.subject.span()],
        }))
    }

    fn sender(to: &Destinations) -> anyhow::Result<Option<Arc<dyn Sender>>> {
        let transport = match to {
            Destinations::Settings(settings) => send::Transport::from_config(settings)?,
            Destinations::Files(dir) => send::Transport::files_in(dir)?,
        };
        Ok(Some(Arc::new(transport)))
    }
}

/// The key under which a rule's `to` or `subject` line is registered as a template.
fn inline_key(rule: &str, part: &str) -> String {
    format!("rule:{rule}:{part}")
}

impl EmailAction {
    /// Checks what the email's templates use (see `template_check.rs`); `known` says which
    /// fields the rule deals with.
    fn check_templates(&self, known: &Known, cx: &mut Compile) {
        let inline = [&self.to_key, &self.subject_key];
        for (key, span) in inline.into_iter().zip(&self.spans) {
            cx.check_inline_template(key, span, known);
        }
        // The body's own references (`{{#each events as |e|}}`, `{{events.0.x}}`, in the text or
        // the HTML body), not its text: a digest's email must use the events it collects.
        let lists_events = [false, true].into_iter().any(|html| {
            (cx.templates.references(&self.template, html).iter()).any(|r| {
                matches!(&r.kind, ReferenceKind::Field(f) if f.first().is_some_and(|s| s == "events"))
            })
        });
        if known.digest
            && !lists_events
            && let Some((file, _)) = cx.templates.file_of(&self.template, false)
        {
            let file = file.clone();
            cx.problems.list.push(
                crate::diag::Diagnostic::whole_file(&file, "this digest's email never lists its events")
                    .with_hint("add {{#each events}} ... {{/each}} to the template, with the fields of each event inside"),
            );
        }
        for html in [false, true] {
            if let Some((file, source)) = cx.templates.file_of(&self.template, html) {
                let place = Place::File { file, source };
                template_check::check(
                    &cx.templates.references(&self.template, html),
                    known,
                    &place,
                    &mut cx.problems.list,
                );
            }
        }
    }
}

impl Action for EmailAction {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn run(&self, input: &Input) -> Result<Output, String> {
        let data = input.template_data();
        let built = build(self, input.templates, &data, input.env.default_from)
            .map_err(|e| format!("email not sent: {e}"))?;
        let envelope = built.message.envelope();
        let to: Vec<String> = envelope.to().iter().map(|a| a.to_string()).collect();
        let queued = Queued {
            from: envelope.from().map(|a| a.to_string()).unwrap_or_default(),
            to_masked: to.first().map(|a| mask_email(a)).unwrap_or_default(),
            to,
            subject: built.subject,
            text: built.text,
            message: String::from_utf8_lossy(&built.message.formatted()).into_owned(),
        };
        Ok(Output::Delivery(queued.into_delivery()))
    }

    fn summary(&self) -> Value {
        json!({"kind": KIND, "template": self.template})
    }

    fn check(&self, known: &Known, cx: &mut Compile) {
        self.check_templates(known, cx);
    }

    fn delivered(&self) -> bool {
        true
    }
}

/// A rendered email, as queued: what the sender needs, and what `tripline test` and `replay`
/// show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Queued {
    /// Envelope sender and recipient addresses.
    pub from: String,
    pub to: Vec<String>,
    /// The recipient, masked for logs and status pages (the delivery's `to`).
    #[serde(skip)]
    pub to_masked: String,
    /// The subject and plain-text body as rendered.
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub text: String,
    /// The whole RFC 5322 message.
    pub message: String,
}

impl Queued {
    fn into_delivery(self) -> Delivery {
        Delivery::new(KIND, self.to_masked.clone(), None, &self)
    }

    /// The email a delivery holds, if it is one.
    pub fn of(delivery: &Delivery) -> Option<Queued> {
        if delivery.kind != KIND {
            return None;
        }
        let mut queued = Queued::from_payload(&delivery.payload).ok()?;
        queued.to_masked = delivery.to.clone();
        Some(queued)
    }

    /// The email a stored payload holds.
    fn from_payload(payload: &serde_json::Map<String, Value>) -> serde_json::Result<Queued> {
        read_payload(payload)
    }
}

/// Why an email cannot be made from an event's data (a missing field, an address that is not
/// one). Retrying the same event will not help, so this is recorded, not answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(String);

/// A rendered email: the message, and its subject and text body as rendered.
pub struct Built {
    pub message: Message,
    pub subject: String,
    pub text: String,
}

/// Renders the whole message without sending it.
pub fn build(
    action: &EmailAction,
    templates: &Templates,
    data: &Value,
    default_from: &Mailbox,
) -> Result<Built, RenderError> {
    // One budget for the whole email (see `actions/email/templates.rs`): a template that would take too long,
    // loop too often or write too much fails this email only.
    let rendering = templates.rendering(data);
    let render = |key: &str, what: &str| {
        rendering
            .text(key)
            .map_err(|e| RenderError(format!("cannot fill in the {what}: {e}")))
    };
    let to_text = render(&action.to_key, "recipient (`to`)")?;
    let to: Mailbox = to_text.trim().parse().map_err(|_| {
        RenderError(format!(
            "the recipient (`to`) came out as {:?}, which is not an email address",
            mask_email(to_text.trim())
        ))
    })?;
    let subject = render(&action.subject_key, "subject")?.trim().to_string();
    let text = render(&action.template, "email body")?;
    let builder = Message::builder()
        .from(action.from.clone().unwrap_or_else(|| default_from.clone()))
        .to(to)
        .subject(&subject)
        .message_id(None);
    let message = match rendering.html(&action.template) {
        Some(html) => {
            let html =
                html.map_err(|e| RenderError(format!("cannot fill in the HTML body: {e}")))?;
            builder.multipart(MultiPart::alternative_plain_html(text.clone(), html))
        }
        None => builder.body(text.clone()),
    };
    let message = message.map_err(|e| RenderError(format!("cannot build the email: {e}")))?;
    Ok(Built {
        message,
        subject,
        text,
    })
}

/// `dana@example.com` → `d***@example.com`, so logs never carry whole addresses.
pub fn mask_email(address: &str) -> String {
    match address.split_once('@') {
        Some((user, domain)) => {
            let first: String = user.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_string(),
    }
}

/// `text` with every email address in it masked: a mail server's error message often quotes
/// the recipient, and such messages go to logs and to GET /outbox.
pub fn mask_addresses(text: &str) -> String {
    static ADDRESS: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+").expect("a valid pattern")
    });
    ADDRESS
        .replace_all(text, |c: &regex::Captures| mask_email(&c[0]))
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_addresses_inside_a_server_message() {
        assert_eq!(
            mask_addresses("550 5.1.1 <dana.x@example.com>: Recipient address rejected"),
            "550 5.1.1 <d***@example.com>: Recipient address rejected"
        );
    }

    #[test]
    fn masks_addresses() {
        assert_eq!(mask_email("dana@example.com"), "d***@example.com");
        assert_eq!(mask_email("not an address"), "***");
    }
}
