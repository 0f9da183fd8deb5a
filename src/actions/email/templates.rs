//! Email templates: the bodies in `templates/` and the `to`/`subject` lines of rules.
//!
//! A template named `power_user` is the file `templates/power_user.text.hbs` (plain-text body,
//! required) and optionally `templates/power_user.html.hbs` (HTML body). Both are Handlebars in
//! strict mode: a field the event does not have is an error, so an email is never sent half
//! filled. Text is not escaped; HTML is.
//!
//! What filling in one email may cost is bounded, so that one template cannot hold up the
//! thread that handles every request: each rendered part at most [`MAX_RENDERED_BYTES`], all
//! `{{#each}}` loops together at most [`MAX_ITERATIONS`] times, and the whole email at most
//! [`MAX_RENDER_TIME`]. Past a bound the email fails with the reason, like a missing field.

use handlebars::template::{Parameter, TemplateElement};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, PathSeg, RenderContext,
    Renderable, Template, TemplateError, TemplateErrorReason,
};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use crate::diag::{Diagnostic, Warning};
use crate::user_file;

const TEXT_SUFFIX: &str = ".text.hbs";
const HTML_SUFFIX: &str = ".html.hbs";

/// The longest one rendered part of an email (its recipient, subject, text or HTML body) may be.
pub const MAX_RENDERED_BYTES: usize = 1 << 20;

/// How many times all the `{{#each}}` loops of one email may run together. Loops inside loops
/// multiply: three nested loops over 300 properties would run 27 million times.
pub const MAX_ITERATIONS: u64 = 10_000;

/// The longest filling in one email may take. An ordinary email takes well under a millisecond.
pub const MAX_RENDER_TIME: Duration = Duration::from_millis(100);

/// The most `{{...}}` one template may hold (fields, blocks, comments: every `{{` counts).
///
/// Compiling a template costs more than its size says: for every `{{...}}` and every stretch of
/// text between them, the Handlebars parser (handlebars 6.4, through pest's
/// `Position::line_col`) counts the characters from the start of the template again, so the
/// time grows with their number × the size. A 1.3 MB template with 20,000 fields took 56 s to
/// load. Within this bound and the 512 KiB size bound a template compiles in about 2 s at the
/// very worst (every `{{` at the end of the largest file); an ordinary one, in a millisecond.
pub const MAX_TAGS: usize = 1_000;

/// The longest a one-line template (a rule's `to` or `subject`) may be.
pub const MAX_INLINE_BYTES: usize = 4 << 10;

/// The helper put at the start of every `{{#each}}` body when a template is compiled: it counts
/// one iteration against the email's budget and writes nothing. It is registered for each
/// rendering only (see [`Rendering`]), and no template can use it by name: `template_check.rs`
/// allows only [`HELPERS`].
const ITERATION: &str = "tripline-each-iteration";

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
            match compile(name, &source).map(|t| registry.register_template(name, t)) {
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
    pub fn add_inline(&mut self, key: &str, source: &str) -> Result<(), CompileError> {
        if source.len() > MAX_INLINE_BYTES {
            return Err(CompileError::TooLong(source.len()));
        }
        let template = compile(key, source)?;
        self.text.register_template(key, template);
        Ok(())
    }

    /// Starts filling in one email with `data`: every part rendered through the returned
    /// [`Rendering`] shares one budget of iterations and time.
    pub fn rendering(&self, data: &Value) -> Rendering<'_> {
        Rendering {
            templates: self,
            context: Context::from(data.clone()),
            budget: Arc::new(Budget::new(Instant::now() + MAX_RENDER_TIME)),
        }
    }
}

/// One email being filled in: its data, and what it has spent of its budget.
pub struct Rendering<'t> {
    templates: &'t Templates,
    context: Context,
    budget: Arc<Budget>,
}

impl Rendering<'_> {
    /// Renders a text template: a body by name, or an inline one by its key.
    pub fn text(&self, key: &str) -> Result<String, String> {
        self.render(&self.templates.text, key)
    }

    /// Renders the HTML body of `name`, if it has one.
    pub fn html(&self, name: &str) -> Option<Result<String, String>> {
        let registry = &self.templates.html;
        registry
            .has_template(name)
            .then(|| self.render(registry, name))
    }

    /// What `Handlebars::render` does (without its development mode, which is off), with the
    /// iteration counter registered and the output bounded.
    fn render(&self, registry: &Handlebars<'static>, key: &str) -> Result<String, String> {
        let template = registry
            .get_template(key)
            .ok_or_else(|| format!("there is no template `{key}`"))?;
        let mut rc = RenderContext::new(template.name.as_ref());
        rc.register_local_helper(ITERATION, Box::new(CountIteration(self.budget.clone())));
        let mut out = BoundedOutput {
            text: String::new(),
            budget: &self.budget,
        };
        match template.render(registry, &self.context, &mut rc, &mut out) {
            Ok(()) => Ok(out.text),
            // A bound's own error may come back wrapped in whatever handlebars was doing.
            Err(e) => Err(self
                .budget
                .exceeded
                .get()
                .cloned()
                .unwrap_or_else(|| describe_render_error(e))),
        }
    }
}

