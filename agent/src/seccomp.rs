//! The seccomp filter every command runs under: no new user namespace.
//!
//! A call's processes are found by a supplementary group they cannot shed
//! (see `identity.rs`). Inside a new user namespace a process holds every
//! capability of that namespace, and some kernels (gVisor's among them)
//! then let it `setgroups` its way out of the call's group, beyond the
//! reach of a timeout or a cancel. Docker's default seccomp profile refuses
//! new user namespaces to a process without `CAP_SYS_ADMIN`, but gVisor
//! applies no OCI seccomp profile and an operator may run containers
//! unconfined; this filter is the agent's own, installed before the
//! command's exec with `no-new-privileges`, and inherited by everything the
//! command starts, with no way to remove it.
//!
//! Refused: `unshare` and `clone` with `CLONE_NEWUSER` (EPERM), `setns`
//! (EPERM: joining another namespace needs capabilities the workload does
//! not have anyway), `clone3` (ENOSYS: its flags live in memory a filter
//! cannot read; libc falls back to `clone`, as under Docker's own profile),
//! and every syscall of a foreign ABI (ENOSYS: on x86_64, `int 0x80` and the
//! x32 ABI number syscalls differently, which would slip past the checks).

/// A filter program ready for `install` (built before the fork: installing
/// must not allocate).
pub struct Filter(Vec<libc::sock_filter>);

#[cfg(target_arch = "x86_64")]
mod native {
    /// `AUDIT_ARCH_X86_64`.
    pub const ARCH: u32 = 0xC000_003E;
    /// Syscall numbers at or above this are the x32 ABI's.
    pub const FOREIGN_FROM: Option<u32> = Some(0x4000_0000);
}

#[cfg(target_arch = "aarch64")]
mod native {
    /// `AUDIT_ARCH_AARCH64`.
    pub const ARCH: u32 = 0xC000_00B7;
    pub const FOREIGN_FROM: Option<u32> = None;
}

/// Offsets into `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
/// The low 32 bits of the first argument (little-endian).
const ARG0_LOW: u32 = 16;

const CLONE_NEWUSER: u32 = libc::CLONE_NEWUSER as u32;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// A conditional jump at index `at` to the absolute indices `yes` / `no`.
fn jump(code: u32, k: u32, at: usize, yes: usize, no: usize) -> libc::sock_filter {
    let rel = |to: usize| u8::try_from(to - at - 1).expect("a short forward jump");
    libc::sock_filter {
        code: code as u16,
        jt: rel(yes),
        jf: rel(no),
        k,
    }
}

fn ret(action: u32) -> libc::sock_filter {
    stmt(libc::BPF_RET | libc::BPF_K, action)
}

impl Filter {
    /// The filter for this machine's ABI.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub fn new() -> Self {
        use libc::{BPF_ABS, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_W};
        let load = |offset| stmt(BPF_LD | BPF_W | BPF_ABS, offset);
        let eq = BPF_JMP | BPF_JEQ | BPF_K;
        // The shared ends, at fixed places.
        const ALLOW: usize = 11;
        const EPERM: usize = 12;
        const ENOSYS: usize = 13;
        const FLAGS: usize = 9;
        let foreign_from = native::FOREIGN_FROM.unwrap_or(u32::MAX);
        let program = vec![
            /* 0 */ load(ARCH),
            /* 1 */ jump(eq, native::ARCH, 1, 2, ENOSYS),
            /* 2 */ load(NR),
            /* 3 */ jump(BPF_JMP | BPF_JGE | BPF_K, foreign_from, 3, ENOSYS, 4),
            /* 4 */ jump(eq, libc::SYS_clone3 as u32, 4, ENOSYS, 5),
            /* 5 */ jump(eq, libc::SYS_setns as u32, 5, EPERM, 6),
            /* 6 */ jump(eq, libc::SYS_unshare as u32, 6, FLAGS, 7),
            /* 7 */ jump(eq, libc::SYS_clone as u32, 7, FLAGS, 8),
            /* 8 */ ret(libc::SECCOMP_RET_ALLOW),
            /* 9 */ load(ARG0_LOW),
            /* 10 */ jump(BPF_JMP | BPF_JSET | BPF_K, CLONE_NEWUSER, 10, EPERM, ALLOW),
            /* 11 */ ret(libc::SECCOMP_RET_ALLOW),
            /* 12 */ ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
            /* 13 */ ret(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        ];
        Filter(program)
    }

