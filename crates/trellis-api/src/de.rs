//! A serde deserializer over [`Node`] trees that reports the field path and the position of
//! every error (`spec.http[0].route[1].weight` at 14:9).
//!
//! Scalars are typed the way Kubernetes types them: a field declared as a string needs a
//! string (`version: 1` is an error that says to quote it), numbers and booleans must be
//! written unquoted, and `null` stands for "not set". Unknown fields are rejected by the
//! model's `deny_unknown_fields`, and the error names the nearest known field.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

use crate::yaml::{Key, Mark, Node, Resolved, Value};

/// A deserialization error with the field path and position it applies to.
#[derive(Debug, Clone, PartialEq)]
pub struct DeError {
    /// Field path from the document root, e.g. `spec.http[0].route[1].weight`.
    pub path: String,
    /// Where the offending value (or key) starts; `None` until the error is located.
    pub mark: Option<Mark>,
    pub message: String,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            path: String::new(),
            mark: None,
            message: msg.to_string(),
        }
    }

    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        let expected = exp.to_string();
        let hint = match unexp {
            de::Unexpected::Signed(_)
            | de::Unexpected::Unsigned(_)
            | de::Unexpected::Float(_)
            | de::Unexpected::Bool(_)
                if expected.contains("string") && !expected.contains("duration") =>
            {
                let text = match unexp {
                    de::Unexpected::Signed(n) => n.to_string(),
                    de::Unexpected::Unsigned(n) => n.to_string(),
                    de::Unexpected::Float(n) => n.to_string(),
                    de::Unexpected::Bool(b) => b.to_string(),
                    _ => String::new(),
                };
                format!(" (quote it to make it a string: \"{text}\")")
            }
            _ => String::new(),
        };
        Self::custom(format_args!(
            "expected {expected}, found {}{hint}",
            unexpected(unexp)
        ))
    }

    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Self::custom(format_args!(
            "invalid value {}: expected {exp}",
            unexpected(unexp)
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let hint = match closest(field, expected) {
            Some(best) => format!(" (did you mean `{best}`?)"),
            None if expected.is_empty() => String::new(),
            None => format!("; known fields: {}", expected.join(", ")),
        };
        Self::custom(format_args!("unknown field `{field}`{hint}"))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Self::custom(format_args!(
            "unknown value {variant:?}, expected one of {}",
            expected.join(", ")
        ))
    }

    fn missing_field(field: &'static str) -> Self {
        Self::custom(format_args!("missing required field `{field}`"))
    }
}

fn unexpected(u: de::Unexpected<'_>) -> String {
    match u {
        de::Unexpected::Str(s) => format!("string {s:?}"),
        de::Unexpected::Unsigned(n) => format!("integer `{n}`"),
        de::Unexpected::Signed(n) => format!("integer `{n}`"),
        de::Unexpected::Float(n) => format!("number `{n}`"),
        de::Unexpected::Bool(b) => format!("boolean `{b}`"),
        de::Unexpected::Unit => "null".to_string(),
        de::Unexpected::Seq => "a list".to_string(),
        de::Unexpected::Map => "a mapping".to_string(),
        other => other.to_string(),
    }
}

/// The known name closest to a misspelt one, when it is close enough to be a likely typo.
pub fn closest<'a>(field: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = field.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&lower, &k.to_ascii_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A field path kept as a linked list on the stack; rendered only when an error needs it.
#[derive(Clone, Copy, Debug)]
pub enum Path<'a> {
    Root,
    Key(&'a str, &'a Path<'a>),
    Index(usize, &'a Path<'a>),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Key(k, parent) => {
                parent.fmt(f)?;
                let simple = !k.is_empty()
                    && k.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
                if simple {
                    if !matches!(parent, Path::Root) {
                        f.write_str(".")?;
                    }
                    f.write_str(k)
                } else {
                    write!(f, "[{k:?}]")
                }
            }
            Path::Index(i, parent) => {
                parent.fmt(f)?;
                write!(f, "[{i}]")
            }
        }
    }
}

