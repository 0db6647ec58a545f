//! The worker's sandbox, built by the supervisor's child between fork and exec: a mount
//! namespace of its own (as root, before it drops privileges) and Landlock (after, where the
//! kernel has it). Everything is allocated before the fork (`Prepared`); the child makes raw
//! system calls only (`enter`, `landlock`), on descriptors, never following a symbolic link
//! in a path a worker may write: each path is walked a component at a time (`O_PATH |
//! O_NOFOLLOW`, a link refused), from `/` or from the mount it lies in. (Not `openat2`'s
//! `RESOLVE_NO_SYMLINKS`: systemd's `RestrictSUIDSGID=` makes `openat2` fail with ENOSYS.)
//!
//! The order, for each path of the plan sorted so that a path comes after those it lies in:
//! a hidden directory gets a fresh tmpfs; a shown one gets a clone of itself, taken before
//! anything was hidden, mounted where the path now is (created in the tmpfs when it lies in
//! one). Then the whole tree is made read-only, `/dev` and each writable path writable again.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use super::{infra, Failure};
use crate::spawn::spec::Sandbox;

const AT_EMPTY_PATH: u32 = 0x1000;
const AT_RECURSIVE: u32 = 0x8000;
const OPEN_TREE_CLONE: u32 = 1;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: u32 = 0x40;
const FSOPEN_CLOEXEC: u32 = 1;
const FSCONFIG_SET_STRING: u32 = 1;
const FSCONFIG_CMD_CREATE: u32 = 6;
const FSMOUNT_CLOEXEC: u32 = 1;
const MOUNT_ATTR_RDONLY: u64 = 1;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

// Landlock (`linux/landlock.h`): the access rights a write needs.
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
const LANDLOCK_RULE_PATH_BENEATH: u32 = 1;
const FS_WRITE_FILE: u64 = 1 << 1;
/// REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK,
/// MAKE_SYM.
const FS_CHANGE_TREE: u64 = 0b1_1111_1111 << 4;
const FS_REFER: u64 = 1 << 13;
const FS_TRUNCATE: u64 = 1 << 14;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}

/// At most this many paths in a plan: the child keeps their descriptors in arrays.
pub(super) const MAX_ITEMS: usize = 64;

/// One path of the plan, its strings made before the fork.
struct Item {
    hidden: bool,
    writable: bool,
    /// Shown as a file (a file mounted over a file), not a directory.
    file: bool,
    /// The path's components, from `/`; and from `parent` (the item it lies in), when there
    /// is one (`rel` whole, for the tmpfs's mount point).
    abs: Vec<CString>,
    parent: Option<usize>,
    rel_parts: Vec<CString>,
    rel: CString,
    /// When `parent` is hidden: the directories to make in its tmpfs first, outermost first.
    mkdirs: Vec<CString>,
}

/// A sandbox, ready for the child.
pub(super) struct Prepared {
    items: Vec<Item>,
    tmpfs: CString,
    mode: CString,
    private_mode: CString,
    ro_mode: CString,
    root: CString,
    dev: CString,
    empty: CString,
    /// What the report of a failed step names: the paths, by item index.
    pub paths: Vec<PathBuf>,
}

/// The order the child goes through `plan` (and the run's `tmpdir`, writable): each path after
/// those it lies in, and each item's nearest enclosing item (by index).
pub(super) fn order(plan: &Sandbox, tmpdir: &Path) -> Vec<(PathBuf, bool, bool, Option<usize>)> {
    let mut all: Vec<(PathBuf, bool, bool)> = plan
        .hidden
        .iter()
        .map(|h| (h.path.clone(), true, h.writable))
        .chain(
            plan.exposed
                .iter()
                .map(|e| (e.path.clone(), false, e.writable)),
        )
        .chain(std::iter::once((tmpdir.to_path_buf(), false, true)))
        .collect();
    all.sort_by_key(|(p, ..)| p.components().count());
    let mut out: Vec<(PathBuf, bool, bool, Option<usize>)> = Vec::new();
    for (p, hidden, writable) in all {
        let parent = out
            .iter()
            .enumerate()
            .filter(|(_, (q, ..))| p != *q && p.starts_with(q))
            .max_by_key(|(_, (q, ..))| q.components().count())
            .map(|(i, _)| i);
        out.push((p, hidden, writable, parent));
    }
    out
}

fn cstr(p: &Path) -> Result<CString, Failure> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| infra(format!("sandbox: {} contains a NUL byte", p.display())))
}

