//! Email templates: the bodies in `templates/` and the `to`/`subject` lines of rules.
//!
//! A template named `power_user` is the file `templates/power_user.text.hbs` (plain-text body,
//! required) and optionally `templates/power_user.html.hbs` (HTML body). Both are Handlebars in
//! strict mode: a field the event does not have is an error, so an email is never sent half
//! filled. Text is not escaped; HTML is.

use handlebars::{Handlebars, TemplateError, TemplateErrorReason};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

use crate::rules::diagnostic::Diagnostic;

const TEXT_SUFFIX: &str = ".text.hbs";
const HTML_SUFFIX: &str = ".html.hbs";

/// Every template of one rule set, parsed.
pub struct Templates {
    text: Handlebars<'static>,
    html: Handlebars<'static>,
    bodies: BTreeSet<String>,
    /// Each template file's name and text, in name order, for the rule set's content hash.
    files: Vec<(String, String)>,
}

impl Templates {
    /// Reads every `*.text.hbs` and `*.html.hbs` file of `dir`, reporting each one that fails to
    /// parse. A missing directory holds no templates.
    pub fn load(dir: &Path) -> (Templates, Vec<Diagnostic>) {
        let mut templates = Templates::empty();
        let mut problems = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (templates, problems),
            Err(e) => {
                problems.push(Diagnostic::whole_file(
                    dir,
                    format!("cannot read the templates folder: {e}"),
                ));
                return (templates, problems);
            }
        };
        let mut html_names = Vec::new();
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let (name, is_html) = if let Some(name) = file_name.strip_suffix(TEXT_SUFFIX) {
                (name, false)
            } else if let Some(name) = file_name.strip_suffix(HTML_SUFFIX) {
                (name, true)
            } else {
                continue;
            };
            if name.starts_with('.') || name.is_empty() {
                continue;
            }
            let source = match std::fs::read_to_string(&path) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(Diagnostic::whole_file(
                        &path,
                        format!("cannot read this template: {e}"),
                    ));
                    continue;
                }
            };
            templates.files.push((file_name.to_string(), source.clone()));
            let registry = if is_html {
                &mut templates.html
            } else {
                &mut templates.text
            };
            match registry.register_template_string(name, &source) {
                Ok(()) if is_html => html_names.push((name.to_string(), path.clone())),
                Ok(()) => {
                    templates.bodies.insert(name.to_string());
                }
                Err(e) => problems.push(template_diagnostic(&path, &source, &e)),
            }
        }
        for (name, path) in html_names {
            if !templates.bodies.contains(&name) {
                problems.push(
                    Diagnostic::whole_file(&path, "an HTML body needs a plain-text body beside it")
                        .with_hint(format!("add {name}{TEXT_SUFFIX}")),
                );
            }
        }
        (templates, problems)
    }

    fn empty() -> Templates {
        let mut text = Handlebars::new();
        text.set_strict_mode(true);
        text.register_escape_fn(handlebars::no_escape);
        let mut html = Handlebars::new();
        html.set_strict_mode(true);
        Templates {
            text,
            html,
            bodies: BTreeSet::new(),
            files: Vec::new(),
        }
    }

    /// Each template file's name and text, in name order.
    pub fn files(&self) -> &[(String, String)] {
        &self.files
    }

    /// Whether a body template of this name exists.
    pub fn has_body(&self, name: &str) -> bool {
        self.bodies.contains(name)
    }

    /// The names of all body templates, for "did you mean" hints.
    pub fn body_names(&self) -> impl Iterator<Item = &str> {
        self.bodies.iter().map(String::as_str)
    }

    /// Registers a one-line text template (a rule's `to` or `subject`) under `key`.
    pub fn add_inline(&mut self, key: &str, source: &str) -> Result<(), TemplateError> {
        self.text.register_template_string(key, source)
    }

    /// Renders a text template: a body by name, or an inline one by its key.
    pub fn render_text(&self, key: &str, data: &Value) -> Result<String, String> {
        self.text.render(key, data).map_err(describe_render_error)
    }

    /// Renders the HTML body of `name`, if it has one.
    pub fn render_html(&self, name: &str, data: &Value) -> Option<Result<String, String>> {
        self.html
            .has_template(name)
            .then(|| self.html.render(name, data).map_err(describe_render_error))
    }
}

/// A Handlebars parse error as a diagnostic pointing into the template file.
pub fn template_diagnostic(file: &Path, source: &str, e: &TemplateError) -> Diagnostic {
    let message = match e.reason() {
        TemplateErrorReason::InvalidSyntax(_) => {
            "this template cannot be read: a `{{` is not closed, or a block opened with `{{#...}}` has no `{{/...}}`"
                .to_string()
        }
        other => format!("this template cannot be read: {other}"),
    };
    let hint = "fields are written {{properties.name}}; blocks open with {{#if ...}} and close with {{/if}}";
    match e.pos() {
        Some((line, column)) => Diagnostic::at_line(file, source, line, column, message),
        None => Diagnostic::whole_file(file, message),
    }
    .with_hint(hint)
}

fn describe_render_error(e: handlebars::RenderError) -> String {
    match e.reason() {
        handlebars::RenderErrorReason::MissingVariable(Some(path)) => {
            format!("the event has no `{path}`")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_text_and_escaped_html() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hi.text.hbs"), "Hi {{name}} <b>").unwrap();
        std::fs::write(dir.path().join("hi.html.hbs"), "<p>{{name}}</p>").unwrap();
        std::fs::write(dir.path().join("notes.md"), "ignored").unwrap();
        let (t, problems) = Templates::load(dir.path());
        assert!(problems.is_empty(), "{problems:?}");
        assert!(t.has_body("hi"));
        let data = json!({"name": "A&B"});
        assert_eq!(t.render_text("hi", &data).unwrap(), "Hi A&B <b>");
        assert_eq!(
            t.render_html("hi", &data).unwrap().unwrap(),
            "<p>A&amp;B</p>"
        );
        assert_eq!(
            t.render_text("hi", &json!({})).unwrap_err(),
            "the event has no `name`"
        );
    }

    #[test]
    fn parse_errors_point_into_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bad.text.hbs"),
            "line one\n{{#if x}}never closed\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("lonely.html.hbs"), "<p>hi</p>").unwrap();
        let (_, problems) = Templates::load(dir.path());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].file.ends_with("bad.text.hbs"));
        assert!(problems[0].line >= 2, "{:?}", problems[0]);
        assert!(problems[1].message.contains("plain-text body"));
    }
}