/// Renders a path prefix plus a key the way [`Path`] does (for validators building paths).
pub fn join_key(prefix: &str, key: &str) -> String {
    let simple = !key.is_empty()
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
    match (prefix.is_empty(), simple) {
        (true, true) => key.to_string(),
        (false, true) => format!("{prefix}.{key}"),
        (_, false) => format!("{prefix}[{key:?}]"),
    }
}

fn locate(mut e: DeError, mark: Mark, path: &Path<'_>) -> DeError {
    if e.mark.is_none() {
        e.mark = Some(mark);
        e.path = path.to_string();
    }
    e
}

/// Deserializes `T` from a node, with errors located in the node's document.
pub fn from_node<'de, T: de::Deserialize<'de>>(node: &'de Node) -> Result<T, DeError> {
    T::deserialize(NodeDe {
        node,
        path: Path::Root,
    })
}

/// Deserializes `T` from a node found at `path` inside a larger document, so errors carry
/// the full path.
pub fn from_node_at<'de, T: de::Deserialize<'de>>(
    node: &'de Node,
    path: &Path<'_>,
) -> Result<T, DeError> {
    T::deserialize(NodeDe { node, path: *path })
}

/// The deserializer for one node.
#[derive(Debug)]
pub struct NodeDe<'de, 'p> {
    node: &'de Node,
    path: Path<'p>,
}

impl<'de> NodeDe<'de, '_> {
    fn err(&self, msg: impl fmt::Display) -> DeError {
        DeError {
            path: self.path.to_string(),
            mark: Some(self.node.mark),
            message: msg.to_string(),
        }
    }

    fn wrong(&self, expected: &str) -> DeError {
        self.err(format_args!(
            "expected {expected}, found {}",
            self.node.describe()
        ))
    }

    fn int(&self, expected: &str) -> Result<i128, DeError> {
        match self.node.resolve() {
            Some(Resolved::Int(i)) => Ok(i),
            _ => Err(self.wrong(expected)),
        }
    }

    fn string(&self) -> Result<&'de str, DeError> {
        match self.node.resolve() {
            Some(Resolved::Str(s)) => Ok(s),
            _ => Err(self.wrong("a string")),
        }
    }
}

macro_rules! deserialize_int {
    ($($method:ident => $visit:ident as $ty:ty, $name:literal;)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
                let i = self.int($name)?;
                let v = <$ty>::try_from(i)
                    .map_err(|_| self.err(format_args!("{i} is out of range for {}", $name)))?;
                visitor.$visit(v).map_err(|e| locate(e, self.node.mark, &self.path))
            }
        )*
    };
}

