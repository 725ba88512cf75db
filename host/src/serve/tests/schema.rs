//! `openapi.json`'s component schemas are the JSON Schemas of the request
//! and reply types (schemars, OpenAPI 3.0 flavour), so the document cannot
//! drift from what the handlers answer. A difference fails, naming the
//! schema and the keys that differ; regenerate the components with
//!
//! ```sh
//! UPDATE_OPENAPI=1 cargo test -p sandbox-host --lib serve::tests::schema
//! ```
//!
//! which rewrites `components.schemas` of `host/openapi.json` (the rest of
//! the document is kept; every object's keys are written sorted, 2-space
//! indent). The prose of a schema comes from the types' `///` comments.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use schemars::generate::{Contract, SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value};

use crate::serve::error::ErrorReply;
use crate::serve::processes::{
    OutputReply, ProcessBody, ProcessLine, ProcessList, SignalBody, StdinBody,
};
use crate::serve::replies::{
    Backends, Cancelled, Collected, Destroyed, Downloaded, ExecReply, Health, PolicyName,
    StreamLine, Uploaded, Written,
};
use crate::serve::requests::{ExecBody, GcBody, UploadBody};
use crate::ThreadInfo;

/// Set to `1` to rewrite the components instead of failing.
const UPDATE_VAR: &str = "UPDATE_OPENAPI";

fn openapi_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.json")
}

/// Every component schema the API's types define: the replies' as they
/// serialize, the requests' as they deserialize (optional fields, defaults,
/// unknown fields refused), each type's nested types included.
fn generated_components() -> Map<String, Value> {
    let settings = SchemaSettings::openapi3();
    let mut replies = settings
        .clone()
        .with(|s| s.contract = Contract::Serialize)
        .into_generator();
    replies.subschema_for::<ErrorReply>();
    replies.subschema_for::<ExecReply>();
    replies.subschema_for::<StreamLine>();
    replies.subschema_for::<Uploaded>();
    replies.subschema_for::<Downloaded>();
    replies.subschema_for::<Written>();
    replies.subschema_for::<ThreadInfo>();
    replies.subschema_for::<Destroyed>();
    replies.subschema_for::<Cancelled>();
    replies.subschema_for::<Backends>();
    replies.subschema_for::<Collected>();
    replies.subschema_for::<PolicyName>();
    replies.subschema_for::<Health>();
    replies.subschema_for::<crate::processes::ProcessInfo>();
    replies.subschema_for::<ProcessList>();
    replies.subschema_for::<OutputReply>();
    replies.subschema_for::<ProcessLine>();
    let mut requests = settings
        .with(|s| s.contract = Contract::Deserialize)
        .into_generator();
    requests.subschema_for::<ExecBody>();
    requests.subschema_for::<UploadBody>();
    requests.subschema_for::<GcBody>();
    requests.subschema_for::<ProcessBody>();
    requests.subschema_for::<StdinBody>();
    requests.subschema_for::<SignalBody>();

    let mut components = Map::new();
    for generator in [&mut replies, &mut requests] {
        for (name, schema) in take(generator) {
            if let Some(other) = components.get(&name) {
                assert_eq!(
                    other, &schema,
                    "two types define the component schema {name} differently (a request and a \
                     reply type sharing a name, or one type under both contracts): rename one"
                );
            }
            components.insert(name, schema);
        }
    }
    components
}

fn take(generator: &mut SchemaGenerator) -> Map<String, Value> {
    generator.take_definitions(true)
}

/// Held by the tests that read the file, so one never reads it while
/// another rewrites it.
fn file_lock() -> MutexGuard<'static, ()> {
    static FILE: Mutex<()> = Mutex::new(());
    FILE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_openapi() -> Value {
    let text = std::fs::read_to_string(openapi_path()).expect("host/openapi.json");
    serde_json::from_str(&text).expect("openapi.json is JSON")
}

