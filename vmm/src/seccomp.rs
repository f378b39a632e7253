//! Least privilege for the threads that handle guest-controlled input:
//! seccomp-BPF allowlists (built with `seccompiler`) for the vCPU threads and
//! the virtio device threads.
//!
//! Each filter is installed by the thread itself, first thing at its start,
//! without `SECCOMP_FILTER_FLAG_TSYNC`: it binds that thread (and any thread
//! it spawns later, which inherits it) and nothing else in the embedding
//! process. Installing one sets the thread's `no_new_privs` bit, as the
//! kernel requires for an unprivileged filter.
//!
//! **Action on a syscall outside the list: the call fails with `EPERM`**
//! (`SeccompAction::Errno`), the thread goes on. Killing the process
//! (`KillProcess`, Firecracker's choice) would be stricter, but Osso is a
//! library living inside someone else's process: an embedding application
//! should get an error from a VM that broke, not lose itself. `EPERM` also
//! makes the filter testable in-process. What a compromised vCPU or device
//! thread can then still do is what the lists below allow.
//!
//! The lists were found by running the tests (tiny guests, the virtio
//! fuzzers' device threads) and the real Osso kernel's network boot under
//! `strace -f`, grouping the calls by thread. The vCPU thread's list is a
//! superset of the device thread's, because a vCPU thread starts the device
//! thread (on the guest's `DRIVER_OK`) and a spawned thread inherits its
//! parent's filter: filters stack, the strictest wins.
//!
//! Opt out with [`crate::VmConfig::seccomp`] = false (debugging, strace-ing
//! an unknown host).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the exits it handles (bus devices, the
    /// console sink, irqfds), starting and stopping device threads.
    Vcpu,
    /// A virtio device thread: an epoll loop moving frames between guest
    /// memory (already mapped) and the network backend's fds or queues.
    VirtioDevice,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("compiling the seccomp filter: {0}")]
    Compile(String),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// The `ioctl` request type of KVM (`KVMIO`, bits 8..16 of the request).
const KVMIO_TYPE: u64 = 0xAE;

/// Syscalls both kinds of thread need.
const COMMON: &[libc::c_long] = &[
    // Eventfds, sockets and pipes of the backends, the console sink, logs.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    // Locks, condition variables, channels.
    libc::SYS_futex,
    // The allocator (glibc grows non-main-thread arenas with mprotect).
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    // Signals (the vCPU kick handler returns through rt_sigreturn) and
    // thread exit (Rust frees the alternate signal stack).
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    // Time (normally the vDSO; the fallback is a syscall), sleeps and yields
    // (std asserts that a sleep only ever fails with EINTR), thread ids.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // The device's event loop.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    // Eventfds: created and duplicated when a device (re)starts.
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    // std seeds HashMap keys (event-manager's maps) once per thread.
    libc::SYS_getrandom,
];

/// Syscalls only a vCPU thread needs (besides KVM ioctls, allowed by type).
const VCPU_ONLY: &[libc::c_long] = &[
    // Kicking the other vCPUs out of KVM_RUN (pthread_kill).
    libc::SYS_tgkill,
    // Starting a device thread on DRIVER_OK (std::thread::spawn).
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    // ...which then installs its own, stricter filter (prctl NO_NEW_PRIVS,
    // seccomp): a filter can only ever be narrowed.
    libc::SYS_seccomp,
];

/// The allowlist of `kind`, as syscall numbers (KVM ioctls not included).
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<libc::c_long> {
    let mut v = COMMON.to_vec();
    if kind == ThreadKind::Vcpu {
        v.extend_from_slice(VCPU_ONLY);
    }
    v
}

/// The compiled BPF program for `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls(kind)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    if kind == ThreadKind::Vcpu {
        // ioctl: KVM's requests only (type 0xAE), on any fd.
        let kvm_only = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            KVMIO_TYPE << 8,
        )?;
        rules.insert(libc::SYS_ioctl, vec![SeccompRule::new(vec![kvm_only])?]);
    }
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    BpfProgram::try_from(f).map_err(|e| SeccompError::Compile(e.to_string()))
}

/// Installs `kind`'s filter on the calling thread only.
pub fn apply_to_current_thread(kind: ThreadKind) -> Result<(), SeccompError> {
    let prog = filter(kind)?;
    seccompiler::apply_filter(&prog)?;
    tracing::debug!(?kind, "seccomp filter installed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a fresh thread with `kind`'s filter installed.
    fn filtered<T: Send + 'static>(kind: ThreadKind, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            apply_to_current_thread(kind).expect("install");
            f()
        })
        .join()
        .expect("thread")
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn forbidden_syscalls_get_eperm_allowed_ones_work() {
        for kind in [ThreadKind::Vcpu, ThreadKind::VirtioDevice] {
            let (open, socket, execve, ioctl, write) = filtered(kind, || {
                // SAFETY: plain syscalls with valid arguments (a NUL-terminated
                // path, null argv/envp, a pipe this closure owns).
                unsafe {
                    let open = libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY);
                    let open_err = errno();
                    let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    let socket_err = errno();
                    let e = libc::execve(c"/bin/true".as_ptr(), std::ptr::null(), std::ptr::null());
                    let execve_err = errno();
                    // FIONREAD on stdin: not a KVM ioctl.
                    let mut n: libc::c_int = 0;
                    let i = libc::ioctl(0, libc::FIONREAD, &mut n);
                    let ioctl_err = errno();
                    let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                        .expect("eventfd is allowed");
                    let w = evt.write(1).is_ok() && evt.read().ok() == Some(1);
                    (
                        (open, open_err),
                        (s, socket_err),
                        (e, execve_err),
                        (i, ioctl_err),
                        w,
                    )
                }
            });
            assert_eq!(open, (-1, libc::EPERM), "{kind:?}: open refused");
            assert_eq!(socket, (-1, libc::EPERM), "{kind:?}: socket refused");
            assert_eq!(execve, (-1, libc::EPERM), "{kind:?}: execve refused");
            assert_eq!(ioctl, (-1, libc::EPERM), "{kind:?}: non-KVM ioctl refused");
            assert!(write, "{kind:?}: eventfd read/write allowed");
        }
    }

    #[test]
    fn the_filter_binds_only_its_thread() {
        filtered(ThreadKind::VirtioDevice, || ());
        // This thread has no filter: open works.
        let f = std::fs::File::open("/proc/self/status").expect("unfiltered thread");
        drop(f);
    }

    #[test]
    fn vcpu_may_start_a_thread_device_may_not() {
        let vcpu = filtered(ThreadKind::Vcpu, || {
            std::thread::Builder::new()
                .name("child".into())
                .spawn(|| 7)
                .map(|h| h.join().unwrap_or(0))
                .unwrap_or(0)
        });
        assert_eq!(vcpu, 7);
        let dev = filtered(ThreadKind::VirtioDevice, || {
            std::thread::Builder::new().spawn(|| 7).is_err()
        });
        assert!(dev, "a device thread cannot start threads");
    }

    #[test]
    fn lists() {
        let v = allowed_syscalls(ThreadKind::Vcpu);
        let d = allowed_syscalls(ThreadKind::VirtioDevice);
        assert!(d.iter().all(|s| v.contains(s)), "vCPU list is a superset");
        for s in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_execve,
        ] {
            assert!(!v.contains(&s));
        }
    }
}