impl<'de> Deserializer<'de> for NodeDe<'de, '_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let mark = self.node.mark;
        let path = self.path;
        let r = match &self.node.value {
            Value::Seq(items) => visitor.visit_seq(SeqDe {
                items: items.iter(),
                index: 0,
                path: &path,
            }),
            Value::Map(entries) => visitor.visit_map(MapDe {
                entries: entries.iter(),
                value: None,
                path: &path,
            }),
            Value::Scalar { .. } => match self.node.resolve() {
                Some(Resolved::Null) | None => visitor.visit_unit(),
                Some(Resolved::Bool(b)) => visitor.visit_bool(b),
                Some(Resolved::Int(i)) => {
                    if let Ok(u) = u64::try_from(i) {
                        visitor.visit_u64(u)
                    } else if let Ok(s) = i64::try_from(i) {
                        visitor.visit_i64(s)
                    } else {
                        visitor.visit_f64(i as f64)
                    }
                }
                Some(Resolved::Float(x)) => visitor.visit_f64(x),
                Some(Resolved::Str(s)) => visitor.visit_borrowed_str(s),
            },
        };
        r.map_err(|e| locate(e, mark, &path))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.resolve() {
            Some(Resolved::Bool(b)) => visitor
                .visit_bool(b)
                .map_err(|e| locate(e, self.node.mark, &self.path)),
            _ => Err(self.wrong("a boolean (true or false)")),
        }
    }

    deserialize_int! {
        deserialize_i8 => visit_i8 as i8, "an integer (i8)";
        deserialize_i16 => visit_i16 as i16, "an integer (i16)";
        deserialize_i32 => visit_i32 as i32, "an integer (int32)";
        deserialize_i64 => visit_i64 as i64, "an integer (int64)";
        deserialize_u8 => visit_u8 as u8, "an integer 0..255";
        deserialize_u16 => visit_u16 as u16, "an integer 0..65535";
        deserialize_u32 => visit_u32 as u32, "a non-negative integer (uint32)";
        deserialize_u64 => visit_u64 as u64, "a non-negative integer (uint64)";
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let x = match self.node.resolve() {
            Some(Resolved::Int(i)) => i as f64,
            Some(Resolved::Float(x)) => x,
            _ => return Err(self.wrong("a number")),
        };
        visitor
            .visit_f64(x)
            .map_err(|e| locate(e, self.node.mark, &self.path))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // Scalars of other types go to the visitor as what they are, so that its own
        // "expected …" message names what the field wants (a duration, a protocol…).
        let r = match self.node.resolve() {
            Some(Resolved::Str(s)) => visitor.visit_borrowed_str(s),
            Some(Resolved::Int(i)) => match i64::try_from(i) {
                Ok(v) => visitor.visit_i64(v),
                Err(_) => visitor.visit_f64(i as f64),
            },
            Some(Resolved::Float(x)) => visitor.visit_f64(x),
            Some(Resolved::Bool(b)) => visitor.visit_bool(b),
            Some(Resolved::Null) => visitor.visit_unit(),
            None => return Err(self.wrong("a string")),
        };
        r.map_err(|e| locate(e, self.node.mark, &self.path))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let s = self.string()?;
        visitor
            .visit_borrowed_bytes(s.as_bytes())
            .map_err(|e| locate(e, self.node.mark, &self.path))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            visitor.visit_none()
        } else {
            let (mark, path) = (self.node.mark, self.path);
            visitor.visit_some(self).map_err(|e| locate(e, mark, &path))
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            visitor.visit_unit()
        } else {
            Err(self.wrong("null"))
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let (mark, path) = (self.node.mark, self.path);
        visitor
            .visit_newtype_struct(self)
            .map_err(|e| locate(e, mark, &path))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let items: &[Node] = match &self.node.value {
            Value::Seq(items) => items,
            // Kubernetes reads `field: null` (or `field:` with nothing) as an empty list.
            _ if self.node.is_null() => &[],
            _ => return Err(self.wrong("a list")),
        };
        visitor
            .visit_seq(SeqDe {
                items: items.iter(),
                index: 0,
                path: &self.path,
            })
            .map_err(|e| locate(e, self.node.mark, &self.path))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let entries: &[(Key, Node)] = match &self.node.value {
            Value::Map(entries) => entries,
            _ if self.node.is_null() => &[],
            _ => return Err(self.wrong("a mapping")),
        };
        visitor
            .visit_map(MapDe {
                entries: entries.iter(),
                value: None,
                path: &self.path,
            })
            .map_err(|e| locate(e, self.node.mark, &self.path))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Scalar { .. } => {
                let s = self.string()?;
                visitor.visit_enum(UnitOnly { name: s })
            }
            Value::Map(entries) if entries.len() == 1 => {
                let (key, value) = &entries[0];
                visitor.visit_enum(Tagged {
                    key,
                    value,
                    path: &self.path,
                })
            }
            _ => return Err(self.wrong("a string or a mapping with one key")),
        };
        r.map_err(|e| locate(e, self.node.mark, &self.path))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct SeqDe<'de, 'p> {
    items: std::slice::Iter<'de, Node>,
    index: usize,
    path: &'p Path<'p>,
}

impl<'de> SeqAccess<'de> for SeqDe<'de, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let path = Path::Index(self.index, self.path);
        self.index += 1;
        seed.deserialize(NodeDe { node, path })
            .map(Some)
            .map_err(|e| locate(e, node.mark, &path))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapDe<'de, 'p> {
    entries: std::slice::Iter<'de, (Key, Node)>,
    value: Option<&'de (Key, Node)>,
    path: &'p Path<'p>,
}

