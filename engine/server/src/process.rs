//! Process plumbing: the owner-only socket, following the supervisor's
//! lifetime, and volunteering for the OOM killer.

use kvembed_core::{EngineError, Result};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use crate::log;

/// Binds the socket owner-only: the directory is created 0700 and the socket
/// is created under a 077 umask, then set to 0600.
pub(crate) fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| EngineError::io(dir, e))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(EngineError::Other(format!(
                "another kvembed server is already listening on {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| EngineError::io(path, e))?;
    }
    // SAFETY: umask only swaps the process's file-creation mask; no other
    // thread creates files yet (the watchdog only reads getppid).
    let old_mask = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restores the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(|e| EngineError::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| EngineError::io(path, e))?;
    Ok(listener)
}

/// The server must not outlive its supervisor: ask the kernel for SIGTERM when
/// the parent dies, and poll the parent pid as a second line of defence (the
/// signal is tied to the parent *thread*, and a parent that died before the
/// prctl would be missed).
pub(crate) fn exit_with_parent() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    if parent <= 1 {
        return; // started by init or a container runtime: nobody to follow
    }
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; no memory is involved.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) };
    let watch = move || loop {
        // SAFETY: as above.
        if unsafe { libc::getppid() } != parent {
            log("supervisor is gone; exiting");
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = std::thread::Builder::new()
        .name("kvembed-parent".into())
        .spawn(watch);
}

/// The model's memory lives here, not in PostgreSQL: if the machine runs out
/// of memory, the kernel should pick this process, which the supervisor
/// restarts, rather than a backend, which would restart the whole cluster.
pub(crate) fn volunteer_for_oom_killer() {
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
}
