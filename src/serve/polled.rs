//! One reload pattern for every file the server reads: the serving certificate and key, the
//! client CA bundle and the policy.
//!
//! Reads files. A [`Polled`] value is re-read on a timer and swapped when its bytes change. It
//! polls and compares bytes instead of watching inotify events: a Kubernetes Secret or ConfigMap
//! volume is updated by swapping its `..data` symlink, which watches on the files themselves do
//! not see. Content that does not parse is refused once (the same bad bytes are not reported
//! again) and the last good value stays in force.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

/// One file handed to [`Parse::parse`]: its path (for messages) and its bytes.
#[derive(Debug, Clone, Copy)]
pub struct File<'a> {
    pub name: &'a str,
    pub bytes: &'a [u8],
}

/// A value built from the content of one or more files.
pub trait Parse: Sized {
    /// Why content was refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Builds the value from the files, in the order they were given to [`Polled::open`].
    ///
    /// # Errors
    /// When the content is not usable.
    fn parse(files: &[File<'_>]) -> Result<Self, Self::Error>;
}

/// Why polled files were refused.
#[derive(Debug, thiserror::Error)]
pub enum PollError<E: std::error::Error + 'static> {
    #[error("{path}: cannot read")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Parse(E),
}

/// Reads `paths` and parses them once: how commands load what `serve` polls.
///
/// # Errors
/// When a file cannot be read or its content is refused.
pub fn load<T: Parse>(paths: &[PathBuf]) -> Result<T, PollError<T::Error>> {
    let bytes = read_all(paths)?;
    parse(paths, &bytes)
}

fn read_all<E: std::error::Error>(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, PollError<E>> {
    paths
        .iter()
        .map(|p| {
            std::fs::read(p).map_err(|source| PollError::Read {
                path: name(p),
                source,
            })
        })
        .collect()
}

fn parse<T: Parse>(paths: &[PathBuf], bytes: &[Vec<u8>]) -> Result<T, PollError<T::Error>> {
    let names: Vec<String> = paths.iter().map(|p| name(p)).collect();
    let files: Vec<File<'_>> = names
        .iter()
        .zip(bytes)
        .map(|(name, bytes)| File { name, bytes })
        .collect();
    T::parse(&files).map_err(PollError::Parse)
}

fn name(p: &Path) -> String {
    p.display().to_string()
}

/// A value read from files and swapped while requests are served.
#[derive(Debug)]
pub struct Polled<T> {
    paths: Vec<PathBuf>,
    current: RwLock<Arc<T>>,
    /// The bytes last read, good or bad, so one bad file is refused (and counted) once.
    last_seen: Mutex<Vec<Vec<u8>>>,
}

impl<T: Parse> Polled<T> {
    /// A value that is never reloaded (the built-in policy, a development certificate).
    #[must_use]
    pub fn fixed(value: T) -> Self {
        Self {
            paths: Vec::new(),
            current: RwLock::new(Arc::new(value)),
            last_seen: Mutex::new(Vec::new()),
        }
    }

    /// Reads and parses `paths`; they are re-read by [`Self::reload_if_changed`].
    ///
    /// # Errors
    /// When a file cannot be read or its content is refused.
    pub fn open(paths: Vec<PathBuf>) -> Result<Self, PollError<T::Error>> {
        let bytes = read_all(&paths)?;
        let value = parse(&paths, &bytes)?;
        Ok(Self {
            paths,
            current: RwLock::new(Arc::new(value)),
            last_seen: Mutex::new(bytes),
        })
    }

    /// Puts `value` in force: for a value that comes from elsewhere than files (the self-managed
    /// TLS Secret, watched through the apiserver).
    pub fn set(&self, value: T) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
    }

    /// The value in force. Cheap: one read lock and a reference count.
    #[must_use]
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads the files and swaps the value when their content changed and parses.
    ///
    /// Returns `Ok(true)` when a new value is in force, `Ok(false)` when nothing changed.
    ///
    /// # Errors
    /// When changed content cannot be read or is refused; the old value stays.
    pub fn reload_if_changed(&self) -> Result<bool, PollError<T::Error>> {
        if self.paths.is_empty() {
            return Ok(false);
        }
        let bytes = read_all(&self.paths)?;
        {
            let mut last = self
                .last_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if *last == bytes {
                return Ok(false);
            }
            last.clone_from(&bytes);
        }
        let value = parse(&self.paths, &bytes)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
        Ok(true)
    }
}
