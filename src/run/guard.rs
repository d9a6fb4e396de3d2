//! What may become a run directory, and the lock that keeps one `oedit edit` at a time in it.
//!
//! `oedit edit --run DIR` takes a new path, an empty directory or an oedit run (one with
//! `manifest.json`). Any other directory is refused before anything is written in it, so that a
//! mistyped `--run` never adds run files to a user's folder or sweeps what is there. While it
//! edits, the session holds an exclusive lock on `DIR/lock` (released when the process ends,
//! however it ends); a second `oedit edit` on the same directory is refused instead of
//! interleaving its commits with the first's.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use crate::errors::InputError;

/// Name of the lock file inside a run directory.
pub const LOCK_FILE: &str = "lock";

/// Entries a run directory holds before its manifest is written: the folder of updates (holding
/// at most temporary files), the lock and temporary files of atomic writes.
fn is_pre_manifest_entry(name: &str, path: &Path) -> bool {
    match name {
        "updates" => {
            path.is_dir()
                && std::fs::read_dir(path).is_ok_and(|d| {
                    d.flatten().all(|e| crate::fsutil::is_temp_name(&e.file_name().to_string_lossy()))
                })
        }
        LOCK_FILE => path.is_file(),
        _ => crate::fsutil::is_temp_name(name),
    }
}

/// Checks that `path` can hold a run: it does not exist, is an empty directory (or one left by a
/// session that stopped before writing the manifest), or is an oedit run not being edited by
/// another process. Writes nothing.
pub fn check_run_path(path: &Path) -> Result<(), InputError> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(_) => return Ok(()),
        Ok(m) if !m.is_dir() => {
            return Err(InputError(format!(
            "--run {shown}: not a directory; give a new path, an empty directory or an oedit run directory"
        )))
        }
        Ok(_) => {}
    }
    if !path.join("manifest.json").is_file() {
        let entries =
            std::fs::read_dir(path).map_err(|e| InputError(format!("--run {shown}: cannot list: {e}")))?;
        let foreign: Vec<String> = entries
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .filter(|(name, p)| !is_pre_manifest_entry(name, p))
            .map(|(name, _)| name)
            .collect();
        if let Some(first) = foreign.iter().min() {
            return Err(InputError(format!(
                "--run {shown}: not an oedit run directory (no manifest.json) and not empty (holds `{first}`{}); \
                 give a new path or an empty directory",
                if foreign.len() > 1 { format!(" and {} more", foreign.len() - 1) } else { String::new() }
            )));
        }
    }
    let lock_path = path.join(LOCK_FILE);
    if lock_path.is_file() {
        // Probing takes the lock for an instant and drops it.
        let f = File::open(&lock_path)
            .map_err(|e| InputError(format!("{}: cannot open: {e}", lock_path.display())))?;
        try_lock(&f, path, false)?;
    }
    Ok(())
}

/// Takes the exclusive lock of the run directory `dir` (which exists), held until the returned
/// file is dropped or the process ends.
pub fn lock_run_dir(dir: &Path) -> anyhow::Result<File> {
    let lock_path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("{}: cannot open the run's lock file: {e}", lock_path.display()))?;
    try_lock(&f, dir, true)?;
    Ok(f)
}

/// Takes the lock of `f` without waiting; a lock another process holds is an [`InputError`].
fn try_lock(f: &File, dir: &Path, warn_unsupported: bool) -> Result<(), InputError> {
    match f.try_lock() {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(InputError(format!(
            "--run {}: another `oedit edit` is editing this run directory (its lock is held); \
             wait for it to end or give another --run directory",
            dir.display()
        ))),
        // A file system without locks (some network mounts) edits unguarded, as before locks.
        Err(TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            if warn_unsupported {
                eprintln!(
                "warning: {}: the file system does not support file locks; nothing stops a second `oedit edit` on this run",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(TryLockError::Error(e)) => {
            Err(InputError(format!("{}: cannot lock: {e}", dir.join(LOCK_FILE).display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_path_an_empty_directory_and_a_run_are_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(check_run_path(&tmp.path().join("new")).is_ok());
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(empty.join("updates")).unwrap();
        std::fs::write(empty.join(LOCK_FILE), b"").unwrap();
        assert!(check_run_path(&empty).is_ok());
        let run = tmp.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join("manifest.json"), b"{}").unwrap();
        std::fs::write(run.join("log.jsonl"), b"").unwrap();
        assert!(check_run_path(&run).is_ok());
    }

    #[test]
    fn a_file_or_a_foreign_directory_is_refused_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("notes.txt");
        std::fs::write(&file, b"x").unwrap();
        let e = check_run_path(&file).unwrap_err().0;
        assert!(e.contains("not a directory"), "{e}");
        let folder = tmp.path().join("project");
        std::fs::create_dir_all(folder.join("updates")).unwrap();
        std::fs::write(folder.join("updates").join("mine.txt"), b"keep").unwrap();
        let e = check_run_path(&folder).unwrap_err().0;
        assert!(e.contains("no manifest.json") && e.contains("`updates`"), "{e}");
        assert_eq!(std::fs::read(folder.join("updates").join("mine.txt")).unwrap(), b"keep");
    }

    #[test]
    fn a_held_lock_refuses_a_second_session_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let held = lock_run_dir(dir).unwrap();
        let e = check_run_path(dir).unwrap_err().0;
        assert!(e.contains("another `oedit edit`"), "{e}");
        let e = format!("{:#}", lock_run_dir(dir).unwrap_err());
        assert!(e.contains("another `oedit edit`"), "{e}");
        drop(held);
        assert!(check_run_path(dir).is_ok());
        assert!(lock_run_dir(dir).is_ok());
    }
}
