//! Loading configuration from text, files, directories and stdin.
//!
//! Each document is parsed, typed and validated on its own: a bad document is rejected with
//! diagnostics that name the file, line, column, object and field path, and the good
//! documents around it still load.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::common::ObjectMeta;
use crate::de::{self, DeError};
use crate::kube::{self, SecretInfo};
use crate::resource::{
    Diagnostic, Document, Envelope, Kind, Level, Location, ObjectRef, Origin, PodOwner, Resource,
    Spec,
};
use crate::validate;
use crate::yaml::{self, Mark, Node};

/// Options for loading.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Namespace of namespaced objects that do not name one (as `kubectl -n`).
    pub default_namespace: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            default_namespace: "default".to_string(),
        }
    }
}

/// The outcome of one document.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The document when it was accepted; `None` when it was rejected.
    pub document: Option<Document>,
    /// The object the document declares, when it could be told even though it was rejected
    /// (so a store can keep the last good version of it).
    pub object: Option<ObjectRef>,
    /// Errors (when rejected), warnings and notes.
    pub diagnostics: Vec<Diagnostic>,
}

impl Parsed {
    fn rejected(object: Option<ObjectRef>, diagnostics: Vec<Diagnostic>) -> Self {
        Parsed {
            document: None,
            object,
            diagnostics,
        }
    }

    /// The accepted config resource, if this document is one.
    pub fn resource(&self) -> Option<&Resource> {
        match &self.document {
            Some(Document::Config(r)) => Some(r),
            _ => None,
        }
    }
}

/// Largest file read (config files are small; this protects against reading a disk image).
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Parses every document of a text. `file` names the source in diagnostics.
pub fn parse_text(text: &str, file: &str, opts: &LoadOptions) -> Vec<Parsed> {
    let file: Arc<str> = Arc::from(file);
    let docs = yaml::parse_documents(text);
    if docs.is_empty() {
        return vec![Parsed::rejected(
            None,
            vec![Diagnostic {
                level: Level::Error,
                location: Location {
                    file,
                    mark: Mark { line: 1, col: 1 },
                },
                object: None,
                path: String::new(),
                message: "no configuration documents (the input is empty or only comments)"
                    .to_string(),
            }],
        )];
    }
    let mut out = Vec::with_capacity(docs.len());
    for doc in docs {
        match doc.result {
            Err(e) => out.push(Parsed::rejected(
                None,
                vec![Diagnostic {
                    level: Level::Error,
                    location: Location {
                        file: file.clone(),
                        mark: e.mark,
                    },
                    object: None,
                    path: String::new(),
                    message: format!("YAML syntax error: {}", e.message),
                }],
            )),
            Ok(node) => parse_node(Arc::new(node), &file, opts, &mut out),
        }
    }
    out
}

/// Reads bytes as UTF-8 text and parses them; a file that is not UTF-8 is one error that
/// says where the first bad byte is.
pub fn parse_bytes(bytes: &[u8], file: &str, opts: &LoadOptions) -> Vec<Parsed> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_text(text.strip_prefix('\u{feff}').unwrap_or(text), file, opts),
        Err(e) => {
            let good = &bytes[..e.valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            let col = good.iter().rev().take_while(|b| **b != b'\n').count() + 1;
            vec![file_error(
                file,
                Mark { line, col },
                format!(
                    "not valid UTF-8 (byte offset {}); configuration must be UTF-8 text",
                    e.valid_up_to()
                ),
            )]
        }
    }
}

fn file_error(file: &str, mark: Mark, message: String) -> Parsed {
    Parsed::rejected(
        None,
        vec![Diagnostic {
            level: Level::Error,
            location: Location {
                file: Arc::from(file),
                mark,
            },
            object: None,
            path: String::new(),
            message,
        }],
    )
}

