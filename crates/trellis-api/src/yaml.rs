//! YAML and JSON text to a tree of [`Node`]s that remember where they came from.
//!
//! Every node carries the line and column it started at, so that errors found long after
//! parsing (a bad weight, a missing field, a dangling reference) can point at the exact spot
//! in the user's file. Documents are split the way `kubectl` splits them (a line that starts
//! with `---`), so a syntax error in one document never hides the documents around it.

use std::collections::{HashMap, HashSet};
use std::fmt;

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::TScalarStyle;

/// Deepest nesting accepted in a document. Real configuration is a few dozen levels deep;
/// the limit keeps hostile input from exhausting the stack of code that walks the tree.
pub const MAX_DEPTH: usize = 128;

/// Most nodes that alias expansion (`*anchor`) may add to one document ("billion laughs").
pub const MAX_ALIAS_NODES: usize = 100_000;

/// A position in a source text: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Mark {
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A mapping key: always a string in Kubernetes-style configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub text: String,
    pub mark: Mark,
}

/// What a node holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar. `plain` is true when it was written without quotes, so that it may be read
    /// as null, a boolean or a number (YAML 1.2 core schema); quoted scalars are strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

/// One node of a document with the position it started at.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub mark: Mark,
    pub value: Value,
}

/// How a plain scalar reads under the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resolved<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
}

impl Node {
    pub fn new(mark: Mark, value: Value) -> Self {
        Node { mark, value }
    }

