//! Crash-safe file writes: write a temporary file beside the target, fsync, rename, fsync the folder.
//!
//! The temporary file of `DIR/NAME` is `DIR/.NAME.tmp-PID/NAME`, inside a folder of its own, so
//! that whatever a writer creates next to it (safetensors writes through its own temporary
//! file in the same folder) is in that folder too; a process killed mid-write leaves only that
//! folder, which [`remove_stale_temps`] removes once the process is gone.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Marker between a target's name and the PID in the name of its temporary folder.
const TEMP_MARK: &str = ".tmp-";

fn temp_dir(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}{TEMP_MARK}{}", std::process::id()))
}

fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// A file written and fsynced under its temporary name, not yet in place: [`Staged::commit`]
/// renames it over its target; dropped uncommitted, it is removed and the target left as it was.
#[must_use = "a staged file is removed unless committed"]
pub struct Staged {
    path: PathBuf,
    dir: PathBuf,
}

impl Staged {
    /// Writes `path`'s temporary file with `write` and fsyncs it, leaving `path` untouched.
    ///
    /// The file gets the permissions of the file it will replace, or for a new file those of any
    /// file this process creates (0666 less the umask), whatever permissions `write` gave it.
    pub fn write(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<Self> {
        let staged = Staged { path: path.to_path_buf(), dir: temp_dir(path) };
        let tmp = staged.tmp();
        (|| -> Result<()> {
            if staged.dir.exists() {
                // Left by an earlier write of this process that failed half-way.
                std::fs::remove_dir_all(&staged.dir)?;
            }
            std::fs::create_dir(&staged.dir)?;
            // A file created the ordinary way carries the permissions the umask gives.
            let fresh = File::create(&tmp)?.metadata()?.permissions();
            let perms = std::fs::metadata(path).map(|m| m.permissions()).unwrap_or(fresh);
            write(&tmp)?;
            std::fs::set_permissions(&tmp, perms)?;
            File::open(&tmp)?.sync_all()?;
            Ok(())
        })()
        .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(staged)
    }

    fn tmp(&self) -> PathBuf {
        self.dir.join(self.path.file_name().unwrap_or_default())
    }

    /// Renames the file over its target and fsyncs the folder.
    pub fn commit(self) -> Result<()> {
        std::fs::rename(self.tmp(), &self.path)
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        sync_parent(&self.path);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Atomically replaces `path` with what `write` puts in the temporary path it is given (the
/// permissions as [`Staged::write`] gives them).
pub fn atomic_write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    Staged::write(path, write)?.commit()
}

/// Replaces several files together: every one is written and fsynced under its temporary name
/// first, and only then are they renamed into place, one after another. A failure while writing
/// leaves every target as it was; the window in which a crash leaves some replaced and some
/// not is that of the renames, not that of the writes.
pub fn atomic_write_all(files: Vec<(PathBuf, AtomicWriter<'_>)>) -> Result<()> {
    let staged =
        files.into_iter().map(|(path, write)| Staged::write(&path, write)).collect::<Result<Vec<_>>>()?;
    staged.into_iter().try_for_each(Staged::commit)
}

/// What writes one file of [`atomic_write_all`] at the temporary path it is given.
pub type AtomicWriter<'a> = Box<dyn FnOnce(&Path) -> Result<()> + 'a>;

/// Root of oedit's caches: `$OEDIT_CACHE`, else `~/.cache/oedit`.
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("OEDIT_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("oedit")
}

/// Atomically replaces `path` with `bytes`.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, bytes_writer(bytes))
}

/// An [`AtomicWriter`] that writes `bytes`.
pub fn bytes_writer(bytes: &[u8]) -> AtomicWriter<'_> {
    Box::new(move |tmp: &Path| {
        let mut f = File::create(tmp)?;
        f.write_all(bytes)?;
        Ok(())
    })
}

/// The PID in the name of a temporary file or folder of an atomic write (`.NAME.tmp-PID`, the
/// form of this module, or a file of that name, the form of earlier versions).
fn temp_owner(name: &str) -> Option<u32> {
    let (stem, pid) = name.strip_prefix('.')?.rsplit_once(TEMP_MARK)?;
    if stem.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether `name` is the name of a temporary file or folder of an atomic write.
pub(crate) fn is_temp_name(name: &str) -> bool {
    temp_owner(name).is_some()
}

/// Whether process `pid` is alive: `Some` where `/proc` tells, `None` where it cannot be known.
fn process_alive(pid: u32) -> Option<bool> {
    if pid == std::process::id() {
        return Some(true);
    }
    Path::new("/proc/self").exists().then(|| Path::new("/proc").join(pid.to_string()).exists())
}

/// Removes the temporary files and folders that atomic writes of processes no longer running
/// left in `dir` and its immediate subfolders (a killed `oedit edit` leaves them in a run
/// directory and its `updates/`). Those of live processes are kept, and so is everything where
/// liveness cannot be checked (no `/proc`). Best effort: returns the paths removed.
pub fn remove_stale_temps(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < folders.len() {
        let Ok(entries) = std::fs::read_dir(&folders[i]) else {
            i += 1;
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            match temp_owner(&entry.file_name().to_string_lossy()) {
                Some(pid) if process_alive(pid) == Some(false) => {
                    let gone = if kind.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    if gone.is_ok() {
                        removed.push(path);
                    }
                }
                None if i == 0 && kind.is_dir() => folders.push(path),
                _ => {}
            }
        }
        i += 1;
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PID above Linux's `pid_max` limit (4,194,304): never a live process.
    const DEAD: u32 = 999_999_999;

    #[test]
    fn temp_owner_parses_only_temp_names() {
        assert_eq!(temp_owner(".subspace.safetensors.tmp-123"), Some(123));
        assert_eq!(temp_owner(".chunk-00000.safetensors.tmp-7"), Some(7));
        for name in
            ["subspace.safetensors.tmp-123", ".tmp-123", ".x.tmp-", ".x.tmp-12a", "log.jsonl", ".tmpAbC123"]
        {
            assert_eq!(temp_owner(name), None, "{name}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stale_temps_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        std::fs::create_dir(run.join("updates")).unwrap();
        let dead_file = run.join(format!(".subspace.safetensors.tmp-{DEAD}"));
        let dead_dir = run.join("updates").join(format!(".chunk-00000.safetensors.tmp-{DEAD}"));
        let mine = run.join(format!(".manifest.json.tmp-{}", std::process::id()));
        std::fs::write(&dead_file, b"x").unwrap();
        std::fs::create_dir(&dead_dir).unwrap();
        std::fs::write(dead_dir.join("chunk-00000.safetensors"), b"x").unwrap();
        std::fs::write(&mine, b"x").unwrap();
        std::fs::write(run.join("log.jsonl"), b"{}\n").unwrap();
        let mut removed = remove_stale_temps(run);
        removed.sort();
        assert_eq!(removed, vec![dead_file, dead_dir]);
        assert!(mine.exists() && run.join("log.jsonl").exists() && run.join("updates").is_dir());
    }

    #[cfg(unix)]
    #[test]
    fn atomic_writes_keep_or_give_ordinary_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let ordinary = tmp.path().join("ordinary");
        File::create(&ordinary).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // A writer that makes its file private, as safetensors' temporary files are.
        let private = |p: &Path| -> Result<()> {
            std::fs::write(p, b"data")?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
            Ok(())
        };
        let new = tmp.path().join("new.safetensors");
        atomic_write_with(&new, private).unwrap();
        assert_eq!(mode(&new), mode(&ordinary));
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o640)).unwrap();
        atomic_write_with(&new, private).unwrap();
        assert_eq!(mode(&new), 0o640);
        assert_eq!(std::fs::read(&new).unwrap(), b"data");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("t.json");
        std::fs::write(&target, b"old").unwrap();
        let e = atomic_write_with(&target, |_| anyhow::bail!("no space")).unwrap_err();
        assert!(format!("{e:#}").contains("no space"), "{e:#}");
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn files_written_together_are_all_replaced_or_none() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a.bin"), tmp.path().join("b.json"));
        std::fs::write(&a, b"old a").unwrap();
        std::fs::write(&b, b"old b").unwrap();
        // The second file fails after the first was written in full: neither is replaced.
        let e = atomic_write_all(vec![
            (a.clone(), bytes_writer(b"new a")),
            (b.clone(), Box::new(|_: &Path| anyhow::bail!("disk full"))),
        ])
        .unwrap_err();
        assert!(format!("{e:#}").contains("disk full") && format!("{e:#}").contains("b.json"), "{e:#}");
        assert_eq!(
            (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap()),
            (b"old a".to_vec(), b"old b".to_vec())
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2, "temporary files left");
        atomic_write_all(vec![(a.clone(), bytes_writer(b"new a")), (b.clone(), bytes_writer(b"new b"))])
            .unwrap();
        assert_eq!(
            (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap()),
            (b"new a".to_vec(), b"new b".to_vec())
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2, "temporary files left");
    }
}
