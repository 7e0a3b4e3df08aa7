//! Machine-readable output of analysis messages, in the shape of `istioctl analyze -o json`
//! and `-o yaml`: a list of objects with the keys `code`, `documentationUrl` (Istio codes
//! only), `level`, `message`, `origin` (`Kind ns/name`) and `reference` (`file:line`).

use serde_json::{Map, Value};

use super::Message;

/// The messages as a list of JSON objects.
pub fn to_value(msgs: &[Message]) -> Value {
    Value::Array(
        msgs.iter()
            .map(|m| {
                let mut o = Map::new();
                o.insert("code".into(), Value::from(m.code));
                if let Some(url) = m.documentation_url() {
                    o.insert("documentationUrl".into(), Value::from(url));
                }
                o.insert("level".into(), Value::from(m.level.as_str()));
                o.insert("message".into(), Value::from(m.text.clone()));
                if let Some(obj) = &m.object {
                    o.insert("origin".into(), Value::from(obj.to_string()));
                }
                if let Some(r) = m.reference() {
                    o.insert("reference".into(), Value::from(r));
                }
                Value::Object(o)
            })
            .collect(),
    )
}

/// JSON, tab-indented as `istioctl analyze -o json` prints it; `[]` when there are none.
pub fn to_json(msgs: &[Message]) -> String {
    if msgs.is_empty() {
        return "[]".to_string();
    }
    let value = to_value(msgs);
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    match serde::Serialize::serialize(&value, &mut ser) {
        Ok(()) => String::from_utf8(buf).unwrap_or_else(|_| value.to_string()),
        // Serializing a Value into memory cannot fail; fall back to the compact form.
        Err(_) => value.to_string(),
    }
}

/// YAML: a block list of mappings; `[]` when there are none.
pub fn to_yaml(msgs: &[Message]) -> String {
    let mut out = String::new();
    emit(&to_value(msgs), 0, &mut out);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Writes `v` as a block value at `indent` spaces, starting on the current line (callers
/// have already written `key:` or `- `), ending with a newline.
fn emit(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Array(items) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    push_indent(indent, out);
                }
                out.push_str("- ");
                emit(item, indent + 2, out);
            }
        }
        Value::Object(map) if !map.is_empty() => {
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    push_indent(indent, out);
                }
                out.push_str(&scalar(k));
                out.push(':');
                match item {
                    Value::Array(a) if !a.is_empty() => {
                        out.push('\n');
                        push_indent(indent, out);
                        emit(item, indent, out);
                    }
                    Value::Object(o) if !o.is_empty() => {
                        out.push('\n');
                        push_indent(indent + 2, out);
                        emit(item, indent + 2, out);
                    }
                    _ => {
                        out.push(' ');
                        emit(item, indent + 2, out);
                    }
                }
            }
        }
        _ => {
            out.push_str(&flow(v));
            out.push('\n');
        }
    }
}

fn push_indent(n: usize, out: &mut String) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// Scalars and empty collections.
fn flow(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => scalar(s),
        Value::Array(_) => "[]".to_string(),
        Value::Object(_) => "{}".to_string(),
    }
}

/// A string as a YAML scalar: plain when that reads back as the same string, else
/// double-quoted with JSON escapes (a JSON string is a valid YAML double-quoted scalar).
fn scalar(s: &str) -> String {
    if is_plain_safe(s) {
        s.to_string()
    } else {
        Value::from(s).to_string()
    }
}

fn is_plain_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if !(first.is_ascii_alphabetic() || first == '/' || first == '_') {
        return false;
    }
    if s.ends_with([' ', ':']) || s.contains(": ") || s.contains(" #") {
        return false;
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " _-./:+=()@".contains(c))
    {
        return false;
    }
    const RESERVED: [&str; 13] = [
        "y", "yes", "n", "no", "true", "false", "on", "off", "null", "nan", "inf", "~", "",
    ];
    !RESERVED.iter().any(|r| s.eq_ignore_ascii_case(r))
}
