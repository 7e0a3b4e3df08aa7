//! The config store: the current, validated configuration, in memory.
//!
//! Objects are keyed by (kind, namespace, name) and held as `Arc<Resource>` so readers take
//! cheap snapshots and never hold a lock while they work. Every change bumps a monotonically
//! increasing store revision and is announced twice:
//!
//! * [`ConfigStore::subscribe`]: a `watch` of the revision. Cheap and coalescing: a consumer
//!   that wakes up re-lists what it needs. This is what most consumers should use.
//! * [`ConfigStore::changes`]: a `broadcast` of every [`Change`], for consumers that want
//!   increments. A receiver that falls behind gets `RecvError::Lagged`; it must then resync by
//!   listing (for example with [`ConfigStore::snapshot`]) and continue from the revision it saw.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{broadcast, watch};
use trellis_api::resource::Kind;
use trellis_api::{ObjectRef, Resource};

/// How many changes a [`ConfigStore::changes`] receiver may fall behind before it lags.
pub const CHANGE_CAPACITY: usize = 1024;

/// Identifies an object in the store: kind, namespace (empty for cluster-scoped kinds), name.
///
/// Ordered by kind, then namespace, then name, which is the order listings come in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// The kind.
    pub kind: Kind,
    /// The namespace; empty for cluster-scoped kinds.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a resource.
    pub fn of(resource: &Resource) -> Self {
        ObjectKey::new(resource.kind, resource.namespace(), resource.name())
    }

    /// The key of an object reference, when its kind is one Trellis configures.
    pub fn from_ref(object: &ObjectRef) -> Option<Self> {
        Kind::from_name(&object.kind)
            .map(|kind| ObjectKey::new(kind, object.namespace.clone(), object.name.clone()))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// What [`ConfigStore::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Applied {
    /// The object was not in the store.
    Created,
    /// The object was in the store with different content.
    Updated,
    /// The object was in the store with the same content: no revision, no notification.
    Unchanged,
}

/// The kind of a [`Change`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeOp {
    /// The object appeared.
    Created,
    /// The object's content changed.
    Updated,
    /// The object was removed.
    Deleted,
}

/// One change to the store, as sent on [`ConfigStore::changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The kind of the object.
    pub kind: Kind,
    /// Its namespace (empty for cluster-scoped kinds).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// What happened.
    pub op: ChangeOp,
    /// The store revision this change produced.
    pub revision: u64,
}

impl Change {
    /// The key of the changed object.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(self.kind, self.namespace.clone(), self.name.clone())
    }
}

/// A consistent view of the whole store at one revision.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The store revision the view was taken at.
    pub revision: u64,
    /// Every object, ordered by key.
    pub objects: Vec<Arc<Resource>>,
}

#[derive(Debug)]
struct Entry {
    resource: Arc<Resource>,
    /// The store revision that last created or changed this object.
    revision: u64,
}

#[derive(Debug, Default)]
struct Inner {
    objects: BTreeMap<ObjectKey, Entry>,
    revision: u64,
}

/// The in-memory config store. Thread-safe; share it as `Arc<ConfigStore>`.
#[derive(Debug)]
pub struct ConfigStore {
    inner: RwLock<Inner>,
    revision_tx: watch::Sender<u64>,
    changes_tx: broadcast::Sender<Change>,
}

impl Default for ConfigStore {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigStore {
    /// An empty store at revision 0.
    pub fn new() -> Self {
        let (revision_tx, _) = watch::channel(0);
        let (changes_tx, _) = broadcast::channel(CHANGE_CAPACITY);
        ConfigStore {
            inner: RwLock::new(Inner::default()),
            revision_tx,
            changes_tx,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A writer that panicked left the map consistent (every write is a single insert or
        // remove), so a poisoned lock is still safe to use.
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Inserts or replaces an object.
    ///
    /// Content is compared structurally (apiVersion and the document's tree, ignoring line
    /// and column positions): re-applying the same content is [`Applied::Unchanged`] and
    /// neither bumps the revision nor notifies. The stored `Arc` is still replaced in that
    /// case so that positions used in later diagnostics stay accurate.
    pub fn apply(&self, resource: impl Into<Arc<Resource>>) -> Applied {
        let resource = resource.into();
        let key = ObjectKey::of(&resource);
        let mut inner = self.write();
        let outcome = match inner.objects.get_mut(&key) {
            Some(entry) if same_content(&entry.resource, &resource) => {
                entry.resource = resource;
                return Applied::Unchanged;
            }
            Some(_) => Applied::Updated,
            None => Applied::Created,
        };
        inner.revision += 1;
        let revision = inner.revision;
        inner
            .objects
            .insert(key.clone(), Entry { resource, revision });
        let op = match outcome {
            Applied::Created => ChangeOp::Created,
            _ => ChangeOp::Updated,
        };
        self.notify(key, op, revision);
        outcome
    }

    /// Removes an object; returns it when it was present.
    pub fn delete(&self, key: &ObjectKey) -> Option<Arc<Resource>> {
        let mut inner = self.write();
        let entry = inner.objects.remove(key)?;
        inner.revision += 1;
        let revision = inner.revision;
        self.notify(key.clone(), ChangeOp::Deleted, revision);
        Some(entry.resource)
    }

    /// Announces a change. Called with the write lock held so that notifications go out in
    /// revision order.
    fn notify(&self, key: ObjectKey, op: ChangeOp, revision: u64) {
        // No receivers is not an error: nobody is listening yet.
        let _ = self.changes_tx.send(Change {
            kind: key.kind,
            namespace: key.namespace,
            name: key.name,
            op,
            revision,
        });
        self.revision_tx.send_replace(revision);
    }

    /// The object with this key.
    pub fn get(&self, key: &ObjectKey) -> Option<Arc<Resource>> {
        self.read().objects.get(key).map(|e| e.resource.clone())
    }

    /// The object with this kind, namespace and name.
    pub fn get_by(&self, kind: Kind, namespace: &str, name: &str) -> Option<Arc<Resource>> {
        self.get(&ObjectKey::new(kind, namespace, name))
    }

    /// The store revision at which the object was last created or changed.
    pub fn object_revision(&self, key: &ObjectKey) -> Option<u64> {
        self.read().objects.get(key).map(|e| e.revision)
    }

    /// Every object of a kind, ordered by namespace then name.
    pub fn list(&self, kind: Kind) -> Vec<Arc<Resource>> {
        let start = ObjectKey::new(kind, "", "");
        self.read()
            .objects
            .range(start..)
            .take_while(|(k, _)| k.kind == kind)
            .map(|(_, e)| e.resource.clone())
            .collect()
    }

    /// Every object, ordered by key, with the revision it was read at.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.read();
        Snapshot {
            revision: inner.revision,
            objects: inner.objects.values().map(|e| e.resource.clone()).collect(),
        }
    }

    /// The keys of every object, ordered.
    pub fn keys(&self) -> Vec<ObjectKey> {
        self.read().objects.keys().cloned().collect()
    }

    /// How many objects the store holds.
    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.read().objects.is_empty()
    }

    /// The current store revision (0 for a store that never changed).
    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// A receiver of the store revision. Coalescing: after a burst of changes a consumer
    /// wakes once and re-lists.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    /// A receiver of every change from now on. On `RecvError::Lagged` the consumer missed
    /// changes and must resync by listing (see [`ConfigStore::snapshot`]).
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes_tx.subscribe()
    }
}

/// Whether two resources have the same content (positions ignored).
pub(crate) fn same_content(a: &Resource, b: &Resource) -> bool {
    a.kind == b.kind && a.api_version == b.api_version && a.origin.node.same_content(&b.origin.node)
}

/// Structural equality of two YAML trees, ignoring marks.
#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::broadcast::error::TryRecvError;
    use trellis_api::{LoadOptions, parse_text};

