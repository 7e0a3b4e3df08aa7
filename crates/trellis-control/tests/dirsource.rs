//! DirectorySource against real files in temporary directories and real inotify events.
//! Every wait is bounded.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use trellis_api::Spec;
use trellis_api::resource::Kind;
use trellis_control::{ChangeOp, ConfigStore, DirectorySource, ObjectKey};

const WAIT: Duration = Duration::from_secs(5);

const SERVICE_REVIEWS: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: bookinfo
  labels:
    app: reviews
spec:
  selector:
    app: reviews
  ports:
  - name: http
    port: 9080
"#;

const DR_REVIEWS: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: bookinfo
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"#;

/// The reviews VirtualService sending `w1`% to v1 and the rest to v2.
fn vs_reviews(w1: &str, w2: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: bookinfo
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: {w1}
    - destination:
        host: reviews
        subset: v2
      weight: {w2}
"#
    )
}

fn ratings_vs() -> &'static str {
    r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
  namespace: bookinfo
spec:
  hosts:
  - ratings
  http:
  - route:
    - destination:
        host: ratings
"#
}

fn key(kind: Kind, name: &str) -> ObjectKey {
    ObjectKey::new(kind, "bookinfo", name)
}

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(path, text).expect("write");
}

/// Writes through a temporary file and a rename, as editors and `kubectl`-style tools do.
fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write tmp");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

/// The weights of the first HTTP route of a stored VirtualService.
fn weights(store: &ConfigStore, name: &str) -> Option<Vec<i64>> {
    let vs = store.get(&key(Kind::VirtualService, name))?;
    assert!(matches!(vs.spec, Spec::VirtualService(_)));
    let node = vs.origin.node.locate("spec.http[0].route");
    let routes = node.as_seq()?;
    Some(
        routes
            .iter()
            .filter_map(|r| r.get("weight").and_then(|w| w.as_scalar()?.parse().ok()))
            .collect(),
    )
}

/// Waits, at most `WAIT`, until `cond` holds, re-checking after every reload.
async fn wait_until(
    reloads: &mut watch::Receiver<u64>,
    what: &str,
    mut cond: impl FnMut() -> bool,
) {
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            reloads.borrow_and_update();
            if cond() {
                return;
            }
            if reloads.changed().await.is_err() {
                panic!("the source was dropped while waiting for {what}");
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out after {WAIT:?} waiting for {what}"
    );
}

fn diagnostics_text(source: &DirectorySource) -> Vec<String> {
    source
        .diagnostics()
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn initial_load_reads_the_tree_and_skips_hidden_and_other_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "reviews/service.yaml", SERVICE_REVIEWS);
    write(
        dir.path(),
        "reviews/routing.yml",
        &format!("{}---\n{DR_REVIEWS}", vs_reviews("80", "20")),
    );
    write(dir.path(), ".hidden/ratings.yaml", ratings_vs());
    write(dir.path(), ".ratings.yaml", ratings_vs());
    write(dir.path(), "notes.txt", ratings_vs());
    let store = Arc::new(ConfigStore::new());
    let source = DirectorySource::new(dir.path(), store.clone());
    let summary = source.load_once().expect("load");

    assert_eq!(summary.files_read, 2);
    assert_eq!(summary.created, 3);
    assert_eq!(summary.errors, 0);
    assert_eq!(store.len(), 3);
    assert!(store.get(&key(Kind::Service, "reviews")).is_some());
    assert!(store.get(&key(Kind::DestinationRule, "reviews")).is_some());
    assert_eq!(weights(&store, "reviews"), Some(vec![80, 20]));
    assert!(store.get(&key(Kind::VirtualService, "ratings")).is_none());
    assert_eq!(source.files().len(), 2);
    assert!(
        source.diagnostics().is_empty(),
        "{:?}",
        diagnostics_text(&source)
    );

    // Loading again without changes changes nothing.
    let revision = store.revision();
    let again = source.load_once().expect("load");
    assert_eq!((again.created, again.updated, again.deleted), (0, 0, 0));
    assert_eq!(store.revision(), revision);
}

#[test]
fn load_once_fails_on_a_missing_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = DirectorySource::new(dir.path().join("nope"), Arc::new(ConfigStore::new()));
    let err = source.load_once().expect_err("missing directory");
    assert!(
        err.to_string().contains("cannot read config directory"),
        "{err}"
    );
}

