//! Email templates: the bodies in `templates/` and the `to`/`subject` lines of rules.
//!
//! A template named `power_user` is the file `templates/power_user.text.hbs` (plain-text body,
//! required) and optionally `templates/power_user.html.hbs` (HTML body). Both are Handlebars in
//! strict mode: a field the event does not have is an error, so an email is never sent half
//! filled. Text is not escaped; HTML is.

use handlebars::template::{Parameter, TemplateElement};
use handlebars::{Handlebars, PathSeg, Template, TemplateError, TemplateErrorReason};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::rules::diagnostic::{Diagnostic, Warning};
use crate::user_file;

const TEXT_SUFFIX: &str = ".text.hbs";
const HTML_SUFFIX: &str = ".html.hbs";

/// Every template of one rule set, parsed.
pub struct Templates {
    text: Handlebars<'static>,
    html: Handlebars<'static>,
    bodies: BTreeSet<String>,
    /// Each template file's path and text, in name order: for the content hash, and to point
    /// diagnostics into the file.
    files: Vec<(PathBuf, String)>,
    /// Entries of the folder named like templates that are not files (skipped).
    warnings: Vec<Warning>,
}

/// Something a template refers to, found by [`Templates::references`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub kind: ReferenceKind,
    /// As written, for messages.
    pub text: String,
    /// 1-based position in the template.
    pub line: usize,
    pub column: usize,
}

/// What a template refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceKind {
    /// A field of the data: `person.properties.email` is `["person", "properties", "email"]`.
    Field(Vec<String>),
    /// A helper (`if`, `eq`, ...) by name.
    Helper(String),
    /// Another template included with `{{> name}}`, or a decorator (`{{* ...}}`).
    Include,
}

/// The helpers a template may use. Others (`log` would write event data into the service's
/// logs) are refused when the rules load.
pub const HELPERS: &[&str] = &[
    "if", "unless", "each", "with", "lookup", "eq", "ne", "gt", "gte", "lt", "lte", "and", "or",
    "not", "len",
];

/// Why `path`, an entry of `dir`, must not be read: a link to a file outside the templates
/// folder (an email could otherwise show any file the service can read).
fn link_outside(dir: &Path, path: &Path) -> Option<String> {
    let is_link = path.symlink_metadata().ok()?.file_type().is_symlink();
    let inside = match (dir.canonicalize(), path.canonicalize()) {
        (Ok(root), Ok(target)) => target.starts_with(root),
        _ => false,
    };
    (is_link && !inside).then(|| {
        "this template is a link to a file outside the templates folder; copy the file in instead"
            .to_string()
    })
}

impl Templates {
    /// Reads every `*.text.hbs` and `*.html.hbs` file of `dir`, reporting each one that fails to
    /// parse. A missing directory holds no templates.
    pub fn load(dir: &Path) -> (Templates, Vec<Diagnostic>) {
        let mut templates = Templates::empty();
        let mut problems = Vec::new();
        let listing = match user_file::list(dir, |name| {
            name.ends_with(TEXT_SUFFIX) || name.ends_with(HTML_SUFFIX)
        }) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (templates, problems),
            Err(e) => {
                problems.push(Diagnostic::whole_file(
                    dir,
                    format!("cannot read the templates folder: {e}"),
                ));
                return (templates, problems);
            }
        };
        templates.warnings = listing.warnings;
        let mut html_names = Vec::new();
        for path in listing.files {
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
            if let Some(outside) = link_outside(dir, &path) {
                problems.push(Diagnostic::whole_file(&path, outside));
                continue;
            }
            let source = match user_file::read_text(&path, user_file::TEMPLATE) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(Diagnostic::whole_file(
                        &path,
                        format!("cannot read this template: {e}"),
                    ));
                    continue;
                }
            };
            templates.files.push((path.clone(), source.clone()));
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
            warnings: Vec::new(),
        }
    }

    /// Entries of the templates folder that were skipped: named like templates, but not files.
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// Each template file's path and text, in name order.
    pub fn files(&self) -> &[(PathBuf, String)] {
        &self.files
    }

    /// The file and text of a body template (`html` for its HTML part), if it exists.
    pub fn file_of(&self, name: &str, html: bool) -> Option<&(PathBuf, String)> {
        let file_name = format!("{name}{}", if html { HTML_SUFFIX } else { TEXT_SUFFIX });
        self.files
            .iter()
            .find(|(p, _)| p.file_name().is_some_and(|n| n == file_name.as_str()))
    }

    /// Every field, helper and include that the template under `key` (an inline key, or a
    /// body's name) uses outside `{{#each}}` and `{{#with}}` blocks, whose fields are relative
    /// to something else.
    pub fn references(&self, key: &str, html: bool) -> Vec<Reference> {
        let registry = if html { &self.html } else { &self.text };
        let mut out = Vec::new();
        if let Some(t) = registry.get_template(key) {
            walk(t, &mut out);
        }
        out
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

fn walk(t: &Template, out: &mut Vec<Reference>) {
    for (i, e) in t.elements.iter().enumerate() {
        let (line, column) = t.mapping.get(i).map_or((1, 1), |m| (m.0, m.1));
        element(e, line, column, out);
    }
}

fn element(e: &TemplateElement, line: usize, column: usize, out: &mut Vec<Reference>) {
    let at = |kind, text: &str| Reference {
        kind,
        text: text.to_string(),
        line,
        column,
    };
    match e {
        TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h) => {
            let helper = match &h.name {
                Parameter::Name(name) => Some(name.as_str()),
                Parameter::Path(path) if !h.params.is_empty() || h.block => path_segments(path)
                    .filter(|s| s.len() == 1)
                    .map(|_| raw(path)),
                _ => None,
            };
            match helper {
                // `{{name}}` alone is a field unless a helper of that name exists.
                Some(name) if h.params.is_empty() && !h.block && !HELPERS.contains(&name) => {
                    out.push(at(ReferenceKind::Field(vec![name.to_string()]), name));
                }
                Some(name) => out.push(at(ReferenceKind::Helper(name.into()), name)),
                None => parameter(&h.name, line, column, out),
            }
            for p in h.params.iter().chain(h.hash.values()) {
                parameter(p, line, column, out);
            }
            if !matches!(helper, Some("each" | "with")) {
                for inner in [&h.template, &h.inverse].into_iter().flatten() {
                    walk(inner, out);
                }
            }
        }
        TemplateElement::PartialExpression(_)
        | TemplateElement::PartialBlock(_)
        | TemplateElement::DecoratorExpression(_)
        | TemplateElement::DecoratorBlock(_) => {
            out.push(at(ReferenceKind::Include, "{{> ...}}"));
        }
        _ => {}
    }
}