    fn resource(text: &str) -> Resource {
        let parsed = parse_text(text, "test.yaml", &LoadOptions::default());
        assert_eq!(parsed.len(), 1);
        match parsed[0].resource() {
            Some(r) => r.clone(),
            None => panic!("not accepted: {:?}", parsed[0].diagnostics),
        }
    }

    fn service(name: &str, port: u16) -> Resource {
        resource(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  selector:\n    app: {name}\n  ports:\n  - name: http\n    port: {port}\n"
        ))
    }

    #[test]
    fn apply_get_delete_and_revisions() {
        let store = ConfigStore::new();
        let mut rev = store.subscribe();
        let mut changes = store.changes();
        assert_eq!(store.revision(), 0);

        assert_eq!(store.apply(service("reviews", 9080)), Applied::Created);
        assert_eq!(store.revision(), 1);
        assert!(rev.has_changed().unwrap_or(false));
        assert_eq!(*rev.borrow_and_update(), 1);

        // Same content, different positions (a leading blank line): unchanged.
        let moved = resource(
            "\n\napiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\n  namespace: shop\nspec:\n  selector:\n    app: reviews\n  ports:\n  - name: http\n    port: 9080\n",
        );
        assert_eq!(store.apply(moved), Applied::Unchanged);
        assert_eq!(store.revision(), 1);
        assert!(!rev.has_changed().unwrap_or(true));
        let stored = store.get_by(Kind::Service, "shop", "reviews");
        assert_eq!(stored.map(|r| r.origin.node.mark.line), Some(3));

        assert_eq!(store.apply(service("reviews", 9081)), Applied::Updated);
        assert_eq!(store.revision(), 2);
        let key = ObjectKey::new(Kind::Service, "shop", "reviews");
        assert_eq!(store.object_revision(&key), Some(2));

        assert!(store.delete(&key).is_some());
        assert!(store.delete(&key).is_none());
        assert_eq!(store.revision(), 3);
        assert!(store.is_empty());

        let ops: Vec<(ChangeOp, u64)> = std::iter::from_fn(|| changes.try_recv().ok())
            .map(|c| (c.op, c.revision))
            .collect();
        assert_eq!(
            ops,
            vec![
                (ChangeOp::Created, 1),
                (ChangeOp::Updated, 2),
                (ChangeOp::Deleted, 3)
            ]
        );
    }

    #[test]
    fn list_is_by_kind_and_sorted() {
        let store = ConfigStore::new();
        for name in ["ratings", "details", "reviews"] {
            store.apply(service(name, 9080));
        }
        store.apply(resource(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: reviews\n  namespace: shop\nspec:\n  host: reviews\n",
        ));
        let names: Vec<String> = store
            .list(Kind::Service)
            .iter()
            .map(|r| r.name().to_string())
            .collect();
        assert_eq!(names, ["details", "ratings", "reviews"]);
        assert_eq!(store.list(Kind::DestinationRule).len(), 1);
        assert!(store.list(Kind::VirtualService).is_empty());
        assert_eq!(store.len(), 4);
        let snap = store.snapshot();
        assert_eq!(snap.revision, 4);
        assert_eq!(snap.objects.len(), 4);
    }

    #[test]
    fn lagged_receiver_is_told() {
        let store = ConfigStore::new();
        let mut changes = store.changes();
        for port in 0..(CHANGE_CAPACITY as u16 + 10) {
            store.apply(service("reviews", 1000 + port));
        }
        assert!(matches!(changes.try_recv(), Err(TryRecvError::Lagged(_))));
        // After a lag the receiver continues with the oldest change still buffered.
        assert!(changes.try_recv().is_ok());
    }
}