#[test]
fn good_document_next_to_a_bad_one_still_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "mixed.yaml",
        &format!("{}---\n{DR_REVIEWS}", vs_reviews("\"x\"", "20")),
    );
    let store = Arc::new(ConfigStore::new());
    let source = DirectorySource::new(dir.path(), store.clone());
    let summary = source.load_once().expect("load");
    assert_eq!(summary.created, 1);
    assert!(summary.errors >= 1);
    assert!(store.get(&key(Kind::DestinationRule, "reviews")).is_some());
    assert!(store.get(&key(Kind::VirtualService, "reviews")).is_none());
    let diags = diagnostics_text(&source);
    assert!(
        diags.iter().any(|d| d.contains("mixed.yaml:")
            && d.contains("VirtualService bookinfo/reviews")
            && d.contains("weight")),
        "{diags:?}"
    );
}

#[tokio::test]
async fn watch_follows_adds_edits_and_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "service.yaml", SERVICE_REVIEWS);
    let store = Arc::new(ConfigStore::new());
    let handle = DirectorySource::start(dir.path(), store.clone()).expect("start");
    let mut reloads = handle.subscribe_reloads();
    let mut revisions = store.subscribe();
    let mut changes = store.changes();
    assert_eq!(store.len(), 1);

    // Add a file.
    write(dir.path(), "routing.yaml", &vs_reviews("80", "20"));
    wait_until(&mut reloads, "the VirtualService to appear", || {
        weights(&store, "reviews") == Some(vec![80, 20])
    })
    .await;
    assert!(revisions.has_changed().unwrap_or(false));
    revisions.borrow_and_update();
    let change = changes.try_recv().expect("a change");
    assert_eq!(change.key(), key(Kind::VirtualService, "reviews"));
    assert_eq!(change.op, ChangeOp::Created);
    assert_eq!(change.revision, store.revision());

    // Edit it in place.
    write(dir.path(), "routing.yaml", &vs_reviews("50", "50"));
    wait_until(&mut reloads, "the VirtualService to be updated", || {
        weights(&store, "reviews") == Some(vec![50, 50])
    })
    .await;

    // Replace it atomically, adding a DestinationRule.
    write_atomic(
        dir.path(),
        "routing.yaml",
        &format!("{}---\n{DR_REVIEWS}", vs_reviews("10", "90")),
    );
    wait_until(&mut reloads, "the atomic replace to be seen", || {
        weights(&store, "reviews") == Some(vec![10, 90])
            && store.get(&key(Kind::DestinationRule, "reviews")).is_some()
    })
    .await;

    // Drop the VirtualService from the file: it is deleted, the DestinationRule stays.
    write(dir.path(), "routing.yaml", DR_REVIEWS);
    wait_until(&mut reloads, "the VirtualService to be deleted", || {
        store.get(&key(Kind::VirtualService, "reviews")).is_none()
    })
    .await;
    assert!(store.get(&key(Kind::DestinationRule, "reviews")).is_some());

    // Delete a file: its objects go.
    std::fs::remove_file(dir.path().join("routing.yaml")).expect("rm");
    wait_until(&mut reloads, "the DestinationRule to be deleted", || {
        store.get(&key(Kind::DestinationRule, "reviews")).is_none()
    })
    .await;
    assert_eq!(store.len(), 1);
    assert_eq!(handle.source().files().len(), 1);

    // A file in a new subdirectory.
    write(dir.path(), "ratings/vs.yaml", ratings_vs());
    wait_until(&mut reloads, "the file in a new directory", || {
        store.get(&key(Kind::VirtualService, "ratings")).is_some()
    })
    .await;

    // Removing the directory removes its objects.
    std::fs::remove_dir_all(dir.path().join("ratings")).expect("rm -r");
    wait_until(
        &mut reloads,
        "the removed directory's objects to go",
        || store.get(&key(Kind::VirtualService, "ratings")).is_none(),
    )
    .await;

    handle.shutdown().await;
}