/// What one email may still spend. Shared by its parts, and by the iteration helper (which
/// handlebars requires to be `Send + Sync`, hence the atomics).
struct Budget {
    deadline: Instant,
    iterations: AtomicU64,
    /// The first bound exceeded, in words.
    exceeded: OnceLock<String>,
}

impl Budget {
    fn new(deadline: Instant) -> Budget {
        Budget {
            deadline,
            iterations: AtomicU64::new(0),
            exceeded: OnceLock::new(),
        }
    }

    /// Records that a bound was exceeded; the returned error stops the rendering.
    fn exceed(&self, reason: String) -> std::io::Error {
        let _ = self.exceeded.set(reason);
        std::io::Error::other("a bound on rendering was exceeded")
    }

    fn check_time(&self) -> std::io::Result<()> {
        if Instant::now() > self.deadline {
            return Err(self.exceed(format!(
                "filling in the email took longer than {} ms, the most one email may take",
                MAX_RENDER_TIME.as_millis()
            )));
        }
        Ok(())
    }

    fn iterate(&self) -> std::io::Result<()> {
        if self.iterations.fetch_add(1, Ordering::Relaxed) >= MAX_ITERATIONS {
            return Err(self.exceed(format!(
                "the template's {{{{#each}}}} loops would run more than {MAX_ITERATIONS} times for this event (loops inside loops multiply)"
            )));
        }
        self.check_time()
    }
}

/// The helper named [`ITERATION`].
struct CountIteration(Arc<Budget>);

impl HelperDef for CountIteration {
    fn call<'reg: 'rc, 'rc>(
        &self,
        _: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
        _: &mut dyn Output,
    ) -> HelperResult {
        Ok(self.0.iterate()?)
    }
}

/// Rendered text that refuses to grow past [`MAX_RENDERED_BYTES`], and checks the time at
/// each write, so that rendering stops early instead of finishing something that is dropped.
struct BoundedOutput<'b> {
    text: String,
    budget: &'b Budget,
}

impl Output for BoundedOutput<'_> {
    fn write(&mut self, seg: &str) -> std::io::Result<()> {
        if self.text.len() + seg.len() > MAX_RENDERED_BYTES {
            return Err(self.budget.exceed(format!(
                "the email would be longer than {} MiB (a {{{{#each}}}} over a long list, or loops inside loops?)",
                MAX_RENDERED_BYTES >> 20
            )));
        }
        self.budget.check_time()?;
        self.text.push_str(seg);
        Ok(())
    }
}

/// Why a template could not be compiled.
#[derive(Debug)]
pub enum CompileError {
    /// Handlebars could not parse it.
    Parse(TemplateError),
    /// It holds more than [`MAX_TAGS`] `{{`.
    TooManyTags(usize),
    /// A one-line template longer than [`MAX_INLINE_BYTES`].
    TooLong(usize),
}

/// Compiles a template, with the iteration counter put at the start of every `{{#each}}` body.
/// A template with more than [`MAX_TAGS`] `{{` is refused before the parser sees it.
fn compile(name: &str, source: &str) -> Result<Template, CompileError> {
    let tags = memchr::memmem::find_iter(source.as_bytes(), b"{{").count();
    if tags > MAX_TAGS {
        return Err(CompileError::TooManyTags(tags));
    }
    let mut template =
        Template::compile_with_name(source, name.to_string()).map_err(CompileError::Parse)?;
    count_iterations(&mut template);
    Ok(template)
}