    /// No filter where the agent does not know the ABI.
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub fn new() -> Self {
        Filter(Vec::new())
    }

    /// Installs the filter on the calling thread, for good; needs
    /// `no-new-privileges` or `CAP_SYS_ADMIN`. Async-signal-safe (one
    /// syscall on memory built before the fork).
    pub fn install(&self) -> std::io::Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let program = libc::sock_fprog {
            len: self.0.len() as u16,
            filter: self.0.as_ptr().cast_mut(),
        };
        // SAFETY: the program outlives the call; the kernel copies it.
        let done = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &program as *const libc::sock_fprog,
            )
        };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a child: installs the filter (or not), runs `probe`, and exits
    /// with the errno it met (0: the call succeeded).
    fn errno_in_child(filter: Option<&Filter>, probe: fn() -> libc::c_long) -> i32 {
        // SAFETY: the child makes raw syscalls only, then _exits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                if let Some(filter) = filter {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || filter.install().is_err()
                    {
                        libc::_exit(100);
                    }
                }
                let code = if probe() < 0 {
                    *libc::__errno_location()
                } else {
                    0
                };
                libc::_exit(code);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(libc::WIFEXITED(status), "the probe died: {status}");
            libc::WEXITSTATUS(status)
        }
    }

    fn unshare_user() -> libc::c_long {
        // SAFETY: a syscall with an integer argument.
        unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) }
    }

    fn unshare_files() -> libc::c_long {
        // SAFETY: as above; CLONE_FILES needs no privilege.
        unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_FILES) }
    }

    fn clone3() -> libc::c_long {
        // SAFETY: a null argument: the kernel would answer EFAULT/EINVAL.
        unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) }
    }

    fn getpid() -> libc::c_long {
        // SAFETY: no arguments.
        unsafe { libc::syscall(libc::SYS_getpid) }
    }

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn a_filtered_process_cannot_make_a_user_namespace() {
        let filter = Filter::new();
        // Unfiltered, this test's user may (root on CI; an unprivileged
        // user where the kernel allows it): so the filter is what refuses.
        assert_eq!(
            errno_in_child(None, unshare_user),
            0,
            "unfiltered, this test's user must be able to make a user namespace \
             (root is, on CI), or the filter is not what the next line proves"
        );
        assert_eq!(errno_in_child(Some(&filter), unshare_user), libc::EPERM);
        assert_eq!(errno_in_child(Some(&filter), clone3), libc::ENOSYS);
        assert_eq!(errno_in_child(Some(&filter), unshare_files), 0);
        assert_eq!(errno_in_child(Some(&filter), getpid), 0);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_32_bit_abi_is_refused_whole() {
        fn int80_unshare() -> libc::c_long {
            let ret: libc::c_long;
            // SAFETY: the i386 unshare (310) through int 0x80, as a
            // workload would try it to slip past the native numbers.
            unsafe {
                std::arch::asm!(
                    "xchg rbx, {flags}",
                    "int 0x80",
                    "xchg rbx, {flags}",
                    flags = inout(reg) libc::CLONE_NEWUSER as i64 => _,
                    inlateout("rax") 310i64 => ret,
                );
            }
            if ret < 0 {
                // SAFETY: setting this thread's errno.
                unsafe { *libc::__errno_location() = (-ret) as i32 };
                -1
            } else {
                0
            }
        }
        assert_eq!(
            errno_in_child(Some(&Filter::new()), int80_unshare),
            libc::ENOSYS
        );
    }
}