#[tokio::test]
async fn invalid_new_version_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "routing.yaml", &vs_reviews("80", "20"));
    let store = Arc::new(ConfigStore::new());
    let handle = DirectorySource::start(dir.path(), store.clone()).expect("start");
    let mut reloads = handle.subscribe_reloads();
    let source = handle.source().clone();
    let revision = store.revision();

    // A weight that is not a number.
    write(dir.path(), "routing.yaml", &vs_reviews("\"x\"", "20"));
    wait_until(&mut reloads, "the bad weight to be reported", || {
        !source.diagnostics().is_empty()
    })
    .await;
    let diags = diagnostics_text(&source);
    assert!(
        diags.iter().any(|d| d.contains("routing.yaml:14:15:")
            && d.contains("VirtualService bookinfo/reviews: spec.http[0].route[0].weight")),
        "{diags:?}"
    );
    assert_eq!(weights(&store, "reviews"), Some(vec![80, 20]));
    assert_eq!(store.revision(), revision);

    // An unknown field.
    write(
        dir.path(),
        "routing.yaml",
        &vs_reviews("70", "30").replace("  hosts:", "  hostz:\n  - reviews\n  hosts:"),
    );
    wait_until(&mut reloads, "the unknown field to be reported", || {
        diagnostics_text(&source)
            .iter()
            .any(|d| d.contains("hostz"))
    })
    .await;
    assert_eq!(weights(&store, "reviews"), Some(vec![80, 20]));
    assert_eq!(store.revision(), revision);

    // Fixed: the new version goes in and the diagnostics clear.
    write(dir.path(), "routing.yaml", &vs_reviews("70", "30"));
    wait_until(&mut reloads, "the fixed version", || {
        weights(&store, "reviews") == Some(vec![70, 30])
    })
    .await;
    assert!(
        source.diagnostics().is_empty(),
        "{:?}",
        diagnostics_text(&source)
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn syntax_error_keeps_the_previous_objects() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "reviews.yaml",
        &format!("{SERVICE_REVIEWS}---\n{DR_REVIEWS}"),
    );
    let store = Arc::new(ConfigStore::new());
    let handle = DirectorySource::start(dir.path(), store.clone()).expect("start");
    let mut reloads = handle.subscribe_reloads();
    let source = handle.source().clone();
    assert_eq!(store.len(), 2);
    let revision = store.revision();

    // Half-written: the DestinationRule document is cut in the middle of a flow mapping.
    write(
        dir.path(),
        "reviews.yaml",
        &format!("{SERVICE_REVIEWS}---\napiVersion: networking.istio.io/v1\nkind: {{ Destin"),
    );
    wait_until(&mut reloads, "the syntax error to be reported", || {
        diagnostics_text(&source)
            .iter()
            .any(|d| d.contains("reviews.yaml:") && d.contains("YAML syntax error"))
    })
    .await;
    assert!(store.get(&key(Kind::Service, "reviews")).is_some());
    assert!(store.get(&key(Kind::DestinationRule, "reviews")).is_some());
    assert_eq!(store.revision(), revision);

    // Truncated (an editor between truncate and write): still nothing is lost.
    write(dir.path(), "reviews.yaml", "");
    wait_until(&mut reloads, "the empty file to be reported", || {
        diagnostics_text(&source)
            .iter()
            .any(|d| d.contains("no configuration documents"))
    })
    .await;
    assert_eq!(store.len(), 2);
    assert_eq!(store.revision(), revision);

    // Complete again without the DestinationRule: now it is really gone.
    write(dir.path(), "reviews.yaml", SERVICE_REVIEWS);
    wait_until(&mut reloads, "the DestinationRule to be deleted", || {
        store.get(&key(Kind::DestinationRule, "reviews")).is_none()
    })
    .await;
    assert!(store.get(&key(Kind::Service, "reviews")).is_some());
    assert!(
        source.diagnostics().is_empty(),
        "{:?}",
        diagnostics_text(&source)
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn same_object_in_two_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.yaml", &vs_reviews("80", "20"));
    write(dir.path(), "b.yaml", &vs_reviews("60", "40"));
    let store = Arc::new(ConfigStore::new());
    let handle = DirectorySource::start(dir.path(), store.clone()).expect("start");
    let mut reloads = handle.subscribe_reloads();
    // Files load in sorted order: b.yaml was loaded last.
    assert_eq!(weights(&store, "reviews"), Some(vec![60, 40]));

    // Editing a.yaml makes it the last loaded.
    write(dir.path(), "a.yaml", &vs_reviews("90", "10"));
    wait_until(&mut reloads, "a.yaml's edit to win", || {
        weights(&store, "reviews") == Some(vec![90, 10])
    })
    .await;

    // Deleting a.yaml hands the object back to b.yaml instead of deleting it.
    std::fs::remove_file(dir.path().join("a.yaml")).expect("rm");
    wait_until(&mut reloads, "b.yaml's version to come back", || {
        weights(&store, "reviews") == Some(vec![60, 40])
    })
    .await;

    // Deleting b.yaml too deletes the object.
    std::fs::remove_file(dir.path().join("b.yaml")).expect("rm");
    wait_until(&mut reloads, "the object to be deleted", || {
        store.get(&key(Kind::VirtualService, "reviews")).is_none()
    })
    .await;
    handle.shutdown().await;
}

