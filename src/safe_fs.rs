//! Root's file work inside a tree that someone else can write.
//!
//! The Hermes root (boards, workspaces, logs, lock files) belongs to the board's owner, and
//! workers run as a user who may write all of it by design: by the time root uses a path
//! there, any part of it may be a symlink, a FIFO, a device node or a hard link planted by a
//! worker. So root never does file work there with its own powers. Every such operation
//! runs inside [`as_user`]: this thread's filesystem identity (fsuid, fsgid, supplementary
//! groups) becomes the tree owner's for its duration, the kernel drops root's DAC and chown
//! capabilities meanwhile (`capabilities(7)`, "Effect of user ID changes on capabilities"),
//! and whatever a path resolves to is reached only if its owner could reach it anyway.
//! Files are opened with `O_NOFOLLOW|O_NONBLOCK` and must be regular ([`open_regular`]), so
//! a FIFO never blocks a root process and a device node is never read or written.
//!
//! The switch is per thread (the raw syscalls, not glibc's process-wide `setgroups`), so
//! it holds exactly for the closure, on the thread that runs it, and nothing else.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Who owns a tree: file work in it runs with these credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, looked up in the user database the first time a switch
    /// needs them (most opens need none: an unprivileged caller, or a root-owned tree).
    #[serde(skip)]
    groups: std::sync::OnceLock<Vec<u32>>,
}

impl PartialEq for Owner {
    fn eq(&self, other: &Owner) -> bool {
        (self.uid, self.gid) == (other.uid, other.gid)
    }
}

impl Eq for Owner {}

impl Owner {
    pub fn new(uid: u32, gid: u32) -> Owner {
        Owner {
            uid,
            gid,
            groups: std::sync::OnceLock::new(),
        }
    }

    /// The same owner, its groups already known (looked up by whoever made the spec): a
    /// process that must not ask the user database (the statically linked supervisor) is
    /// handed them.
    pub fn with_groups(uid: u32, gid: u32, mut groups: Vec<u32>) -> Owner {
        if !groups.contains(&gid) {
            groups.push(gid);
        }
        let o = Owner::new(uid, gid);
        let _ = o.groups.set(groups);
        o
    }

    /// The owner's groups from the user database; just `gid` for a uid without an entry.
    pub fn groups(&self) -> &[u32] {
        self.groups.get_or_init(|| {
            let mut groups = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.uid))
                .ok()
                .flatten()
                .and_then(|u| {
                    let name = std::ffi::CString::new(u.name).ok()?;
                    nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(self.gid)).ok()
                })
                .map(|g| g.into_iter().map(|g| g.as_raw()).collect::<Vec<_>>())
                .unwrap_or_default();
            if !groups.contains(&self.gid) {
                groups.push(self.gid);
            }
            groups
        })
    }

    /// The owner of `dir`, or of its nearest existing ancestor when `dir` is not there yet.
    /// `dir` must be a path the caller trusts (one root configured), never one found inside
    /// the tree: its owner decides with whose powers everything below it is touched.
    pub fn of_tree(dir: &Path) -> io::Result<Owner> {
        let mut p = Some(dir);
        while let Some(cur) = p.filter(|c| !c.as_os_str().is_empty()) {
            match std::fs::metadata(cur) {
                Ok(m) => return Ok(Owner::new(m.uid(), m.gid())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => p = cur.parent(),
                Err(e) => return Err(e),
            }
        }
        Ok(Owner::new(
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        ))
    }

    /// Whether a switch is needed: only root has powers to give up.
    fn needs_switch(&self) -> bool {
        self.uid != 0 && nix::unistd::geteuid().is_root()
    }
}

fn raw_setgroups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the raw syscall changes this thread's groups only; the pointer and length
    // describe a live slice.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn current_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a zero-length query returns the count and writes nothing.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut g = vec![0; n as usize];
    // SAFETY: `g` has room for `n` entries.
    let n = unsafe { libc::getgroups(n, g.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    g.truncate(n as usize);
    Ok(g)
}

/// `setfsuid`/`setfsgid` return the previous value and never fail loudly; an invalid id
/// (-1) reads the current one.
fn fsuid_now() -> u32 {
    // SAFETY: -1 is not a valid uid: the call changes nothing and returns the current one.
    unsafe { libc::setfsuid(u32::MAX) as u32 }
}

fn fsgid_now() -> u32 {
    // SAFETY: as above.
    unsafe { libc::setfsgid(u32::MAX) as u32 }
}

/// Puts the previous filesystem identity back, also when the closure panics.
struct Restore {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<libc::gid_t>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // Back to uid 0 first: only it may set any groups and gid.
        // SAFETY: plain syscalls on this thread's credentials.
        unsafe {
            libc::setfsuid(0);
        }
        let groups_ok = raw_setgroups(&self.groups).is_ok();
        // SAFETY: as above.
        unsafe {
            libc::setfsgid(self.fsgid);
            libc::setfsuid(self.fsuid);
        }
        if !groups_ok || fsuid_now() != self.fsuid || fsgid_now() != self.fsgid {
            // A thread that cannot become itself again would fail every later operation in
            // ways nobody could explain; that is a bug worth stopping for.
            eprintln!("hermes-mgr: cannot restore the file system identity; aborting");
            std::process::abort();
        }
    }
}