    /// The scalar's type under the YAML 1.2 core schema (quoted scalars are strings).
    pub fn resolve(&self) -> Option<Resolved<'_>> {
        match &self.value {
            Value::Scalar { text, plain: true } => Some(resolve_plain(text)),
            Value::Scalar { text, plain: false } => Some(Resolved::Str(text)),
            _ => None,
        }
    }

    /// Equal content, ignoring positions: the same document moved within its file is the
    /// same configuration.
    pub fn same_content(&self, other: &Node) -> bool {
        match (&self.value, &other.value) {
            (Value::Scalar { text: a, plain: pa }, Value::Scalar { text: b, plain: pb }) => {
                a == b && pa == pb
            }
            (Value::Seq(a), Value::Seq(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_content(y))
            }
            (Value::Map(a), Value::Map(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|((ka, va), (kb, vb))| ka.text == kb.text && va.same_content(vb))
            }
            _ => false,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.resolve(), Some(Resolved::Null))
    }

    /// The scalar as a string, whatever its resolved type ("80", "true", "reviews").
    pub fn as_scalar(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// A string scalar (quoted, or plain text that is not null, a boolean or a number).
    pub fn as_str(&self) -> Option<&str> {
        match self.resolve()? {
            Resolved::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value under `key` when this node is a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key and value under `key` when this node is a mapping.
    pub fn entry(&self, key: &str) -> Option<(&Key, &Node)> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.text == key)
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    /// A short description for error messages: "a mapping", "a string \"x\"", "integer 3".
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
            Value::Scalar { .. } => match self.resolve() {
                Some(Resolved::Null) => "null".to_string(),
                Some(Resolved::Bool(b)) => format!("boolean `{b}`"),
                Some(Resolved::Int(i)) => format!("integer `{i}`"),
                Some(Resolved::Float(x)) => format!("number `{x}`"),
                Some(Resolved::Str(s)) => format!("string {s:?}"),
                None => "a value".to_string(),
            },
        }
    }

    /// The node at a field path as rendered in error messages (`spec.http[0].route[1]`).
    /// Returns the deepest node found along the path, so an error about a missing field
    /// still points at its parent.
    pub fn locate(&self, path: &str) -> &Node {
        let mut node = self;
        for seg in parse_path(path) {
            let next = match (seg, &node.value) {
                (PathSeg::Key(k), Value::Map(_)) => node.get(&k),
                (PathSeg::Index(i), Value::Seq(items)) => items.get(i),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        node
    }

    /// The position of the key that holds the field at `path` when there is one (for
    /// errors about a field as a whole), else the position of the node itself.
    pub fn locate_mark(&self, path: &str) -> Mark {
        let segs = parse_path(path);
        let mut node = self;
        let mut mark = self.mark;
        for seg in segs {
            match (seg, &node.value) {
                (PathSeg::Key(k), Value::Map(_)) => match node.entry(&k) {
                    Some((key, v)) => {
                        mark = match v.value {
                            Value::Scalar { .. } => v.mark,
                            _ => key.mark,
                        };
                        node = v;
                    }
                    None => break,
                },
                (PathSeg::Index(i), Value::Seq(items)) => match items.get(i) {
                    Some(n) => {
                        mark = n.mark;
                        node = n;
                    }
                    None => break,
                },
                _ => break,
            }
        }
        mark
    }
}

#[derive(Debug, PartialEq)]
enum PathSeg {
    Key(String),
    Index(usize),
}

/// Splits `spec.http[0].headers["x-user"]` into segments.
fn parse_path(path: &str) -> Vec<PathSeg> {
    let mut segs = Vec::new();
    let b = path.as_bytes();
    let mut i = 0;
    let mut cur = String::new();
    while i < b.len() {
        match b[i] {
            b'.' => {
                if !cur.is_empty() {
                    segs.push(PathSeg::Key(std::mem::take(&mut cur)));
                }
                i += 1;
            }
            b'[' => {
                if !cur.is_empty() {
                    segs.push(PathSeg::Key(std::mem::take(&mut cur)));
                }
                let rest = &path[i + 1..];
                if let Some(quoted) = rest.strip_prefix('"') {
                    // A quoted key: find the closing `"]`.
                    if let Some(end) = quoted.find("\"]") {
                        segs.push(PathSeg::Key(quoted[..end].replace("\\\"", "\"")));
                        i += 1 + 1 + end + 2;
                        continue;
                    }
                    break;
                }
                match rest.find(']') {
                    Some(end) => {
                        if let Ok(n) = rest[..end].parse() {
                            segs.push(PathSeg::Index(n));
                        }
                        i += end + 2;
                    }
                    None => break,
                }
            }
            _ => {
                let start = i;
                while i < b.len() && b[i] != b'.' && b[i] != b'[' {
                    i += 1;
                }
                cur.push_str(&path[start..i]);
            }
        }
    }
    if !cur.is_empty() {
        segs.push(PathSeg::Key(cur));
    }
    segs
}

/// Resolves a plain (unquoted) scalar under the YAML 1.2 core schema.
pub fn resolve_plain(text: &str) -> Resolved<'_> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Resolved::Null,
        "true" | "True" | "TRUE" => return Resolved::Bool(true),
        "false" | "False" | "FALSE" => return Resolved::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Resolved::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Resolved::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Resolved::Float(f64::NAN),
        _ => {}
    }
    let b = text.as_bytes();
    let first = b[0];
    if !(first.is_ascii_digit() || first == b'-' || first == b'+' || first == b'.') {
        return Resolved::Str(text);
    }
    if let Some(hex) = text.strip_prefix("0x") {
        if !hex.is_empty() && hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            if let Ok(v) = i128::from_str_radix(hex, 16) {
                return Resolved::Int(v);
            }
        }
        return Resolved::Str(text);
    }
    if let Some(oct) = text.strip_prefix("0o") {
        if !oct.is_empty() && oct.bytes().all(|c| (b'0'..=b'7').contains(&c)) {
            if let Ok(v) = i128::from_str_radix(oct, 8) {
                return Resolved::Int(v);
            }
        }
        return Resolved::Str(text);
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) {
        if let Ok(v) = text.parse::<i128>() {
            return Resolved::Int(v);
        }
        return Resolved::Str(text);
    }
    if is_core_float(digits) {
        if let Ok(v) = text.parse::<f64>() {
            return Resolved::Float(v);
        }
    }
    Resolved::Str(text)
}

/// `( \.[0-9]+ | [0-9]+ ( \.[0-9]* )? ) ( [eE] [-+]? [0-9]+ )?` (sign already removed).
fn is_core_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let int_digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    i += int_digits;
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        frac_digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        i += frac_digits;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
            i += 1;
        }
        let exp = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if exp == 0 {
            return false;
        }
        i += exp;
    }
    i == b.len()
}

/// A YAML syntax error (or a structural limit) with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub mark: Mark,
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.mark, self.message)
    }
}

/// One document of a multi-document text, or the syntax error that stopped it.
#[derive(Debug)]
pub struct ParsedDocument {
    /// First line of the document in the source (1-based).
    pub line: usize,
    pub result: Result<Node, SyntaxError>,
}

