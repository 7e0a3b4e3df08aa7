//! A config source that reads a directory of YAML/JSON files and watches it.
//!
//! [`DirectorySource::load_once`] loads every `*.yaml`, `*.yml` and `*.json` file under the
//! directory (recursively; hidden entries skipped) into a [`ConfigStore`];
//! [`DirectorySource::start`] does the same and then follows the directory with inotify
//! (through `notify`), reloading only the files that changed after a short debounce.
//!
//! Rules, per file:
//!
//! * A file's valid documents are applied; the objects it no longer declares are deleted.
//! * A document whose new version is invalid is rejected alone: its diagnostics are logged
//!   (`warn`, as `file:line:col: Kind ns/name: path: message`) and kept for
//!   [`DirectorySource::diagnostics`], and the last good version of that object stays.
//! * When a document cannot even be identified (a YAML syntax error, a document without
//!   `apiVersion`/`kind`, an unreadable file), the objects the file declared before and that
//!   were not seen again are kept: a half-written file loses nothing. An empty file counts
//!   as such (editors truncate before writing): to remove a file's objects, delete the file.
//! * A deleted file deletes its objects.
//! * When two files declare the same object, the version loaded last wins (with a warning);
//!   deleting one of the files hands the object back to the other instead of deleting it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use trellis_api::load::{self, LoadOptions, Parsed};
use trellis_api::{Diagnostic, Document, Level, Resource};

use crate::store::{Applied, ConfigStore, ObjectKey, same_content};

/// How long the watcher waits for a burst of file events to end before reloading.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// The longest a continuous burst of events can delay a reload.
const MAX_DEBOUNCE: Duration = Duration::from_secs(1);

/// How many raw file events may queue before the watcher falls back to a full reload.
const EVENT_QUEUE: usize = 4096;

/// Errors of [`DirectorySource`].
#[derive(Debug, thiserror::Error)]
pub enum DirSourceError {
    /// The directory could not be listed.
    #[error("cannot read config directory {}: {source}", path.display())]
    Read {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The directory could not be watched.
    #[error("cannot watch config directory {}: {source}", path.display())]
    Watch {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: notify::Error,
    },
    /// [`DirectorySource::start`] was called outside a tokio runtime.
    #[error("the directory watcher must be started from within a tokio runtime")]
    NoRuntime,
}

/// What one reload did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Files read.
    pub files_read: usize,
    /// Files that disappeared.
    pub files_removed: usize,
    /// Objects created in the store.
    pub created: usize,
    /// Objects updated in the store.
    pub updated: usize,
    /// Objects deleted from the store.
    pub deleted: usize,
    /// Error diagnostics in the files read (rejected documents).
    pub errors: usize,
}

/// A good version of an object declared by a file.
#[derive(Debug)]
struct Owned {
    resource: Arc<Resource>,
    /// When this file's version of the object last changed (a source-wide counter): among
    /// the files declaring an object, the highest wins.
    seq: u64,
}

#[derive(Debug, Default)]
struct FileState {
    /// The last good version of each object the file declares.
    good: BTreeMap<ObjectKey, Owned>,
    /// Diagnostics of the file's latest read.
    diagnostics: Vec<Diagnostic>,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<PathBuf, FileState>,
    seq: u64,
}

/// What a reload should look at.
#[derive(Debug, Default)]
struct Batch {
    /// Config files named by events.
    dirty: BTreeSet<PathBuf>,
    /// Reload every file (queue overflow, watcher error, a Kubernetes `..data` swap).
    all: bool,
    /// Whether any event could have changed something.
    relevant: bool,
}

/// Loads a directory of config files into a [`ConfigStore`] and keeps it in sync.
#[derive(Debug)]
pub struct DirectorySource {
    root: PathBuf,
    store: Arc<ConfigStore>,
    options: LoadOptions,
    debounce: Duration,
    state: Mutex<State>,
    reloads: watch::Sender<u64>,
}

impl DirectorySource {
    /// A source for `dir` (made absolute, symlinks kept) feeding `store`, with default load
    /// options (objects without a namespace go to `default`). Nothing is read yet.
    pub fn new(dir: impl AsRef<Path>, store: Arc<ConfigStore>) -> Self {
        Self::with_options(dir, store, LoadOptions::default())
    }

