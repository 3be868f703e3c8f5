//! Schema versions, one mechanism for both engines: an ordered list of
//! migrations, each applied once, the version reached recorded with the data
//! (PostgreSQL's `schema_migrations` table, SQLite's `user_version`), and a
//! store newer than this binary refused rather than misread.

use super::SpoolError;

/// One step of a schema's history. Once released, a step is never changed:
/// stores out there were made by it.
pub(super) struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    pub(super) const fn new(version: i32, name: &'static str, sql: &'static str) -> Self {
        Self { version, name, sql }
    }
}

/// The newest version of `migrations`.
pub(super) fn latest(migrations: &[Migration]) -> i32 {
    migrations.last().map_or(0, |m| m.version)
}

/// Whether `migrations` are numbered 1, 2, 3… with no gap: a step numbered
/// past a gap would be skipped by a store that already took the later one.
#[cfg(test)]
pub(super) fn numbered_without_gaps(migrations: &[Migration]) -> bool {
    migrations
        .iter()
        .enumerate()
        .all(|(i, m)| m.version == i as i32 + 1)
}

/// The steps a store at `version` lacks, in order.
pub(super) fn after(migrations: &[Migration], version: i32) -> impl Iterator<Item = &Migration> {
    migrations.iter().filter(move |m| m.version > version)
}

/// Refuses a store (`store` names it: "schema x", "spool file y") that a
/// newer release has migrated past what `migrations` know.
pub(super) fn refuse_newer(
    migrations: &[Migration],
    store: &str,
    version: i32,
) -> Result<(), SpoolError> {
    if version > latest(migrations) {
        return Err(SpoolError::Schema(format!(
            "{store} is at version {version}, newer than this wxrelay knows ({}): \
             a newer release has migrated it; run that release (or newer)",
            latest(migrations)
        )));
    }
    Ok(())
}

/// What a migration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// What was migrated: "schema x", "spool file y".
    pub store: String,
    /// The version before.
    pub from: i32,
    /// The version now.
    pub to: i32,
    /// Applied now, in order: version and name.
    pub applied: Vec<(i32, &'static str)>,
}

impl Migrated {
    /// Records `store` going from `from` through `steps`.
    pub(super) fn of<'m>(
        store: String,
        from: i32,
        steps: impl Iterator<Item = &'m Migration>,
    ) -> Self {
        let applied: Vec<(i32, &'static str)> = steps.map(|m| (m.version, m.name)).collect();
        let to = applied.last().map_or(from, |(v, _)| *v);
        Self {
            store,
            from,
            to,
            applied,
        }
    }
}

impl std::fmt::Display for Migrated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.applied.is_empty() {
            return write!(f, "{} is up to date at version {}", self.store, self.from);
        }
        for (version, name) in &self.applied {
            writeln!(f, "applied {version} {name}")?;
        }
        write!(
            f,
            "{} migrated from version {} to {}",
            self.store, self.from, self.to
        )
    }
}