/// Splits a text into documents and parses each. Empty documents are skipped, as kubectl
/// skips them. A syntax error ends only the document it is in.
pub fn parse_documents(text: &str) -> Vec<ParsedDocument> {
    let mut out = Vec::new();
    for (offset, chunk) in split_documents(text) {
        parse_chunk(chunk, offset, &mut out);
    }
    out
}

/// Splits on lines that start with `---` followed only by blanks or a comment, which is how
/// Kubernetes' YAML reader splits manifests. Returns (lines before the chunk, chunk text).
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut chunks = Vec::new();
    let mut start = 0usize;
    let mut start_line = 0usize;
    let mut pos = 0usize;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let body = line.trim_end_matches(['\n', '\r']);
        if let Some(rest) = body.strip_prefix("---") {
            let rest = rest.trim_start();
            if rest.is_empty() || rest.starts_with('#') {
                chunks.push((start_line, &text[start..pos]));
                start = pos + line.len();
                start_line = line_no + 1;
            }
        }
        pos += line.len();
    }
    chunks.push((start_line, &text[start..]));
    chunks
}

enum Frame {
    Seq {
        mark: Mark,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        mark: Mark,
        anchor: usize,
        entries: Vec<(Key, Node)>,
        seen: HashSet<String>,
        merges: Vec<Node>,
        pending: Option<Key>,
    },
}

struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    alias_budget: usize,
    root: Option<Node>,
}

fn mark_of(m: &yaml_rust2::scanner::Marker, line_offset: usize) -> Mark {
    Mark {
        line: m.line() + line_offset,
        col: m.col() + 1,
    }
}

fn parse_chunk(chunk: &str, line_offset: usize, out: &mut Vec<ParsedDocument>) {
    if chunk.trim().is_empty() {
        return;
    }
    let mut parser = Parser::new_from_str(chunk);
    let mut b = Builder::new();
    let mut doc_line = line_offset + 1;
    loop {
        let (event, marker) = match parser.next_token() {
            Ok(ev) => ev,
            Err(e) => {
                out.push(ParsedDocument {
                    line: doc_line,
                    result: Err(SyntaxError {
                        mark: mark_of(e.marker(), line_offset),
                        message: e.info().to_string(),
                    }),
                });
                return;
            }
        };
        let mark = mark_of(&marker, line_offset);
        match event {
            Event::StreamEnd => return,
            Event::StreamStart | Event::Nothing => {}
            Event::DocumentStart => {
                doc_line = mark.line;
                b = Builder::new();
            }
            Event::DocumentEnd => {
                if let Some(root) = b.root.take() {
                    if !root.is_null() {
                        out.push(ParsedDocument {
                            line: doc_line,
                            result: Ok(root),
                        });
                    }
                }
            }
            other => {
                if let Err(message) = b.event(other, mark) {
                    out.push(ParsedDocument {
                        line: doc_line,
                        result: Err(SyntaxError { mark, message }),
                    });
                    return;
                }
            }
        }
    }
}

impl Builder {
    fn new() -> Self {
        Builder {
            stack: Vec::new(),
            anchors: HashMap::new(),
            alias_budget: MAX_ALIAS_NODES,
            root: None,
        }
    }