/// Puts the [`ITERATION`] helper first in the body of every `{{#each}}` block of `t`, however
/// deeply nested. It writes nothing, so the output is what it would be without it.
fn count_iterations(t: &mut Template) {
    static TICK: LazyLock<Template> = LazyLock::new(|| {
        Template::compile(&format!("{{{{{ITERATION}}}}}")).expect("a valid template")
    });
    for e in &mut t.elements {
        let TemplateElement::HelperBlock(h) = e else {
            continue;
        };
        if h.name.as_name() == Some("each")
            && let Some(body) = &mut h.template
        {
            body.elements.insert(0, TICK.elements[0].clone());
            body.mapping.insert(0, TICK.mapping[0].clone());
        }
        for inner in [&mut h.template, &mut h.inverse].into_iter().flatten() {
            count_iterations(inner);
        }
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

/// A template that cannot be compiled, as a diagnostic pointing into its file.
pub fn template_diagnostic(file: &Path, source: &str, e: &CompileError) -> Diagnostic {
    let e = match e {
        CompileError::Parse(e) => e,
        CompileError::TooManyTags(tags) => {
            return Diagnostic::whole_file(
                file,
                format!(
                    "this template has too many fields: it holds {tags} {{{{...}}}}; a template may hold at most {MAX_TAGS}"
                ),
            )
            .with_hint("split it into several emails, or write a list with one {{#each}} instead of a field for each item");
        }
        CompileError::TooLong(bytes) => {
            return Diagnostic::whole_file(
                file,
                format!(
                    "this line is {bytes} bytes long; a `to` or `subject` may be at most {} KiB",
                    MAX_INLINE_BYTES >> 10
                ),
            );
        }
    };
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
        let rendering = t.rendering(&data);
        assert_eq!(rendering.text("hi").unwrap(), "Hi A&B <b>");
        assert_eq!(rendering.html("hi").unwrap().unwrap(), "<p>A&amp;B</p>");
        assert_eq!(
            t.rendering(&json!({})).text("hi").unwrap_err(),
            "the event has no `name`"
        );
    }

    /// A folder holding `t.text.hbs` with `source`, loaded.
    fn one(source: &str) -> (tempfile::TempDir, Templates) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.text.hbs"), source).unwrap();
        let (t, problems) = Templates::load(dir.path());
        assert!(problems.is_empty(), "{problems:?}");
        (dir, t)
    }

    #[test]
    fn counting_iterations_changes_no_output() {
        let source = "{{#each properties.items}}{{@index}}={{this}}{{#if @last}}.{{else}}, {{/if}}{{/each}}\n\
                      {{#each properties.map}}{{@key}}:{{#each ../properties.items}}{{@root.event}}{{/each}} {{/each}}\n\
                      {{#each properties.none}}x{{else}}empty{{/each}}\n\
                      {{#with properties}}{{#each items}}[{{this}}]{{/each}}{{/with}}";
        let data = json!({"event": "e", "properties": {"items": ["a", "b"], "map": {"k": 1, "l": 2}, "none": []}});
        let (_dir, t) = one(source);
        let plain = Handlebars::new().render_template(source, &data).unwrap();
        assert_eq!(t.rendering(&data).text("t").unwrap(), plain);
        assert_eq!(
            plain, "0=a, 1=b.\nk:ee l:ee \nempty\n[a][b]",
            "the template means what this test thinks"
        );
    }

    #[test]
    fn loops_inside_loops_stop_at_the_iteration_bound() {
        let properties: serde_json::Map<String, Value> =
            (0..300).map(|i| (format!("p{i}"), json!(i))).collect();
        let data = json!({ "properties": properties });
        let (_dir, t) = one(
            "{{#each properties}}{{#each @root.properties}}{{#each @root.properties}}x{{/each}}{{/each}}{{/each}}",
        );
        let e = t.rendering(&data).text("t").unwrap_err();
        assert_eq!(
            e,
            "the template's {{#each}} loops would run more than 10000 times for this event (loops inside loops multiply)"
        );
        // Two nested loops over 99 properties run 99 + 99 * 99 = 9,900 times: allowed.
        let properties: serde_json::Map<String, Value> =
            (0..99).map(|i| (format!("p{i}"), json!(i))).collect();
        let (_dir, t) = one("{{#each properties}}{{#each @root.properties}}x{{/each}}{{/each}}");
        let text = t
            .rendering(&json!({ "properties": properties }))
            .text("t")
            .unwrap();
        assert_eq!(text.len(), 99 * 99);
    }

    #[test]
    fn output_stops_at_the_length_bound() {
        let items: Vec<String> = (0..2000).map(|_| "y".repeat(1000)).collect();
        let (_dir, t) = one("{{#each properties.items}}{{this}}{{/each}}");
        let e = t
            .rendering(&json!({"properties": {"items": items}}))
            .text("t")
            .unwrap_err();
        assert!(e.starts_with("the email would be longer than 1 MiB"), "{e}");
        let items = &items[..1000];
        let text = t
            .rendering(&json!({"properties": {"items": items}}))
            .text("t")
            .unwrap();
        assert_eq!(text.len(), 1_000_000, "just under the bound is fine");
    }

    #[test]
    fn an_email_past_its_deadline_stops_at_the_next_write() {
        let (_dir, t) = one("Hi {{name}}");
        let late = Rendering {
            templates: &t,
            context: Context::from(json!({"name": "x"})),
            budget: Arc::new(Budget::new(Instant::now() - Duration::from_millis(1))),
        };
        assert_eq!(
            late.text("t").unwrap_err(),
            "filling in the email took longer than 100 ms, the most one email may take"
        );
    }

    #[test]
    fn a_template_with_too_many_fields_is_refused_before_it_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let fields: String = (0..=MAX_TAGS).map(|i| format!("{{{{f{i}}}}}\n")).collect();
        std::fs::write(dir.path().join("big.text.hbs"), fields).unwrap();
        let (t, problems) = Templates::load(dir.path());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].message,
            "this template has too many fields: it holds 1001 {{...}}; a template may hold at most 1000"
        );
        assert!(!t.has_body("big"));
        let mut t = Templates::empty();
        let e = t
            .add_inline("k", &"x".repeat(MAX_INLINE_BYTES + 1))
            .unwrap_err();
        assert!(matches!(e, CompileError::TooLong(_)), "{e:?}");
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