impl<'de> MapAccess<'de> for MapDe<'de, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(entry);
        let path = Path::Key(&entry.0.text, self.path);
        seed.deserialize(KeyDe { key: &entry.0 })
            .map(Some)
            .map_err(|e| locate(e, entry.0.mark, &path))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some((key, node)) = self.value.take() else {
            return Err(de::Error::custom("value requested before key"));
        };
        let path = Path::Key(&key.text, self.path);
        seed.deserialize(NodeDe { node, path })
            .map_err(|e| locate(e, node.mark, &path))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// Mapping keys: strings, or numbers when the map is keyed by numbers (`portLevelMtls`).
struct KeyDe<'de> {
    key: &'de Key,
}

impl KeyDe<'_> {
    fn int(&self, what: &str) -> Result<i128, DeError> {
        self.key
            .text
            .parse::<i128>()
            .map_err(|_| de::Error::custom(format_args!("key {:?} is not {what}", self.key.text)))
    }
}

macro_rules! key_int {
    ($($method:ident => $visit:ident as $ty:ty, $name:literal;)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
                let i = self.int($name)?;
                let v = <$ty>::try_from(i).map_err(|_| {
                    <DeError as de::Error>::custom(format_args!("key {i} is out of range for {}", $name))
                })?;
                visitor.$visit(v)
            }
        )*
    };
}

impl<'de> Deserializer<'de> for KeyDe<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_borrowed_str(&self.key.text)
    }

    key_int! {
        deserialize_i8 => visit_i8 as i8, "an integer";
        deserialize_i16 => visit_i16 as i16, "an integer";
        deserialize_i32 => visit_i32 as i32, "an integer";
        deserialize_i64 => visit_i64 as i64, "an integer";
        deserialize_u8 => visit_u8 as u8, "an integer 0..255";
        deserialize_u16 => visit_u16 as u16, "a port number";
        deserialize_u32 => visit_u32 as u32, "a non-negative integer";
        deserialize_u64 => visit_u64 as u64, "a non-negative integer";
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_enum(UnitOnly {
            name: &self.key.text,
        })
    }

    serde::forward_to_deserialize_any! {
        bool f32 f64 char str string bytes byte_buf option unit unit_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

/// An enum written as a plain string: only unit variants fit.
struct UnitOnly<'de> {
    name: &'de str,
}

impl<'de> EnumAccess<'de> for UnitOnly<'de> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), DeError> {
        let de = de::value::BorrowedStrDeserializer::<DeError>::new(self.name);
        Ok((seed.deserialize(de)?, self))
    }
}

impl<'de> UnitOnly<'de> {
    fn needs_value(&self) -> DeError {
        de::Error::custom(format_args!(
            "`{}` needs a value (write it as `{}: ...`)",
            self.name, self.name
        ))
    }
}

impl<'de> VariantAccess<'de> for UnitOnly<'de> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, DeError> {
        Err(self.needs_value())
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _v: V) -> Result<V::Value, DeError> {
        Err(self.needs_value())
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, DeError> {
        Err(self.needs_value())
    }
}

/// An enum written as a one-key mapping (`{exact: "x"}`).
struct Tagged<'de, 'p> {
    key: &'de Key,
    value: &'de Node,
    path: &'p Path<'p>,
}

impl<'de, 'p> EnumAccess<'de> for Tagged<'de, 'p> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), DeError> {
        let path = Path::Key(&self.key.text, self.path);
        let v = seed
            .deserialize(KeyDe { key: self.key })
            .map_err(|e| locate(e, self.key.mark, &path))?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for Tagged<'de, '_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        if self.value.is_null() {
            Ok(())
        } else {
            let path = Path::Key(&self.key.text, self.path);
            Err(locate(
                de::Error::custom("expected no value"),
                self.value.mark,
                &path,
            ))
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        let path = Path::Key(&self.key.text, self.path);
        seed.deserialize(NodeDe {
            node: self.value,
            path,
        })
        .map_err(|e| locate(e, self.value.mark, &path))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        let path = Path::Key(&self.key.text, self.path);
        NodeDe {
            node: self.value,
            path,
        }
        .deserialize_seq(visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let path = Path::Key(&self.key.text, self.path);
        NodeDe {
            node: self.value,
            path,
        }
        .deserialize_map(visitor)
    }
}