/// Whether a file name is one configuration is read from.
pub fn is_config_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Lists the config files under `path` (itself when it is a file), recursively, sorted.
/// Hidden entries (starting with `.`) inside directories are skipped.
pub fn config_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut todo = vec![path.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ft = entry.file_type()?;
            if ft.is_dir() || (ft.is_symlink() && p.is_dir()) {
                todo.push(p);
            } else if is_config_file(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads and parses one file.
pub fn load_file(path: &Path, opts: &LoadOptions) -> Vec<Parsed> {
    let name = path.display().to_string();
    let read = std::fs::File::open(path).and_then(|f| {
        use std::io::Read;
        let mut buf = Vec::new();
        f.take(MAX_FILE_BYTES + 1).read_to_end(&mut buf)?;
        Ok(buf)
    });
    match read {
        Ok(bytes) if bytes.len() as u64 > MAX_FILE_BYTES => vec![file_error(
            &name,
            Mark { line: 1, col: 1 },
            format!("file is larger than {} MiB", MAX_FILE_BYTES >> 20),
        )],
        Ok(bytes) => parse_bytes(&bytes, &name, opts),
        Err(e) => vec![file_error(
            &name,
            Mark { line: 1, col: 1 },
            format!("cannot read: {e}"),
        )],
    }
}

/// Loads files, directories (recursively: *.yaml, *.yml, *.json) and `-` for stdin.
pub fn load_paths<P: AsRef<Path>>(paths: &[P], opts: &LoadOptions) -> Vec<Parsed> {
    let mut out = Vec::new();
    for p in paths {
        let p = p.as_ref();
        if p == Path::new("-") {
            use std::io::Read;
            let mut buf = Vec::new();
            match std::io::stdin().take(MAX_FILE_BYTES).read_to_end(&mut buf) {
                Ok(_) => out.extend(parse_bytes(&buf, "<stdin>", opts)),
                Err(e) => out.push(file_error(
                    "<stdin>",
                    Mark { line: 1, col: 1 },
                    format!("cannot read: {e}"),
                )),
            }
            continue;
        }
        match config_files(p) {
            Ok(files) => {
                for f in files {
                    out.extend(load_file(&f, opts));
                }
            }
            Err(e) => out.push(file_error(
                &p.display().to_string(),
                Mark { line: 1, col: 1 },
                format!("cannot read: {e}"),
            )),
        }
    }
    out
}

/// apiVersion → (group, version).
fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.rsplit_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// Types, validates and classifies one parsed document.
fn parse_node(node: Arc<Node>, file: &Arc<str>, opts: &LoadOptions, out: &mut Vec<Parsed>) {
    let origin = Origin {
        file: file.clone(),
        node: node.clone(),
    };
    let error_at = |path: &str, object: Option<ObjectRef>, message: String| Diagnostic {
        level: Level::Error,
        location: origin.location(path),
        object,
        path: path.to_string(),
        message,
    };

    if !matches!(node.value, yaml::Value::Map(_)) {
        out.push(Parsed::rejected(
            None,
            vec![error_at(
                "",
                None,
                format!(
                    "expected a Kubernetes-style object (a mapping with apiVersion and kind), found {}",
                    node.describe()
                ),
            )],
        ));
        return;
    }
    let api_version = node.get("apiVersion").and_then(Node::as_str);
    let kind_name = node.get("kind").and_then(Node::as_str);
    let (Some(api_version), Some(kind_name)) = (api_version, kind_name) else {
        let missing = if api_version.is_none() {
            "apiVersion"
        } else {
            "kind"
        };
        out.push(Parsed::rejected(
            None,
            vec![error_at(
                missing,
                None,
                format!(
                    "missing or invalid `{missing}` (every document needs apiVersion and kind)"
                ),
            )],
        ));
        return;
    };
    let (group, version) = split_api_version(api_version);
    let meta_node = node.get("metadata");
    let name = meta_node
        .and_then(|m| m.get("name"))
        .and_then(Node::as_str)
        .unwrap_or_default()
        .to_string();
    let explicit_ns = meta_node
        .and_then(|m| m.get("namespace"))
        .and_then(Node::as_str)
        .map(str::to_string);

    // `kind: List` (what `kubectl get -o yaml` prints): each item is a document.
    if kind_name == "List" || (kind_name.ends_with("List") && group.is_empty()) {
        match node.get("items").and_then(Node::as_seq) {
            Some(items) => {
                for item in items {
                    parse_node(Arc::new(item.clone()), file, opts, out);
                }
            }
            None => out.push(Parsed::rejected(
                None,
                vec![error_at("items", None, "a List needs `items`".to_string())],
            )),
        }
        return;
    }

    let kind = Kind::from_name(kind_name).filter(|k| k.group() == group);
    let Some(kind) = kind else {
        let namespace = explicit_ns.unwrap_or_else(|| opts.default_namespace.clone());
        classify_other(&node, group, kind_name, namespace, name, origin, out);
        return;
    };
    let namespace = if kind.namespaced() {
        explicit_ns.unwrap_or_else(|| opts.default_namespace.clone())
    } else {
        String::new()
    };
    let object = ObjectRef {
        kind: kind.as_str().to_string(),
        namespace: namespace.clone(),
        name: name.clone(),
    };
    if !kind.versions().contains(&version) {
        let served: Vec<String> = kind
            .versions()
            .iter()
            .map(|v| {
                if group.is_empty() {
                    v.to_string()
                } else {
                    format!("{group}/{v}")
                }
            })
            .collect();
        out.push(Parsed::rejected(
            Some(object.clone()),
            vec![error_at(
                "apiVersion",
                Some(object),
                format!(
                    "apiVersion {api_version:?} is not served for {kind_name}; use {}",
                    served.join(" or ")
                ),
            )],
        ));
        return;
    }

    let typed = match kind {
        Kind::VirtualService => typed(&node, Spec::VirtualService),
        Kind::DestinationRule => typed(&node, Spec::DestinationRule),
        Kind::Gateway => typed(&node, Spec::Gateway),
        Kind::ServiceEntry => typed(&node, Spec::ServiceEntry),
        Kind::Sidecar => typed(&node, Spec::Sidecar),
        Kind::WorkloadEntry => typed(&node, Spec::WorkloadEntry),
        Kind::WorkloadGroup => typed(&node, Spec::WorkloadGroup),
        Kind::PeerAuthentication => typed(&node, Spec::PeerAuthentication),
        Kind::AuthorizationPolicy => typed(&node, Spec::AuthorizationPolicy),
        Kind::RequestAuthentication => typed(&node, Spec::RequestAuthentication),
        Kind::Telemetry => typed(&node, Spec::Telemetry),
        Kind::Service => typed(&node, Spec::Service),
        Kind::Namespace => typed(&node, Spec::Namespace),
        Kind::Workload => typed(&node, Spec::Workload),
    };
    let (mut meta, spec) = match typed {
        Ok(v) => v,
        Err(e) => {
            let diag = de_diagnostic(&origin, Some(object.clone()), e);
            out.push(Parsed::rejected(Some(object), vec![diag]));
            return;
        }
    };
    meta.namespace = kind.namespaced().then_some(namespace);
    let resource = Resource {
        kind,
        api_version: api_version.to_string(),
        meta,
        spec,
        origin: origin.clone(),
    };
    let diagnostics: Vec<Diagnostic> = validate::validate(&resource)
        .into_iter()
        .map(|issue| Diagnostic {
            level: issue.level,
            location: origin.location(&issue.path),
            object: Some(object.clone()),
            path: issue.path,
            message: issue.message,
        })
        .collect();
    let rejected = diagnostics.iter().any(|d| d.level == Level::Error);
    out.push(Parsed {
        document: (!rejected).then_some(Document::Config(resource)),
        object: Some(object),
        diagnostics,
    });
}

fn typed<S: DeserializeOwned + Default>(
    node: &Node,
    wrap: fn(S) -> Spec,
) -> Result<(ObjectMeta, Spec), DeError> {
    let env: Envelope<S> = de::from_node(node)?;
    Ok((env.metadata, wrap(env.spec)))
}

fn de_diagnostic(origin: &Origin, object: Option<ObjectRef>, e: DeError) -> Diagnostic {
    Diagnostic {
        level: Level::Error,
        location: Location {
            file: origin.file.clone(),
            mark: e.mark.unwrap_or(origin.node.mark),
        },
        object,
        path: e.path,
        message: e.message,
    }
}

/// Documents of kinds Trellis does not configure itself: pod owners and TLS secrets are
/// kept for the analyzers; anything else is skipped with a note.
fn classify_other(
    node: &Node,
    group: &str,
    kind: &str,
    namespace: String,
    name: String,
    origin: Origin,
    out: &mut Vec<Parsed>,
) {
    let object = ObjectRef {
        kind: kind.to_string(),
        namespace: namespace.clone(),
        name: name.clone(),
    };
    let pod_group = matches!(group, "" | "apps" | "batch");
    if pod_group && kube::POD_KINDS.contains(&kind) {
        let meta: ObjectMeta = match node.get("metadata").map(de::from_node) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                let e = DeError {
                    path: format!(
                        "metadata{}{}",
                        if e.path.is_empty() { "" } else { "." },
                        e.path
                    ),
                    ..e
                };
                out.push(Parsed::rejected(
                    Some(object.clone()),
                    vec![de_diagnostic(&origin, Some(object), e)],
                ));
                return;
            }
            None => ObjectMeta::default(),
        };
        let spec = node.get("spec").cloned().unwrap_or_else(|| Node {
            mark: node.mark,
            value: yaml::Value::Scalar {
                text: String::new(),
                plain: true,
            },
        });
        match kube::pod_template(kind, &meta, &spec) {
            Ok(template) => out.push(Parsed {
                document: Some(Document::Pods(PodOwner {
                    kind: kind.to_string(),
                    namespace,
                    name,
                    template,
                    origin,
                })),
                object: Some(object),
                diagnostics: Vec::new(),
            }),
            Err(e) => out.push(Parsed::rejected(
                Some(object.clone()),
                vec![de_diagnostic(&origin, Some(object), e)],
            )),
        }
        return;
    }
    if group.is_empty() && kind == "Secret" {
        let info: SecretInfo = de::from_node(node).unwrap_or_default();
        if info.secret_type == "kubernetes.io/tls" {
            out.push(Parsed {
                document: Some(Document::TlsSecret { namespace, name }),
                object: Some(object),
                diagnostics: Vec::new(),
            });
            return;
        }
    }
    let api = if group.is_empty() {
        "v1".to_string()
    } else {
        format!("{group}/…")
    };
    let note = Diagnostic {
        level: Level::Info,
        location: origin.location(""),
        object: Some(object.clone()),
        path: String::new(),
        message: format!("kind {kind} ({api}) is not Trellis configuration; skipped"),
    };
    out.push(Parsed {
        document: Some(Document::Other(object.clone())),
        object: Some(object),
        diagnostics: vec![note],
    });
}