#[tokio::test]
async fn a_bad_duplicate_does_not_replace_the_good_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.yaml", &vs_reviews("80", "20"));
    let store = Arc::new(ConfigStore::new());
    let handle = DirectorySource::start(dir.path(), store.clone()).expect("start");
    let mut reloads = handle.subscribe_reloads();
    let source = handle.source().clone();

    // A second file declares the same object, invalid: rejected, a.yaml's version stays,
    // and deleting the bad file leaves a.yaml's object alone.
    write(dir.path(), "b.yaml", &vs_reviews("\"x\"", "40"));
    wait_until(&mut reloads, "b.yaml to be rejected", || {
        diagnostics_text(&source)
            .iter()
            .any(|d| d.contains("b.yaml:"))
    })
    .await;
    assert_eq!(weights(&store, "reviews"), Some(vec![80, 20]));
    std::fs::remove_file(dir.path().join("b.yaml")).expect("rm");
    wait_until(&mut reloads, "b.yaml to be forgotten", || {
        source.files().len() == 1
    })
    .await;
    assert_eq!(weights(&store, "reviews"), Some(vec![80, 20]));
    assert!(source.diagnostics().is_empty());
    handle.shutdown().await;
}

#[tokio::test]
async fn start_fails_on_a_missing_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = DirectorySource::start(dir.path().join("nope"), Arc::new(ConfigStore::new()))
        .expect_err("missing directory");
    assert!(err.to_string().contains("nope"), "{err}");
}

/// A Kubernetes ConfigMap volume: visible files are symlinks through `..data`, which is
/// swapped atomically to a new hidden directory; the visible paths see no event.
#[tokio::test]
async fn configmap_volume_swap_is_followed() {
    use std::os::unix::fs::symlink;

    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    write(root, "..2024_01_01/routing.yaml", &vs_reviews("80", "20"));
    symlink("..2024_01_01", root.join("..data")).expect("symlink");
    symlink("..data/routing.yaml", root.join("routing.yaml")).expect("symlink");
    let store = Arc::new(ConfigStore::new());
    let handle = DirectorySource::start(root, store.clone()).expect("start");
    let mut reloads = handle.subscribe_reloads();
    assert_eq!(weights(&store, "reviews"), Some(vec![80, 20]));
    assert_eq!(handle.source().files().len(), 1);

    // What the kubelet does: write a new timestamped directory, point `..data_tmp` at it,
    // rename `..data_tmp` over `..data`.
    write(root, "..2024_01_02/routing.yaml", &vs_reviews("30", "70"));
    symlink("..2024_01_02", root.join("..data_tmp")).expect("symlink");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("rename");
    wait_until(&mut reloads, "the swapped contents", || {
        weights(&store, "reviews") == Some(vec![30, 70])
    })
    .await;
    handle.shutdown().await;
}

#[tokio::test]
async fn bursts_are_debounced() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "routing.yaml", &vs_reviews("80", "20"));
    let store = Arc::new(ConfigStore::new());
    let handle = DirectorySource::start(dir.path(), store.clone()).expect("start");
    let mut reloads = handle.subscribe_reloads();
    let before = *reloads.borrow_and_update();
    let revision = store.revision();

    for w in 0..=50 {
        write(
            dir.path(),
            "routing.yaml",
            &vs_reviews(&w.to_string(), &(100 - w).to_string()),
        );
    }
    wait_until(&mut reloads, "the last write", || {
        weights(&store, "reviews") == Some(vec![50, 50])
    })
    .await;
    let reloaded = *reloads.borrow() - before;
    assert!(reloaded <= 5, "{reloaded} reloads for one burst");
    assert!(store.revision() - revision <= 5);
    handle.shutdown().await;
}