/// Run `f` with `who`'s filesystem identity on this thread (a no-op unless we are root and
/// `who` is not). Nests: an inner call for the same owner changes nothing, and each call
/// puts back what it found. `Err` when the switch itself failed: then `f` did not run,
/// because running it as root is exactly what must not happen.
pub fn as_user<R>(who: &Owner, f: impl FnOnce() -> R) -> io::Result<R> {
    if !who.needs_switch() || (fsuid_now() == who.uid && fsgid_now() == who.gid) {
        return Ok(f());
    }
    let restore = Restore {
        fsuid: fsuid_now(),
        fsgid: fsgid_now(),
        groups: current_groups()?,
    };
    let refused = || {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "cannot take the file system identity of uid {} gid {} (needs CAP_SETUID and CAP_SETGID)",
                who.uid, who.gid
            ),
        )
    };
    // SAFETY: plain syscalls on this thread's credentials; checked just below.
    unsafe {
        libc::setfsuid(0);
    }
    raw_setgroups(who.groups()).map_err(|_| refused())?;
    // SAFETY: as above.
    unsafe {
        libc::setfsgid(who.gid);
        libc::setfsuid(who.uid);
    }
    if fsuid_now() != who.uid || fsgid_now() != who.gid {
        return Err(refused());
    }
    let r = f();
    drop(restore);
    Ok(r)
}

/// How to open a file with [`open_regular`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Read and write; not created.
    ReadWrite,
    /// Read and write, created (mode 0666 & umask) when missing.
    ReadWriteCreate,
    /// Append, created when missing.
    AppendCreate,
}

/// Open `path` without following a symlink in its last component and without blocking on
/// a FIFO, and only if it is a regular file. (Earlier components are the caller's to
/// protect: run this inside [`as_user`] when they are in someone else's tree.)
pub fn open_regular(path: &Path, access: Access) -> io::Result<File> {
    let mut o = OpenOptions::new();
    match access {
        Access::Read => o.read(true),
        Access::ReadWrite => o.read(true).write(true),
        Access::ReadWriteCreate => o.read(true).write(true).create(true).truncate(false),
        Access::AppendCreate => o.append(true).create(true),
    };
    let f = o
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    e.kind(),
                    format!("{} is a symlink; it is not followed", path.display()),
                )
            } else {
                e
            }
        })?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a regular file; it was left alone",
                path.display()
            ),
        ));
    }
    Ok(f)
}

/// The first `max` bytes of a regular file (see [`open_regular`]); `None` when missing.
pub fn read_capped(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    let f = match open_regular(path, Access::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut v = Vec::new();
    f.take(max).read_to_end(&mut v)?;
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_symlinks_and_devices_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        for (p, access) in [
            (fifo.as_path(), Access::Read),
            (fifo.as_path(), Access::AppendCreate),
            (link.as_path(), Access::Read),
            (Path::new("/dev/zero"), Access::Read),
            (Path::new("/dev/null"), Access::ReadWriteCreate),
        ] {
            assert!(open_regular(p, access).is_err(), "{p:?} opened");
        }
        let file = dir.path().join("f");
        std::fs::write(&file, "0123456789").unwrap();
        assert_eq!(read_capped(&file, 4).unwrap().unwrap(), b"0123");
        assert_eq!(read_capped(&dir.path().join("none"), 4).unwrap(), None);
    }

    #[test]
    fn as_user_runs_with_the_owners_identity_and_gives_it_back() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let nobody = Owner::new(65534, 65534);
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("root-only");
        std::fs::write(&secret, "secret").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let ids = as_user(&nobody, || {
            let denied = std::fs::read(dir.path().join("root-only")).is_err()
                && std::fs::File::create(dir.path().join("new")).is_err();
            (fsuid_now(), fsgid_now(), denied)
        })
        .unwrap();
        assert_eq!(ids, (65534, 65534, true));
        assert_eq!((fsuid_now(), fsgid_now()), (0, 0));
        assert!(std::fs::read(dir.path().join("root-only")).is_ok());
    }
}