    fn event(&mut self, event: Event, mark: Mark) -> Result<(), String> {
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                let plain = matches!(style, TScalarStyle::Plain) && !is_str_tag(tag.as_ref());
                let node = Node::new(mark, Value::Scalar { text, plain });
                self.finish(node, anchor)
            }
            Event::SequenceStart(anchor, _) => self.push(Frame::Seq {
                mark,
                anchor,
                items: Vec::new(),
            }),
            Event::MappingStart(anchor, _) => self.push(Frame::Map {
                mark,
                anchor,
                entries: Vec::new(),
                seen: HashSet::new(),
                merges: Vec::new(),
                pending: None,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(frame) = self.stack.pop() else {
                    return Err("unbalanced end of collection".to_string());
                };
                match frame {
                    Frame::Seq {
                        mark,
                        anchor,
                        items,
                    } => self.finish(Node::new(mark, Value::Seq(items)), anchor),
                    Frame::Map {
                        mark,
                        anchor,
                        mut entries,
                        mut seen,
                        merges,
                        ..
                    } => {
                        // `<<: *base` merge keys: explicit keys win over merged ones.
                        for merged in merges {
                            let maps: Vec<Node> = match merged.value {
                                Value::Map(_) => vec![merged],
                                Value::Seq(items) => items,
                                _ => return Err("merge key `<<` needs a mapping".to_string()),
                            };
                            for m in maps {
                                let Value::Map(extra) = m.value else {
                                    return Err("merge key `<<` needs a mapping".to_string());
                                };
                                for (k, v) in extra {
                                    if seen.insert(k.text.clone()) {
                                        entries.push((k, v));
                                    }
                                }
                            }
                        }
                        self.finish(Node::new(mark, Value::Map(entries)), anchor)
                    }
                }
            }
            Event::Alias(id) => {
                let Some(node) = self.anchors.get(&id) else {
                    return Err("alias refers to an unknown anchor".to_string());
                };
                let size = count_nodes(node);
                if size > self.alias_budget {
                    return Err(format!(
                        "aliases expand to more than {MAX_ALIAS_NODES} nodes; refusing to expand"
                    ));
                }
                self.alias_budget -= size;
                let node = node.clone();
                self.finish(node, 0)
            }
            _ => Ok(()),
        }
    }

    fn push(&mut self, frame: Frame) -> Result<(), String> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(format!("nesting deeper than {MAX_DEPTH} levels"));
        }
        if let Some(Frame::Map { pending: None, .. }) = self.stack.last() {
            return Err("mapping keys must be strings, not lists or mappings".to_string());
        }
        self.stack.push(frame);
        Ok(())
    }

    fn finish(&mut self, node: Node, anchor: usize) -> Result<(), String> {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                self.root = Some(node);
                Ok(())
            }
            Some(Frame::Seq { items, .. }) => {
                items.push(node);
                Ok(())
            }
            Some(Frame::Map {
                entries,
                seen,
                merges,
                pending,
                ..
            }) => match pending.take() {
                None => {
                    let Value::Scalar { text, plain } = node.value else {
                        return Err("mapping keys must be strings, not lists or mappings".into());
                    };
                    let key = Key {
                        text,
                        mark: node.mark,
                    };
                    if plain && key.text == "<<" {
                        *pending = Some(key);
                        return Ok(());
                    }
                    if !seen.insert(key.text.clone()) {
                        return Err(format!("duplicate key {:?}", key.text));
                    }
                    *pending = Some(key);
                    Ok(())
                }
                Some(key) => {
                    if key.text == "<<" && !seen.contains("<<") {
                        merges.push(node);
                    } else {
                        entries.push((key, node));
                    }
                    Ok(())
                }
            },
        }
    }
}

fn is_str_tag(tag: Option<&Tag>) -> bool {
    tag.is_some_and(|t| t.suffix == "str" || t.suffix.ends_with(":str"))
}

