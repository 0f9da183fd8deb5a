//! The `[jsonl]` action: project an event onto a whitelist of fields and append it as one line
//! of a JSONL file in the data directory.
//!
//! Only the listed fields are written, under the names the rule gives them, so nothing else from
//! the event can leak into the file. Only the committer thread writes, a batch of whole lines at
//! a time, synced before the batch is acknowledged; files stay open across reloads.
//!
//! - `mod.rs`: the `[jsonl]` table, its compile, and the line an event becomes (its fields are
//!   `actions/fields.rs`, shared with `[remember]`).
//! - `path.rs`: which output paths are allowed, checked when rules load and before opening.
//! - `files.rs`: the open files, appended to durably by the committer.

pub mod files;
pub mod path;

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

use super::fields::{FieldConfig, Fields};
use super::{Action, Compile, Input, Kind, Output};
use crate::actions::email::template_check::Known;
use crate::ingest::path::FieldPath;
pub use files::{JsonlFiles, is_path_error};
pub use path::{UnsafePath, check_output_path, output_path, output_place};

/// The kind's name, as its table is written.
pub const KIND: &str = "jsonl";

/// Output files that cannot be written, with why: an action writing to one fails on its own (see
/// the committer), while the rule's other actions and every other rule go on.
pub type Unwritable = HashMap<PathBuf, String>;

/// The `[jsonl]` kind.
pub struct Jsonl;

/// `[jsonl]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// Output file, relative to the data directory.
    pub file: Spanned<String>,
    /// Personal data replaced by placeholders in every field (a field's own `redact` wins).
    #[serde(default)]
    pub redact: Option<Spanned<Vec<Spanned<String>>>>,
    /// Output keys, in order, and where each comes from.
    pub fields: Spanned<IndexMap<String, Spanned<FieldConfig>>>,
}

impl Kind for Jsonl {
    type Config = JsonlConfig;

    fn compile(config: Spanned<JsonlConfig>, cx: &mut Compile) -> Option<Box<dyn Action>> {
        let j = config.into_inner();
        let file = match output_path(j.file.get_ref()) {
            Ok(file) => Some(file),
            Err(e) => {
                cx.problems.add(j.file.span(), format!("`file`: {}", e.0), Some("write a file name like \"training_data.jsonl\"; it is created in the data folder".into()));
                None
            }
        };
        if j.fields.get_ref().is_empty() {
            cx.problems.add(
                j.fields.span(),
                "[jsonl.fields] lists no fields, so every line would be empty",
                Some("add a line like distinctId = \"distinct_id\"".into()),
            );
        }
        let fields = Fields::compile("[jsonl.fields]", j.fields, j.redact.as_ref(), cx);
        Some(Box::new(JsonlAction {
            file: file?,
            fields: fields?,
        }))
    }
}

/// A compiled `[jsonl]` table.
#[derive(Debug, Clone)]
pub struct JsonlAction {
    /// The output file, relative to the data directory (checked to stay inside it).
    pub file: PathBuf,
    /// What each line holds.
    pub fields: Fields,
}

impl Action for JsonlAction {
    fn kind(&self) -> &'static str {
        KIND
    }

    /// The line, unless its file cannot be written now (see [`Unwritable`]).
    fn run(&self, input: &Input) -> Result<Output, String> {
        if let Some(why) = input.env.unwritable.get(&self.file) {
            return Err(format!(
                "line not written: cannot write {}: {why}",
                self.file.display()
            ));
        }
        let mut line = (self.fields.object(input)).map_err(|e| format!("line not written: {e}"))?;
        line.push('\n');
        Ok(Output::Line {
            file: self.file.clone(),
            line,
        })
    }

    fn summary(&self) -> Value {
        json!({
            "kind": KIND,
            "file": self.file.display().to_string(),
            "fields": self.fields.keys(),
        })
    }

    fn fields(&self) -> Vec<&FieldPath> {
        self.fields.paths()
    }

    fn check(&self, known: &Known, cx: &mut Compile) {
        self.fields.check(known, cx);
    }

    fn file(&self) -> Option<&Path> {
        Some(&self.file)
    }
}