    /// Like [`DirectorySource::new`] with explicit load options.
    pub fn with_options(
        dir: impl AsRef<Path>,
        store: Arc<ConfigStore>,
        options: LoadOptions,
    ) -> Self {
        let dir = dir.as_ref();
        let root = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let (reloads, _) = watch::channel(0);
        DirectorySource {
            root,
            store,
            options,
            debounce: DEFAULT_DEBOUNCE,
            state: Mutex::new(State::default()),
            reloads,
        }
    }

    /// Sets how long the watcher waits for a burst of events to end (default 100 ms).
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// The directory this source reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store this source feeds.
    pub fn store(&self) -> &Arc<ConfigStore> {
        &self.store
    }

    /// Loads `dir` into `store`, starts watching it and returns the handle of the watching
    /// task. Must be called from within a tokio runtime. The watch is set up before the
    /// initial load, so no change made meanwhile is missed. Dropping the handle stops the
    /// watch.
    pub fn start(
        dir: impl AsRef<Path>,
        store: Arc<ConfigStore>,
    ) -> Result<DirectorySourceHandle, DirSourceError> {
        Arc::new(Self::new(dir, store)).watch()
    }

    /// Loads the directory and starts watching it (see [`DirectorySource::start`]).
    pub fn watch(self: Arc<Self>) -> Result<DirectorySourceHandle, DirSourceError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| DirSourceError::NoRuntime)?;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let overflow = Arc::new(AtomicBool::new(false));
        let overflowed = overflow.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            if tx.try_send(event).is_err() {
                // Full (or the task ended): reload everything on the next round.
                overflowed.store(true, Ordering::Release);
            }
        })
        .map_err(|source| DirSourceError::Watch {
            path: self.root.clone(),
            source,
        })?;
        watcher
            .watch(&self.root, RecursiveMode::Recursive)
            .map_err(|source| DirSourceError::Watch {
                path: self.root.clone(),
                source,
            })?;
        let summary = self.load_once()?;
        info!(
            dir = %self.root.display(),
            files = summary.files_read,
            objects = summary.created + summary.updated,
            errors = summary.errors,
            "loaded config directory; watching for changes"
        );
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let task = runtime.spawn(run(self.clone(), watcher, rx, overflow, shutdown_rx));
        Ok(DirectorySourceHandle {
            source: self,
            shutdown: Some(shutdown_tx),
            task: Some(task),
        })
    }

    /// Reads every config file under the directory now, applies what changed to the store
    /// and forgets files that are gone. Used at startup and by tests; safe to call again.
    pub fn load_once(&self) -> Result<ReloadSummary, DirSourceError> {
        let listing = load::config_files(&self.root).map_err(|source| DirSourceError::Read {
            path: self.root.clone(),
            source,
        })?;
        Ok(self.reload(
            Some(listing),
            &Batch {
                all: true,
                ..Batch::default()
            },
        ))
    }

    /// The diagnostics of the latest read of every file, in file order: why a document was
    /// rejected, warnings, and notes about skipped kinds.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        self.lock()
            .files
            .values()
            .flat_map(|f| f.diagnostics.iter().cloned())
            .collect()
    }

    /// The config files currently known, sorted.
    pub fn files(&self) -> Vec<PathBuf> {
        self.lock().files.keys().cloned().collect()
    }

    /// A receiver of the number of reloads done so far; it changes after every reload,
    /// whether or not the store changed (useful to wait for a rejected edit to be seen).
    pub fn subscribe_reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a path is one this source reads: a config file with no hidden component
    /// below the root.
    fn is_source_file(&self, path: &Path) -> bool {
        if !load::is_config_file(path) {
            return false;
        }
        match path.strip_prefix(&self.root) {
            Ok(rel) => !rel
                .components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with('.')),
            Err(_) => false,
        }
    }

    /// Reloads the files a batch names, plus the files that appeared or disappeared
    /// according to `listing` (when the directory could be listed).
    fn reload(&self, listing: Option<Vec<PathBuf>>, batch: &Batch) -> ReloadSummary {
        let mut summary = ReloadSummary::default();
        let mut state = self.lock();
        let on_disk: Option<BTreeSet<PathBuf>> = listing.map(|l| l.into_iter().collect());
        let tracked: BTreeSet<PathBuf> = state.files.keys().cloned().collect();

        let mut todo: BTreeSet<PathBuf> = batch.dirty.clone();
        if batch.all {
            todo.extend(tracked.iter().cloned());
        }
        if let Some(on_disk) = &on_disk {
            todo.extend(on_disk.symmetric_difference(&tracked).cloned());
            if batch.all {
                todo.extend(on_disk.iter().cloned());
            }
        }

        for path in todo {
            let present = match &on_disk {
                Some(on_disk) => on_disk.contains(&path),
                None => self.is_source_file(&path) && path.is_file(),
            };
            if present {
                let parsed = load::load_file(&path, &self.options);
                summary.files_read += 1;
                self.update_file(&mut state, path, parsed, &mut summary);
            } else if state.files.contains_key(&path) {
                summary.files_removed += 1;
                self.remove_file(&mut state, &path, &mut summary);
            }
        }
        drop(state);
        self.reloads.send_modify(|n| *n += 1);
        summary
    }

    /// Takes in the new contents of a file.
    fn update_file(
        &self,
        state: &mut State,
        path: PathBuf,
        parsed: Vec<Parsed>,
        summary: &mut ReloadSummary,
    ) {
        let old = state.files.remove(&path).unwrap_or_default();
        let mut accepted: BTreeMap<ObjectKey, Resource> = BTreeMap::new();
        let mut rejected: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut unidentified = false;
        let mut diagnostics = Vec::new();

        for p in parsed {
            for d in &p.diagnostics {
                match d.level {
                    Level::Error => {
                        summary.errors += 1;
                        warn!("{d}");
                    }
                    Level::Warning => warn!("{d}"),
                    Level::Info => debug!("{d}"),
                }
            }
            diagnostics.extend(p.diagnostics);
            match (p.document, p.object) {
                (Some(Document::Config(resource)), _) => {
                    let key = ObjectKey::of(&resource);
                    if accepted.insert(key.clone(), resource).is_some() {
                        warn!(
                            file = %path.display(),
                            "{key} is declared more than once in the file; the last one is used"
                        );
                    }
                }
                // Pod owners, TLS secrets and other kinds are not store configuration.
                (Some(_), _) => {}
                (None, Some(object)) => {
                    // A rejected document of a kind the store does not hold needs nothing.
                    if let Some(key) = ObjectKey::from_ref(&object) {
                        rejected.insert(key);
                    }
                }
                (None, None) => unidentified = true,
            }
        }

        let mut good = BTreeMap::new();
        for (key, resource) in accepted {
            let seq = match old.good.get(&key) {
                Some(prev) if same_content(&prev.resource, &resource) => prev.seq,
                _ => {
                    state.seq += 1;
                    state.seq
                }
            };
            let resource = Arc::new(resource);
            good.insert(key, Owned { resource, seq });
        }
        let mut gone = Vec::new();
        for (key, prev) in old.good {
            if good.contains_key(&key) {
                continue;
            }
            if rejected.contains(&key) {
                warn!(
                    file = %path.display(),
                    "{key}: the new version was rejected; keeping the last good version"
                );
                good.insert(key, prev);
            } else if unidentified {
                warn!(
                    file = %path.display(),
                    "{key}: not found in the file, which has a document that could not be \
                     read; keeping the last good version"
                );
                good.insert(key, prev);
            } else {
                gone.push(key);
            }
        }

        let keys: Vec<ObjectKey> = good.keys().cloned().collect();
        state
            .files
            .insert(path.clone(), FileState { good, diagnostics });
        for key in keys.iter().chain(&gone) {
            self.resolve(state, key, Some(&path), summary);
        }
    }

    /// Forgets a file that is gone and everything it declared.
    fn remove_file(&self, state: &mut State, path: &Path, summary: &mut ReloadSummary) {
        let Some(old) = state.files.remove(path) else {
            return;
        };
        debug!(file = %path.display(), "config file removed");
        for key in old.good.keys() {
            self.resolve(state, key, None, summary);
        }
    }

    /// Puts in the store the winning version of an object among the files that declare it,
    /// or deletes it when none does. `loaded` is the file just read, if any.
    fn resolve(
        &self,
        state: &State,
        key: &ObjectKey,
        loaded: Option<&Path>,
        summary: &mut ReloadSummary,
    ) {
        let mut owners: Vec<(&Path, &Owned)> = state
            .files
            .iter()
            .filter_map(|(p, f)| f.good.get(key).map(|o| (p.as_path(), o)))
            .collect();
        owners.sort_by_key(|(_, o)| o.seq);
        let Some((winner, owned)) = owners.last() else {
            if self.store.delete(key).is_some() {
                summary.deleted += 1;
            }
            return;
        };
        let outcome = self.store.apply(owned.resource.clone());
        match outcome {
            Applied::Created => summary.created += 1,
            Applied::Updated => summary.updated += 1,
            Applied::Unchanged => {}
        }
        if owners.len() > 1 && outcome != Applied::Unchanged {
            let others: Vec<String> = owners[..owners.len() - 1]
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            if loaded == Some(*winner) {
                warn!(
                    "{key} is declared in {} and also in {}; using {} (loaded last)",
                    winner.display(),
                    others.join(", "),
                    winner.display()
                );
            } else {
                info!("{key} is now taken from {}", winner.display());
            }
        }
    }

    /// Reloads after a batch of events.
    fn reload_batch(&self, batch: &Batch) -> ReloadSummary {
        let listing = match load::config_files(&self.root) {
            Ok(l) => Some(l),
            // The whole directory is gone: so are its files.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(Vec::new()),
            Err(e) => {
                warn!(dir = %self.root.display(), "cannot list config directory: {e}");
                None
            }
        };
        self.reload(listing, batch)
    }

    /// Adds an event to a batch.
    fn add_event(&self, batch: &mut Batch, event: notify::Result<Event>) {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                warn!(dir = %self.root.display(), "config watch error, reloading everything: {e}");
                batch.all = true;
                batch.relevant = true;
                return;
            }
        };
        match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return,
            _ => {}
        }
        batch.relevant = true;
        if event.need_rescan() {
            batch.all = true;
        }
        for path in event.paths {
            if self.is_source_file(&path) {
                batch.dirty.insert(path);
            } else if path
                .strip_prefix(&self.root)
                .is_ok_and(|rel| rel.components().any(|c| c.as_os_str() == "..data"))
            {
                // A Kubernetes ConfigMap volume swaps its `..data` symlink: every visible
                // file may have new contents while its own path saw no event.
                batch.all = true;
            }
        }
    }
}