/// `p`'s names, for a walk a component at a time; `..` and the like refused (a walk that
/// refuses links must not climb either).
fn parts(p: &Path) -> Result<Vec<CString>, Failure> {
    use std::path::Component;
    p.components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .map(|c| match c {
            Component::Normal(n) => cstr(Path::new(n)),
            _ => Err(infra(format!(
                "sandbox: {} is not a plain absolute path",
                p.display()
            ))),
        })
        .collect()
}

impl Prepared {
    pub(super) fn new(plan: &Sandbox, tmpdir: &Path) -> Result<Prepared, Failure> {
        let ordered = order(plan, tmpdir);
        if ordered.len() > MAX_ITEMS {
            return Err(infra(format!(
                "sandbox: {} paths, at most {MAX_ITEMS}",
                ordered.len()
            )));
        }
        let mut items = Vec::with_capacity(ordered.len());
        for (path, hidden, writable, parent) in &ordered {
            let (rel, mkdirs) = match parent {
                Some(i) => {
                    let base = &ordered[*i].0;
                    let rel = path.strip_prefix(base).unwrap_or(path).to_path_buf();
                    let mut mkdirs = Vec::new();
                    if ordered[*i].1 {
                        let mut acc = PathBuf::new();
                        let comps: Vec<_> = rel.components().collect();
                        for c in &comps[..comps.len().saturating_sub(1)] {
                            acc.push(c);
                            mkdirs.push(cstr(&acc)?);
                        }
                    }
                    (rel, mkdirs)
                }
                None => (path.clone(), Vec::new()),
            };
            // Looked at with lstat: a link is refused by the child anyway.
            let file = !hidden && std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_dir());
            items.push(Item {
                hidden: *hidden,
                writable: *writable,
                file,
                abs: parts(path)?,
                parent: *parent,
                rel_parts: parts(&rel)?,
                rel: cstr(&rel)?,
                mkdirs,
            });
        }
        Ok(Prepared {
            items,
            tmpfs: c"tmpfs".into(),
            mode: c"mode".into(),
            private_mode: c"1777".into(),
            ro_mode: c"0755".into(),
            root: c"/".into(),
            dev: c"/dev".into(),
            empty: c"".into(),
            paths: ordered.into_iter().map(|o| o.0).collect(),
        })
    }
}

/// A failed step: which (`STEP_*`), on which item (`u16::MAX`: none), and errno.
pub(super) struct Failed {
    pub step: u16,
    pub item: u16,
    pub errno: i32,
}

pub(super) const STEP_UNSHARE: u16 = 0;
pub(super) const STEP_PRIVATE: u16 = 1;
pub(super) const STEP_OPEN: u16 = 2;
pub(super) const STEP_CLONE: u16 = 3;
pub(super) const STEP_TMPFS: u16 = 4;
pub(super) const STEP_MKDIR: u16 = 5;
pub(super) const STEP_MOUNT: u16 = 6;
pub(super) const STEP_READ_ONLY: u16 = 7;
pub(super) const STEP_LANDLOCK: u16 = 8;

/// What each step is, for the report.
pub(super) const STEPS: [&str; 9] = [
    "a mount namespace of its own",
    "make its mounts private",
    "open",
    "clone the mount of",
    "make a tmpfs over",
    "make the mount point of",
    "mount",
    "make the system read-only",
    "Landlock",
];

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// An `O_PATH` descriptor of `parts` walked from `dir` (`None`: from `/`), one name at a
/// time, no symbolic link followed or accepted (ELOOP); -1 with errno set on failure.
///
/// SAFETY: raw system calls on strings made before the fork.
unsafe fn open_path(dir: Option<i32>, root: &CString, parts: &[CString]) -> i32 {
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let mut cur = match dir {
        Some(d) => libc::fcntl(d, libc::F_DUPFD_CLOEXEC, 0),
        None => libc::open(root.as_ptr(), flags),
    };
    for name in parts {
        if cur < 0 {
            return -1;
        }
        let next = libc::openat(cur, name.as_ptr(), flags);
        let e = errno();
        libc::close(cur);
        if next < 0 {
            *libc::__errno_location() = e;
            return -1;
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(next, &mut st) < 0 || st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            let e = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                libc::ELOOP
            } else {
                errno()
            };
            libc::close(next);
            *libc::__errno_location() = e;
            return -1;
        }
        cur = next;
    }
    cur
}

fn fail(step: u16, item: usize) -> Failed {
    Failed {
        step,
        item: item as u16,
        errno: errno(),
    }
}

