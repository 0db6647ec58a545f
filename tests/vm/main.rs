//! The VM tier: hermes-mgr on a real Debian 12 boot (qemu), where cgroup controllers are
//! enforced, the package is installed with apt by the guest's own systemd, and the machine
//! can be rebooted or have its power cut. Each test boots its own guest from a clean disk
//! (`qemu::Vm`); they take turns. It cannot boot → it fails, saying why; it never skips.

#[path = "../common/deb.rs"]
mod deb;
mod guest;
mod limits;
mod package;
mod pools;
mod power;
mod qemu;
mod sandbox;