fn parameter(p: &Parameter, line: usize, column: usize, out: &mut Vec<Reference>) {
    match p {
        Parameter::Path(path) => {
            if let Some(segments) = path_segments(path) {
                out.push(Reference {
                    kind: ReferenceKind::Field(segments),
                    text: raw(path).to_string(),
                    line,
                    column,
                });
            }
        }
        Parameter::Subexpression(sub) => element(&sub.element, line, column, out),
        _ => {}
    }
}

fn raw(path: &handlebars::Path) -> &str {
    match path {
        handlebars::Path::Relative((_, raw)) | handlebars::Path::Local((_, _, raw)) => raw,
    }
}

/// The named segments of a path from the top of the data; `None` for `this`, `../`, `@index`
/// and the like, which are relative to a block.
fn path_segments(path: &handlebars::Path) -> Option<Vec<String>> {
    match path {
        handlebars::Path::Relative((segments, _)) => segments
            .iter()
            .map(|s| match s {
                PathSeg::Named(n) => Some(n.clone()),
                _ => None,
            })
            .collect(),
        handlebars::Path::Local(_) => None,
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
    fn finds_fields_helpers_and_includes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("t.text.hbs"),
            "Hi {{person.properties.emial}},\n{{#if (eq properties.plan \"pro\")}}{{count}}{{else}}{{nope}}{{/if}}\n\
             {{#each properties.items}}{{this.name}}{{/each}}{{log properties.x}}{{> other}}",
        )
        .unwrap();
        let (t, problems) = Templates::load(dir.path());
        assert!(problems.is_empty(), "{problems:?}");
        let found: Vec<(String, usize, usize)> = t
            .references("t", false)
            .into_iter()
            .map(|r| (format!("{:?}", r.kind), r.line, r.column))
            .collect();
        let field = |s: &[&str]| {
            format!(
                "{:?}",
                ReferenceKind::Field(s.iter().map(|x| x.to_string()).collect())
            )
        };
        let helper = |s: &str| format!("{:?}", ReferenceKind::Helper(s.into()));
        assert_eq!(
            found,
            [
                (field(&["person", "properties", "emial"]), 1, 4),
                (helper("if"), 2, 1),
                (helper("eq"), 2, 1),
                (field(&["properties", "plan"]), 2, 1),
                (field(&["count"]), 2, 35),
                (field(&["nope"]), 2, 52),
                (helper("each"), 3, 1),
                (field(&["properties", "items"]), 3, 1),
                (helper("log"), 3, 49),
                (field(&["properties", "x"]), 3, 49),
                (format!("{:?}", ReferenceKind::Include), 3, 69),
            ]
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

    #[test]
    fn a_template_linked_from_outside_the_folder_is_not_read() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.txt"), "root:x:0:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret.txt"),
            dir.path().join("leak.text.hbs"),
        )
        .unwrap();
        std::fs::write(dir.path().join("real.text.hbs"), "hi").unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("real.text.hbs"),
            dir.path().join("alias.text.hbs"),
        )
        .unwrap();
        let (templates, problems) = Templates::load(dir.path());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("outside the templates folder"));
        assert!(
            templates
                .files
                .iter()
                .all(|(_, text)| !text.contains("root"))
        );
        assert_eq!(templates.files.len(), 2, "a link inside the folder is fine");
    }
}
