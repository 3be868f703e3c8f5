//! The spool file: opening a connection to it, and noticing when its path
//! no longer leads to the file the spool opened.

use crate::spool::SpoolError;
use rusqlite::Connection;
use std::path::{Path, PathBuf};

/// A connection in WAL mode with `synchronous=FULL`: a commit survives
/// `kill -9` and power loss.
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;

pub(super) fn open_connection(path: &Path) -> Result<Connection, SpoolError> {
    let conn = Connection::open(path)
        .map_err(|e| SpoolError::caused(format!("cannot open {}", path.display()), e))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Every statement the writer and the reader run stays prepared: the
    // default cache (16) is smaller than what a push, its settles and the
    // trail use, and a statement pushed out is compiled again.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// The file the spool opened, to notice when its path no longer leads to it.
pub(super) struct OpenedFile {
    path: PathBuf,
    id: (u64, u64),
}

impl OpenedFile {
    pub(super) fn of(path: &Path) -> Result<Self, SpoolError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| SpoolError::caused(format!("cannot stat {}", path.display()), e))?;
        Ok(Self {
            path: path.to_path_buf(),
            id: file_id(&meta),
        })
    }

    /// One `stat`: cheap next to the fsync of a commit.
    pub(super) fn check(&self) -> Result<(), SpoolError> {
        match std::fs::metadata(&self.path) {
            Ok(meta) if file_id(&meta) == self.id => Ok(()),
            Ok(_) => Err(SpoolError::Gone(self.path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SpoolError::Gone(self.path.display().to_string()))
            }
            Err(e) => Err(SpoolError::caused(
                format!("cannot stat {}", self.path.display()),
                e,
            )),
        }
    }
}

#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Elsewhere there is no inode to compare; the check always passes.
#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}
