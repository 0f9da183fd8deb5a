//! PostHog's `elements_chain`: the clicked element and its ancestors, as autocapture sends them
//! (`button.btn.primary:attr__class="btn primary"nth-child="2"text="Upgrade";div.toolbar:...`),
//! read into the list templates see as `{{elements.0.text}}`, `{{elements.0.tag_name}}`.
//!
//! The reading follows PostHog's own (`chainToElements`, in `plugin-server`'s
//! `utils/db/elements-chain.ts` and the frontend's copy, whose three patterns are used here
//! unchanged, and which also drops line breaks first), so the names are the ones PostHog's
//! documentation and its actions use: `tag_name`, `text`, `href`, `attr_id`, `attr_class` (the
//! list of classes), `nth_child`, `nth_of_type`, and `attributes` (`attr__data-testid`...). The
//! first element is the one clicked.

use regex::Regex;
use serde_json::{Map, Value, json};
use std::sync::LazyLock;

/// One element: a run of anything but spaces, `;` and quotes, or quoted text.
static SPLIT_CHAIN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"(?:[^\s;"]|"(?:\\.|[^"])*")+"#).expect("a valid pattern"));
/// `tag.class.class` and, after a `:`, the attributes.
static SPLIT_CLASS_ATTRIBUTES: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(.*?)($|:([a-zA-Z\-_0-9]*=.*))").expect("a valid pattern"));
/// `name="value"` (a value may hold `\"`, or be empty): the pattern of PostHog's current
/// reader, where an older one missed empty values.
static ATTRIBUTE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"((.*?)="((?:\\"|[^"])*)")"#).expect("a valid pattern"));

/// What each element has, as templates name it.
pub const KEYS: &[&str] = &[
    "tag_name",
    "text",
    "href",
    "attr_id",
    "attr_class",
    "nth_child",
    "nth_of_type",
    "attributes",
];

/// The most elements read from one chain: the clicked one and its nearest ancestors are what a
/// label uses, and a chain is as long as the page is deep.
const MAX_ELEMENTS: usize = 32;

/// The elements of `chain`, the clicked one first.
pub fn parse(chain: &str) -> Value {
    // As PostHog's own reader does: a line break in a text would stop the patterns' `.`.
    let chain = chain.replace('\n', "");
    let elements = SPLIT_CHAIN
        .find_iter(&chain)
        .take(MAX_ELEMENTS)
        .map(|m| element(m.as_str()))
        .collect();
    Value::Array(elements)
}

fn element(text: &str) -> Value {
    let (head, attributes) = match SPLIT_CLASS_ATTRIBUTES.captures(text) {
        Some(c) => (
            c.get(1).map_or("", |m| m.as_str()),
            c.get(3).map_or("", |m| m.as_str()),
        ),
        None => (text, ""),
    };
    let mut parts = head.split('.');
    let tag_name = parts.next().unwrap_or_default();
    let classes: Vec<&str> = parts.filter(|c| !c.is_empty()).collect();
    let mut element = json!({
        "tag_name": tag_name,
        "attr_class": classes,
        "text": null,
        "href": null,
        "attr_id": null,
        "nth_child": null,
        "nth_of_type": null,
    });
    let mut others = Map::new();
    for c in ATTRIBUTE.captures_iter(attributes) {
        let name = c.get(2).map_or("", |m| m.as_str());
        let value = c.get(3).map_or("", |m| m.as_str()).replace("\\\"", "\"");
        match name {
            "text" | "href" | "attr_id" => element[name] = value.into(),
            "nth-child" | "nth-of-type" => {
                element[name.replace('-', "_")] =
                    value.parse::<u64>().map_or(Value::Null, Value::from);
            }
            _ => {
                others.insert(name.to_string(), value.into());
            }
        }
    }
    element["attributes"] = Value::Object(others);
    element
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_posthogs_autocapture_chain() {
        let chain = r#"button.btn.btn-primary:attr__class="btn btn-primary"attr__data-testid="generate-button"attr__type="button"nth-child="2"nth-of-type="1"text="Generate floorplan";div.toolbar:attr__class="toolbar"nth-child="1"nth-of-type="1";main.editor:attr__class="editor"attr__id="editor-root"attr_id="editor-root"nth-child="3"nth-of-type="1";body:nth-child="2"nth-of-type="1""#;
        let elements = parse(chain);
        assert_eq!(elements.as_array().unwrap().len(), 4);
        let clicked = &elements[0];
        assert_eq!(clicked["tag_name"], "button");
        assert_eq!(clicked["text"], "Generate floorplan");
        assert_eq!(clicked["attr_class"], json!(["btn", "btn-primary"]));
        assert_eq!(clicked["nth_child"], 2);
        assert_eq!(
            clicked["attributes"]["attr__data-testid"],
            "generate-button"
        );
        assert_eq!(elements[2]["attr_id"], "editor-root");
        assert_eq!(elements[3]["tag_name"], "body");
        assert_eq!(elements[3]["text"], Value::Null);
    }

    #[test]
    fn quotes_and_semicolons_inside_values_stay_in_their_element() {
        let elements = parse(r#"a:href="/x;y"text="Say \"hi\"; now";span"#);
        assert_eq!(elements.as_array().unwrap().len(), 2);
        assert_eq!(elements[0]["href"], "/x;y");
        assert_eq!(elements[0]["text"], r#"Say "hi"; now"#);
        assert_eq!(elements[1]["tag_name"], "span");
        assert_eq!(parse(""), json!([]));
        let multiline = parse("button:text=\"Save\nnow\"attr__title=\"\"nth-child=\"2\"");
        assert_eq!(multiline[0]["attributes"]["attr__title"], "");
        assert_eq!(multiline[0]["text"], "Savenow");
        assert_eq!(multiline[0]["nth_child"], 2);
    }
}