/// The mount-namespace layer, as root; fills `mounts` with each item's mount (its root's
/// descriptor, for `landlock`). Raw system calls only.
///
/// SAFETY: call only in the forked child (single-threaded), with `p` prepared before the fork.
pub(super) unsafe fn enter(p: &Prepared, mounts: &mut [i32; MAX_ITEMS]) -> Result<(), Failed> {
    if libc::unshare(libc::CLONE_NEWNS) < 0 {
        return Err(fail(STEP_UNSHARE, u16::MAX as usize));
    }
    // Nothing we mount reaches the host, nothing the host mounts later reaches us.
    if libc::mount(
        std::ptr::null(),
        p.root.as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) < 0
    {
        return Err(fail(STEP_PRIVATE, u16::MAX as usize));
    }
    // Clones of what is shown, before anything is hidden.
    let mut clones = [-1i32; MAX_ITEMS];
    for (i, it) in p.items.iter().enumerate() {
        if !it.hidden {
            clones[i] = clone_of(p, it).map_err(|step| fail(step, i))?;
        }
    }
    for (i, it) in p.items.iter().enumerate() {
        if it.hidden || clones[i] >= 0 {
            mounts[i] = mount_item(p, i, clones[i], mounts).map_err(|step| fail(step, i))?;
        }
    }
    read_only(p, mounts)
}

/// A detached clone of shown item `it` (its mounts below too); -1 for a read-only path that
/// is gone (nothing to show or to protect).
///
/// SAFETY: as `enter`.
unsafe fn clone_of(p: &Prepared, it: &Item) -> Result<i32, u16> {
    let at = open_path(None, &p.root, &it.abs);
    if at < 0 {
        return if !it.writable && errno() == libc::ENOENT {
            Ok(-1)
        } else {
            Err(STEP_OPEN)
        };
    }
    let c = libc::syscall(
        libc::SYS_open_tree,
        at,
        p.empty.as_ptr(),
        OPEN_TREE_CLONE | libc::O_CLOEXEC as u32 | AT_EMPTY_PATH | AT_RECURSIVE,
    ) as i32;
    libc::close(at);
    if c < 0 {
        return Err(STEP_CLONE);
    }
    Ok(c)
}

/// Mount item `i` where its path now is — beneath the mount it lies in (made in its tmpfs
/// first when that one is hidden), or from `/` when there is none (or it was not there to
/// mount): a fresh tmpfs for a hidden one, `clone` for a shown one. Its mount's descriptor,
/// or -1 for a hidden directory that is not there (it hides nothing).
///
/// SAFETY: as `enter`.
unsafe fn mount_item(
    p: &Prepared,
    i: usize,
    clone: i32,
    mounts: &[i32; MAX_ITEMS],
) -> Result<i32, u16> {
    let it = &p.items[i];
    let target = match it.parent.filter(|q| mounts[*q] >= 0) {
        Some(parent) => {
            let base = mounts[parent];
            if p.items[parent].hidden {
                make_mount_point(base, it)?;
            }
            open_path(Some(base), &p.root, &it.rel_parts)
        }
        None => open_path(None, &p.root, &it.abs),
    };
    if target < 0 {
        return if it.hidden && errno() == libc::ENOENT {
            Ok(-1)
        } else {
            Err(STEP_OPEN)
        };
    }
    let mount = if it.hidden {
        let m = tmpfs(p, it.writable);
        if m < 0 {
            libc::close(target);
            return Err(STEP_TMPFS);
        }
        m
    } else {
        clone
    };
    let moved = libc::syscall(
        libc::SYS_move_mount,
        mount,
        p.empty.as_ptr(),
        target,
        p.empty.as_ptr(),
        MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
    );
    libc::close(target);
    if moved < 0 {
        return Err(STEP_MOUNT);
    }
    Ok(mount)
}

/// The directories (and, for a file, the file) `it` is mounted on, in the tmpfs at `base`.
///
/// SAFETY: as `enter`.
unsafe fn make_mount_point(base: i32, it: &Item) -> Result<(), u16> {
    for d in &it.mkdirs {
        if libc::mkdirat(base, d.as_ptr(), 0o755) < 0 && errno() != libc::EEXIST {
            return Err(STEP_MKDIR);
        }
    }
    let made = if it.file {
        let fd = libc::openat(
            base,
            it.rel.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o644,
        );
        if fd >= 0 {
            libc::close(fd);
        }
        fd >= 0
    } else {
        libc::mkdirat(base, it.rel.as_ptr(), 0o755) == 0 || errno() == libc::EEXIST
    };
    if made {
        Ok(())
    } else {
        Err(STEP_MKDIR)
    }
}

