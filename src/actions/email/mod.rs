//! The `[email]` action: render an email from templates.
//!
//! Rendering is strict: a field the event lacks, or a `to` that is not an address, fails the
//! email with a reason instead of sending something half filled; so does a template that would
//! cost more than the bounds of `actions/email/templates.rs` allow. Rendered emails go to the
//! durable outbox (`pipeline/outbox.rs`), which delivers them.

pub mod template_check;
pub mod templates;

use lettre::Message;
use lettre::message::{Mailbox, MultiPart};
use regex::Regex;
use serde_json::Value;
use std::sync::LazyLock;

use templates::Templates;

/// A compiled `[email]` table. The `to` and `subject` lines are registered in the rule set's
/// templates under the keys held here.
#[derive(Debug, Clone)]
pub struct EmailAction {
    pub template: String,
    pub to_key: String,
    pub subject_key: String,
    pub from: Option<Mailbox>,
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