fn count_nodes(node: &Node) -> usize {
    // Iterative: the tree's depth is bounded, but there is no need to recurse at all.
    let mut count = 0;
    let mut todo = vec![node];
    while let Some(n) = todo.pop() {
        count += 1;
        match &n.value {
            Value::Seq(items) => todo.extend(items.iter()),
            Value::Map(entries) => todo.extend(entries.iter().map(|(_, v)| v)),
            Value::Scalar { .. } => {}
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Node {
        let mut docs = parse_documents(text);
        assert_eq!(docs.len(), 1, "{docs:?}");
        docs.remove(0).result.expect("parses")
    }

    #[test]
    fn marks_are_one_based_lines_and_columns() {
        let n = one("a:\n  b: 1\n  c: [x, \"y\"]\n");
        let b = n.get("a").and_then(|a| a.get("b")).expect("b");
        assert_eq!(b.mark, Mark { line: 2, col: 6 });
        let c = n.get("a").and_then(|a| a.get("c")).expect("c");
        let items = c.as_seq().expect("seq");
        assert_eq!(items[1].mark, Mark { line: 3, col: 10 });
        assert_eq!(items[1].resolve(), Some(Resolved::Str("y")));
    }

    #[test]
    fn documents_split_like_kubectl_and_errors_stay_local() {
        let text = "a: 1\n---\nb: [unclosed\n--- # comment\nc: 3\n---\n\n# only a comment\n";
        let docs = parse_documents(text);
        assert_eq!(docs.len(), 3);
        assert!(docs[0].result.is_ok());
        let err = docs[1].result.as_ref().expect_err("syntax error");
        assert!(err.mark.line >= 3, "{err:?}");
        let c = docs[2].result.as_ref().expect("third doc parses");
        assert_eq!(c.get("c").and_then(Node::resolve), Some(Resolved::Int(3)));
        assert_eq!(c.mark.line, 5);
    }

    #[test]
    fn core_schema_resolution() {
        for (text, want) in [
            ("", Resolved::Null),
            ("~", Resolved::Null),
            ("true", Resolved::Bool(true)),
            ("FALSE", Resolved::Bool(false)),
            ("42", Resolved::Int(42)),
            ("-7", Resolved::Int(-7)),
            ("0x1f", Resolved::Int(31)),
            ("0o17", Resolved::Int(15)),
            ("1.5", Resolved::Float(1.5)),
            ("1e3", Resolved::Float(1000.0)),
            ("yes", Resolved::Str("yes")),
            ("1.5s", Resolved::Str("1.5s")),
            ("1.2.3", Resolved::Str("1.2.3")),
            ("-", Resolved::Str("-")),
        ] {
            assert_eq!(resolve_plain(text), want, "{text}");
        }
    }

    #[test]
    fn same_content_ignores_positions() {
        let a = one("a: {b: [1, \"x\"]}\n");
        let b = one("\n\n# moved\na:\n  b:\n  - 1\n  - \"x\"\n");
        assert!(a.same_content(&b));
        assert_ne!(a, b, "positions differ");
        assert!(!a.same_content(&one("a: {b: [1, x]}\n")), "quoting matters");
        assert!(!a.same_content(&one("a: {b: [1, \"y\"]}\n")));
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let docs = parse_documents("a: 1\nb: 2\na: 3\n");
        let err = docs[0].result.as_ref().expect_err("duplicate");
        assert!(err.message.contains("duplicate key \"a\""), "{err:?}");
        assert_eq!(err.mark.line, 3);
    }

    #[test]
    fn anchors_aliases_and_merge_keys() {
        let n = one("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n");
        let u = n.get("use").expect("use");
        assert_eq!(u.get("x").and_then(Node::resolve), Some(Resolved::Int(1)));
        assert_eq!(u.get("y").and_then(Node::resolve), Some(Resolved::Int(3)));
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        let mut prev = 'a';
        for name in ['b', 'c', 'd', 'e', 'f', 'g', 'h'] {
            let refs = vec![format!("*{prev}"); 10].join(", ");
            text.push_str(&format!("{name}: &{name} [{refs}]\n"));
            prev = name;
        }
        let docs = parse_documents(&text);
        let err = docs[0].result.as_ref().expect_err("bomb");
        assert!(err.message.contains("aliases expand"), "{err:?}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let text = "[".repeat(100_000);
        let docs = parse_documents(&text);
        assert!(docs[0].result.is_err());
        let text = format!(
            "{}1{}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        let docs = parse_documents(&text);
        let err = docs[0].result.as_ref().expect_err("too deep");
        assert!(err.message.contains("nesting deeper"), "{err:?}");
    }

    #[test]
    fn json_with_tabs_parses() {
        let n = one("{\n\t\"a\": {\n\t\t\"b\": [1, 2]\n\t}\n}\n");
        let b = n.get("a").and_then(|a| a.get("b")).expect("b");
        assert_eq!(b.as_seq().map(<[Node]>::len), Some(2));
        assert_eq!(b.mark.line, 3);
    }

    #[test]
    fn locate_follows_paths() {
        let n = one(
            "spec:\n  http:\n  - route:\n    - weight: 10\n    - weight: 90\n  labels:\n    app.kubernetes.io/name: x\n",
        );
        assert_eq!(n.locate("spec.http[0].route[1].weight").mark.line, 5);
        assert_eq!(n.locate_mark("spec.http[0].route[1]").line, 5);
        assert_eq!(
            n.locate("spec.labels[\"app.kubernetes.io/name\"]").as_str(),
            Some("x")
        );
        // A path that runs past the document stops at the deepest node found.
        assert_eq!(n.locate("spec.http[0].route[7]").mark.line, 4);
    }
}