/// A new tmpfs, detached: mode 1777 when `writable` (a private `/tmp`), else 0755 (made
/// read-only with the rest).
///
/// SAFETY: as `enter`.
unsafe fn tmpfs(p: &Prepared, writable: bool) -> i32 {
    let fs = libc::syscall(libc::SYS_fsopen, p.tmpfs.as_ptr(), FSOPEN_CLOEXEC) as i32;
    if fs < 0 {
        return -1;
    }
    let mode = if writable {
        &p.private_mode
    } else {
        &p.ro_mode
    };
    let ok = libc::syscall(
        libc::SYS_fsconfig,
        fs,
        FSCONFIG_SET_STRING,
        p.mode.as_ptr(),
        mode.as_ptr(),
        0,
    ) == 0
        && libc::syscall(
            libc::SYS_fsconfig,
            fs,
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        ) == 0;
    let m = if ok {
        libc::syscall(libc::SYS_fsmount, fs, FSMOUNT_CLOEXEC, 0) as i32
    } else {
        -1
    };
    libc::close(fs);
    m
}

/// Read-only everywhere; then `/dev` (its nodes: `/dev/null`) and each writable item, in
/// order, so a read-only path inside a writable one stays read-only.
///
/// SAFETY: as `enter`.
unsafe fn read_only(p: &Prepared, mounts: &[i32; MAX_ITEMS]) -> Result<(), Failed> {
    let set = |fd: i32, path: &CString, flags: u32, on: bool| {
        let attr = MountAttr {
            attr_set: if on { MOUNT_ATTR_RDONLY } else { 0 },
            attr_clr: if on { 0 } else { MOUNT_ATTR_RDONLY },
            propagation: 0,
            userns_fd: 0,
        };
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            path.as_ptr(),
            flags | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) == 0
    };
    if !set(libc::AT_FDCWD, &p.root, 0, true) || !set(libc::AT_FDCWD, &p.dev, 0, false) {
        return Err(fail(STEP_READ_ONLY, u16::MAX as usize));
    }
    for (i, it) in p.items.iter().enumerate() {
        if mounts[i] >= 0 && !set(mounts[i], &p.empty, AT_EMPTY_PATH, !it.writable) {
            return Err(fail(STEP_READ_ONLY, i));
        }
    }
    Ok(())
}

/// The Landlock layer, after the privilege drop and `no_new_privs`: writes only beneath the
/// writable mounts of `enter` and in `/dev`. `Ok(None)` where the kernel has no Landlock (the
/// mount layer stands alone: `doctor` says so); `Ok(Some(abi))` once in force.
///
/// SAFETY: call only in the forked child, after `enter` filled `mounts`.
pub(super) unsafe fn landlock(
    p: &Prepared,
    mounts: &[i32; MAX_ITEMS],
) -> Result<Option<i32>, Failed> {
    let fail = |item: usize| fail(STEP_LANDLOCK, item);
    let abi = libc::syscall(
        libc::SYS_landlock_create_ruleset,
        std::ptr::null::<RulesetAttr>(),
        0usize,
        LANDLOCK_CREATE_RULESET_VERSION,
    ) as i32;
    if abi < 1 {
        return Ok(None);
    }
    let mut handled = FS_WRITE_FILE | FS_CHANGE_TREE;
    if abi >= 2 {
        handled |= FS_REFER;
    }
    if abi >= 3 {
        handled |= FS_TRUNCATE;
    }
    let attr = RulesetAttr {
        handled_access_fs: handled,
    };
    let ruleset = libc::syscall(
        libc::SYS_landlock_create_ruleset,
        &attr as *const RulesetAttr,
        std::mem::size_of::<RulesetAttr>(),
        0u32,
    ) as i32;
    if ruleset < 0 {
        return Err(fail(u16::MAX as usize));
    }
    let file_rights = handled & (FS_WRITE_FILE | FS_TRUNCATE);
    let allow = |fd: i32, rights: u64| {
        let rule = PathBeneath {
            allowed_access: rights,
            parent_fd: fd,
        };
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            LANDLOCK_RULE_PATH_BENEATH,
            &rule as *const PathBeneath,
            0u32,
        ) == 0
    };
    for (i, it) in p.items.iter().enumerate() {
        if it.writable && mounts[i] >= 0 {
            let rights = if it.file { file_rights } else { handled };
            if !allow(mounts[i], rights) {
                libc::close(ruleset);
                return Err(fail(i));
            }
        }
    }
    let dev = libc::open(p.dev.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
    if dev < 0 || !allow(dev, file_rights) {
        libc::close(ruleset);
        return Err(fail(u16::MAX as usize));
    }
    libc::close(dev);
    let ok = libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) == 0;
    libc::close(ruleset);
    if !ok {
        return Err(fail(u16::MAX as usize));
    }
    Ok(Some(abi))
}