/// The watching task: debounces events and reloads on a blocking thread.
async fn run(
    source: Arc<DirectorySource>,
    _watcher: RecommendedWatcher,
    mut events: mpsc::Receiver<notify::Result<Event>>,
    overflow: Arc<AtomicBool>,
    mut shutdown: oneshot::Receiver<()>,
) {
    loop {
        let mut batch = Batch::default();
        tokio::select! {
            _ = &mut shutdown => break,
            event = events.recv() => match event {
                Some(event) => source.add_event(&mut batch, event),
                None => break,
            },
        }
        let start = Instant::now();
        let mut deadline = start + source.debounce;
        let mut closed = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                event = events.recv() => match event {
                    Some(event) => {
                        source.add_event(&mut batch, event);
                        deadline = (Instant::now() + source.debounce).min(start + MAX_DEBOUNCE);
                    }
                    None => {
                        closed = true;
                        break;
                    }
                },
            }
        }
        if overflow.swap(false, Ordering::AcqRel) {
            warn!(dir = %source.root.display(), "config watch queue overflowed; reloading everything");
            batch.all = true;
            batch.relevant = true;
        }
        if batch.relevant {
            let worker = source.clone();
            match tokio::task::spawn_blocking(move || worker.reload_batch(&batch)).await {
                Ok(summary) => debug!(
                    dir = %source.root.display(),
                    ?summary,
                    "config directory reloaded"
                ),
                Err(e) => warn!(dir = %source.root.display(), "config reload failed: {e}"),
            }
        }
        if closed {
            break;
        }
    }
    debug!(dir = %source.root.display(), "stopped watching config directory");
}

/// The running watch of a [`DirectorySource`]. Dropping it stops the watch (the store keeps
/// what was loaded).
#[derive(Debug)]
pub struct DirectorySourceHandle {
    source: Arc<DirectorySource>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl DirectorySourceHandle {
    /// The source being watched.
    pub fn source(&self) -> &Arc<DirectorySource> {
        &self.source
    }

    /// The diagnostics of the latest read of every file (see
    /// [`DirectorySource::diagnostics`]).
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        self.source.diagnostics()
    }

    /// A receiver that changes after every reload (see
    /// [`DirectorySource::subscribe_reloads`]).
    pub fn subscribe_reloads(&self) -> watch::Receiver<u64> {
        self.source.subscribe_reloads()
    }

    /// Stops watching and waits for the task to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            warn!("config directory watch task failed: {e}");
        }
    }
}

impl Drop for DirectorySourceHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