#[test]
fn openapi_component_schemas_are_the_schemas_of_the_request_and_reply_types() {
    let generated = generated_components();
    let _file = file_lock();
    let mut spec = read_openapi();
    if std::env::var(UPDATE_VAR).as_deref() == Ok("1") {
        spec["components"]["schemas"] = Value::Object(generated);
        let mut text = serde_json::to_string_pretty(&sorted(spec)).expect("JSON");
        text.push('\n');
        std::fs::write(openapi_path(), text).expect("writing host/openapi.json");
        return;
    }
    let documented = spec["components"]["schemas"]
        .as_object()
        .expect("components.schemas");
    let mut problems = Vec::new();
    for (name, schema) in &generated {
        match documented.get(name) {
            None => problems.push(format!("{name}: a type defines it; openapi.json lacks it")),
            Some(written) => {
                let mut diffs = Vec::new();
                differences("", schema, written, &mut diffs);
                if !diffs.is_empty() {
                    problems.push(format!("{name} differs at:\n    {}", diffs.join("\n    ")));
                }
            }
        }
    }
    for name in documented.keys() {
        if !generated.contains_key(name) {
            problems.push(format!("{name}: in openapi.json, but no type defines it"));
        }
    }
    assert!(
        problems.is_empty(),
        "openapi.json's component schemas are not the types' (run `{UPDATE_VAR}=1 cargo test \
         -p sandbox-host --lib serve::tests::schema` to rewrite them):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_ref_in_openapi_json_names_a_component_that_exists() {
    let spec = {
        let _file = file_lock();
        read_openapi()
    };
    let mut refs = Vec::new();
    collect_refs("", &spec, &mut refs);
    // Each route's answers and request bodies name their schemas by `$ref`.
    assert!(
        refs.iter().any(|(at, _)| at.starts_with("/paths/")),
        "no $ref in the paths: the check would be vacuous"
    );
    let dangling: Vec<String> = refs
        .iter()
        .filter(|(_, target)| resolve(&spec, target).is_none())
        .map(|(at, target)| format!("{at}: {target}"))
        .collect();
    assert!(
        dangling.is_empty(),
        "$ref to no component:\n  {}",
        dangling.join("\n  ")
    );
}

/// Every `$ref` in `value`, with the JSON pointer of the object holding it.
fn collect_refs(at: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(target)) => out.push((at.to_owned(), target.clone())),
                    _ => collect_refs(&format!("{at}/{}", escape(key)), v, out),
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                collect_refs(&format!("{at}/{i}"), v, out);
            }
        }
        _ => {}
    }
}

/// The value a local `$ref` (`#/components/...`) points at.
fn resolve<'a>(spec: &'a Value, target: &str) -> Option<&'a Value> {
    spec.pointer(target.strip_prefix('#')?)
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Where `written` differs from `generated`, one line per key path.
fn differences(at: &str, generated: &Value, written: &Value, out: &mut Vec<String>) {
    match (generated, written) {
        (Value::Object(g), Value::Object(w)) => {
            for (key, gv) in g {
                let here = join(at, key);
                match w.get(key) {
                    Some(wv) => differences(&here, gv, wv, out),
                    None => out.push(format!("{here}: missing in openapi.json")),
                }
            }
            for key in w.keys().filter(|k| !g.contains_key(*k)) {
                out.push(format!("{}: only in openapi.json", join(at, key)));
            }
        }
        (Value::Array(g), Value::Array(w)) if g.len() == w.len() => {
            for (i, (gv, wv)) in g.iter().zip(w).enumerate() {
                differences(&join(at, &i.to_string()), gv, wv, out);
            }
        }
        _ if generated == written => {}
        _ => out.push(format!(
            "{}: openapi.json has {}, the type generates {}",
            if at.is_empty() { "(the schema)" } else { at },
            clipped(written),
            clipped(generated)
        )),
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

fn clipped(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(100) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// The document with every object's keys in sorted order, whatever order
/// serde_json's map keeps (a stable file to diff).
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[test]
fn a_difference_names_the_key_path_and_both_values() {
    let generated = serde_json::json!({"type": "object", "properties": {"a": {"type": "string"}}});
    let written =
        serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {}}});
    let mut out = Vec::new();
    differences("", &generated, &written, &mut out);
    assert_eq!(
        out,
        [
            "properties.a.type: openapi.json has \"integer\", the type generates \"string\"",
            "properties.b: only in openapi.json",
        ]
    );
}
