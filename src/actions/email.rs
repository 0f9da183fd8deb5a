//! The `[email]` action: render an email from templates and hand it to the transport.
//!
//! The transport is lettre's file transport: each email becomes an RFC 5322 `.eml` file in
//! `<data>/outbox/`. Rendering is strict: a field the event lacks, or a `to` that is not an
//! address, fails the email with a reason instead of sending something half filled.

use lettre::message::{Mailbox, MultiPart};
use lettre::{FileTransport, Message, Transport};
use serde_json::Value;
use std::path::Path;

use crate::templates::Templates;

/// A compiled `[email]` table. The `to` and `subject` lines are registered in the rule set's
/// templates under the keys held here.
#[derive(Debug, Clone)]
pub struct EmailAction {
    pub template: String,
    pub to_key: String,
    pub subject_key: String,
    pub from: Option<Mailbox>,
}

/// Why an email was not written.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    /// The event's data cannot make this email (missing field, bad address). Retrying the same
    /// event will not help, so this is recorded, not answered with an error.
    #[error("{0}")]
    Render(String),
    /// The outbox could not be written.
    #[error("cannot write the email to the outbox: {0}")]
    Transport(String),
}

/// An email that was written.
#[derive(Debug, Clone, PartialEq)]
pub struct SentEmail {
    /// The recipient, masked for logs (`d***@example.com`).
    pub to_masked: String,
    /// The transport's id for it (the `.eml` file's name without extension).
    pub id: String,
}

/// Writes emails to the outbox.
pub struct Mailer {
    transport: FileTransport,
    default_from: Mailbox,
}

impl Mailer {
    /// A mailer writing into `<data_dir>/outbox/`, created if missing.
    pub fn new(data_dir: &Path, default_from: Mailbox) -> std::io::Result<Mailer> {
        let outbox = data_dir.join("outbox");
        std::fs::create_dir_all(&outbox)?;
        Ok(Mailer {
            transport: FileTransport::new(&outbox),
            default_from,
        })
    }

    /// Renders the email for `data` (an event's template context) and writes it.
    pub fn send(
        &self,
        action: &EmailAction,
        templates: &Templates,
        data: &Value,
    ) -> Result<SentEmail, EmailError> {
        let message = build(action, templates, data, &self.default_from)?;
        let to_masked = message
            .envelope()
            .to()
            .first()
            .map(|a| mask_email(a.as_ref()))
            .unwrap_or_default();
        let id = self
            .transport
            .send(&message)
            .map_err(|e| EmailError::Transport(e.to_string()))?;
        Ok(SentEmail { to_masked, id })
    }
}

/// Renders the whole message without sending it.
pub fn build(
    action: &EmailAction,
    templates: &Templates,
    data: &Value,
    default_from: &Mailbox,
) -> Result<Message, EmailError> {
    let render = |key: &str, what: &str| {
        templates
            .render_text(key, data)
            .map_err(|e| EmailError::Render(format!("cannot fill in the {what}: {e}")))
    };
    let to_text = render(&action.to_key, "recipient (`to`)")?;
    let to: Mailbox = to_text.trim().parse().map_err(|_| {
        EmailError::Render(format!(
            "the recipient (`to`) came out as {:?}, which is not an email address",
            mask_email(to_text.trim())
        ))
    })?;
    let subject = render(&action.subject_key, "subject")?;
    let text = render(&action.template, "email body")?;
    let builder = Message::builder()
        .from(action.from.clone().unwrap_or_else(|| default_from.clone()))
        .to(to)
        .subject(subject.trim())
        .message_id(None);
    let message = match templates.render_html(&action.template, data) {
        Some(html) => {
            let html =
                html.map_err(|e| EmailError::Render(format!("cannot fill in the HTML body: {e}")))?;
            builder.multipart(MultiPart::alternative_plain_html(text, html))
        }
        None => builder.body(text),
    };
    message.map_err(|e| EmailError::Render(format!("cannot build the email: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_addresses() {
        assert_eq!(mask_email("dana@example.com"), "d***@example.com");
        assert_eq!(mask_email("not an address"), "***");
    }
}
