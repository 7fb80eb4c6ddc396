//! Kernel configurations chosen per adapter by timing them ("auto-tune at first use"), kept in
//! memory and in a JSON file so that later runs start with them.
//!
//! The file maps an adapter key (name, backend, driver) to entries `key -> value`; a kernel
//! module decides what its keys and values mean (`ops::linear` stores the tensor-core GEMM's
//! tile configuration per shape class). Every candidate of a tuned choice computes the same
//! results bit for bit, so a cache only changes speed.
//!
//! Where: `NABLA_TUNE_CACHE` (a file path; `off` keeps the choices in memory only), else
//! `$XDG_CACHE_HOME/nabla/tune.json`, else `$HOME/.cache/nabla/tune.json`. A file that cannot
//! be read or parsed is ignored (and rewritten on the next store); a failed write keeps the
//! choice in memory and is reported by [`TuneCache::status`].

use std::collections::BTreeMap;
use std::path::PathBuf;

type Entries = BTreeMap<String, serde_json::Value>;

/// The tuned choices of one adapter, and where they are kept.
#[derive(Debug, Default)]
pub struct TuneCache {
    path: Option<PathBuf>,
    adapter: String,
    entries: Entries,
    loaded: bool,
    status: Option<String>,
}

/// The cache file's location from the environment (`None`: memory only).
pub fn default_path() -> Option<PathBuf> {
    match std::env::var("NABLA_TUNE_CACHE") {
        Ok(p) if p == "off" || p.is_empty() => return None,
        Ok(p) => return Some(PathBuf::from(p)),
        Err(_) => {}
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("nabla").join("tune.json"))
}

impl TuneCache {
    /// The cache of adapter `adapter` in file `path` (read at the first lookup).
    pub fn new(path: Option<PathBuf>, adapter: String) -> TuneCache {
        TuneCache {
            path,
            adapter,
            ..TuneCache::default()
        }
    }

    fn read_file(&self) -> Result<BTreeMap<String, Entries>, String> {
        let Some(p) = &self.path else {
            return Ok(BTreeMap::new());
        };
        match std::fs::read(p) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is not a tuning cache ({e}); ignored", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(format!("cannot read {}: {e}", p.display())),
        }
    }

    fn load(&mut self) {
        if self.loaded {
            return;
        }
        self.loaded = true;
        match self.read_file() {
            Ok(mut all) => self.entries = all.remove(&self.adapter).unwrap_or_default(),
            Err(e) => self.status = Some(e),
        }
    }

    /// The stored value of `key`, if any.
    pub fn get(&mut self, key: &str) -> Option<serde_json::Value> {
        self.load();
        self.entries.get(key).cloned()
    }

    /// Stores `value` under `key`, in memory and in the file (other adapters' entries and the
    /// other entries of this one are kept; the file is replaced atomically).
    pub fn put(&mut self, key: &str, value: serde_json::Value) {
        self.load();
        self.entries.insert(key.to_string(), value);
        if let Err(e) = self.write() {
            self.status = Some(e);
        }
    }

    fn write(&self) -> Result<(), String> {
        let Some(p) = &self.path else {
            return Ok(());
        };
        let mut all = self.read_file().unwrap_or_default();
        all.insert(self.adapter.clone(), self.entries.clone());
        let text = serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?;
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, p).map_err(|e| format!("cannot replace {}: {e}", p.display()))
    }

    /// The file, if the choices are kept in one.
    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    /// The last problem with the file (unreadable, unparsable, unwritable), if any.
    pub fn status(&self) -> Option<&str> {
        self.status.as_deref()
    }

    /// Number of entries of this adapter.
    pub fn len(&mut self) -> usize {
        self.load();
        self.entries.len()
    }

    /// Whether this adapter has no entries.
    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }
}
