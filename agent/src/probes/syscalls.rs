//! The syscall-number → class table the kernel side uses for the bounded
//! per-process breakdown (see `agent_common::SyscallClass`).
//!
//! Built from libc's `SYS_*` constants, so the numbers are those of the
//! architecture the agent is compiled for, which is the kernel's.

use agent_common::{SYSCALL_TABLE_LEN, SyscallClass};

/// The table to load into the probes: index = syscall number, value = class.
pub fn class_table() -> [u8; SYSCALL_TABLE_LEN] {
    let mut table = [SyscallClass::Other as u8; SYSCALL_TABLE_LEN];
    for &(class, numbers) in CLASSES {
        for &nr in numbers {
            if let Ok(i) = usize::try_from(nr)
                && let Some(slot) = table.get_mut(i)
            {
                *slot = class as u8;
            }
        }
    }
    table
}

/// The class of syscall `nr` as the kernel side will count it.
pub fn class_of(nr: i64) -> SyscallClass {
    let table = class_table();
    usize::try_from(nr)
        .ok()
        .and_then(|i| table.get(i))
        .and_then(|&c| SyscallClass::ALL.get(usize::from(c)).copied())
        .unwrap_or(SyscallClass::Other)
}

use libc as l;

#[cfg(target_arch = "x86_64")]
const ARCH_FILE: &[i64] = &[
    l::SYS_open,
    l::SYS_creat,
    l::SYS_stat,
    l::SYS_lstat,
    l::SYS_access,
    l::SYS_readlink,
    l::SYS_unlink,
    l::SYS_rename,
    l::SYS_mkdir,
    l::SYS_rmdir,
    l::SYS_chmod,
    l::SYS_chown,
    l::SYS_getdents,
    l::SYS_dup2,
    l::SYS_sendfile,
];
#[cfg(not(target_arch = "x86_64"))]
const ARCH_FILE: &[i64] = &[];

#[cfg(target_arch = "x86_64")]
const ARCH_PROCESS: &[i64] = &[l::SYS_fork, l::SYS_vfork, l::SYS_getpgrp, l::SYS_arch_prctl];
#[cfg(not(target_arch = "x86_64"))]
const ARCH_PROCESS: &[i64] = &[];

#[cfg(target_arch = "x86_64")]
const ARCH_SYNC: &[i64] = &[
    l::SYS_poll,
    l::SYS_select,
    l::SYS_epoll_wait,
    l::SYS_epoll_create,
    l::SYS_pause,
];
#[cfg(not(target_arch = "x86_64"))]
const ARCH_SYNC: &[i64] = &[];

#[cfg(target_arch = "x86_64")]
const ARCH_TIME: &[i64] = &[l::SYS_time, l::SYS_alarm];
#[cfg(not(target_arch = "x86_64"))]
const ARCH_TIME: &[i64] = &[];

#[cfg(target_arch = "x86_64")]
const ARCH_IPC: &[i64] = &[l::SYS_pipe, l::SYS_eventfd, l::SYS_signalfd];
#[cfg(not(target_arch = "x86_64"))]
const ARCH_IPC: &[i64] = &[];

const FILE: &[i64] = &[
    l::SYS_read,
    l::SYS_write,
    l::SYS_openat,
    l::SYS_openat2,
    l::SYS_close,
    l::SYS_close_range,
    l::SYS_fstat,
    l::SYS_newfstatat,
    l::SYS_statx,
    l::SYS_lseek,
    l::SYS_pread64,
    l::SYS_pwrite64,
    l::SYS_readv,
    l::SYS_writev,
    l::SYS_preadv,
    l::SYS_pwritev,
    l::SYS_preadv2,
    l::SYS_pwritev2,
    l::SYS_faccessat,
    l::SYS_faccessat2,
    l::SYS_readlinkat,
    l::SYS_unlinkat,
    l::SYS_renameat,
    l::SYS_renameat2,
    l::SYS_mkdirat,
    l::SYS_fchmod,
    l::SYS_fchmodat,
    l::SYS_fchown,
    l::SYS_fchownat,
    l::SYS_getdents64,
    l::SYS_dup,
    l::SYS_dup3,
    l::SYS_fcntl,
    l::SYS_ioctl,
    l::SYS_fsync,
    l::SYS_fdatasync,
    l::SYS_sync,
    l::SYS_syncfs,
    l::SYS_sync_file_range,
    l::SYS_truncate,
    l::SYS_ftruncate,
    l::SYS_fallocate,
    l::SYS_copy_file_range,
    l::SYS_splice,
    l::SYS_tee,
    l::SYS_statfs,
    l::SYS_fstatfs,
    l::SYS_getcwd,
    l::SYS_chdir,
    l::SYS_fchdir,
    l::SYS_io_uring_enter,
    l::SYS_io_uring_setup,
    l::SYS_io_submit,
    l::SYS_io_getevents,
    l::SYS_inotify_add_watch,
    l::SYS_fanotify_mark,
    l::SYS_getxattr,
    l::SYS_setxattr,
    l::SYS_lgetxattr,
    l::SYS_fgetxattr,
    l::SYS_listxattr,
    l::SYS_flistxattr,
    l::SYS_mount,
    l::SYS_umount2,
];

const NETWORK: &[i64] = &[
    l::SYS_socket,
    l::SYS_socketpair,
    l::SYS_connect,
    l::SYS_accept,
    l::SYS_accept4,
    l::SYS_bind,
    l::SYS_listen,
    l::SYS_sendto,
    l::SYS_recvfrom,
    l::SYS_sendmsg,
    l::SYS_recvmsg,
    l::SYS_sendmmsg,
    l::SYS_recvmmsg,
    l::SYS_shutdown,
    l::SYS_getsockname,
    l::SYS_getpeername,
    l::SYS_getsockopt,
    l::SYS_setsockopt,
];

const MEMORY: &[i64] = &[
    l::SYS_mmap,
    l::SYS_munmap,
    l::SYS_mremap,
    l::SYS_mprotect,
    l::SYS_madvise,
    l::SYS_brk,
    l::SYS_mlock,
    l::SYS_munlock,
    l::SYS_mlockall,
    l::SYS_munlockall,
    l::SYS_msync,
    l::SYS_mincore,
    l::SYS_membarrier,
    l::SYS_memfd_create,
    l::SYS_process_madvise,
];

const PROCESS: &[i64] = &[
    l::SYS_clone,
    l::SYS_clone3,
    l::SYS_execve,
    l::SYS_execveat,
    l::SYS_exit,
    l::SYS_exit_group,
    l::SYS_wait4,
    l::SYS_waitid,
    l::SYS_kill,
    l::SYS_tkill,
    l::SYS_tgkill,
    l::SYS_getpid,
    l::SYS_getppid,
    l::SYS_gettid,
    l::SYS_getuid,
    l::SYS_geteuid,
    l::SYS_getgid,
    l::SYS_getegid,
    l::SYS_setuid,
    l::SYS_setgid,
    l::SYS_setsid,
    l::SYS_setpgid,
    l::SYS_getpgid,
    l::SYS_getsid,
    l::SYS_prctl,
    l::SYS_prlimit64,
    l::SYS_getrlimit,
    l::SYS_setrlimit,
    l::SYS_getrusage,
    l::SYS_rt_sigaction,
    l::SYS_rt_sigprocmask,
    l::SYS_rt_sigreturn,
    l::SYS_rt_sigsuspend,
    l::SYS_rt_sigtimedwait,
    l::SYS_sigaltstack,
    l::SYS_set_tid_address,
    l::SYS_set_robust_list,
    l::SYS_rseq,
    l::SYS_sched_setaffinity,
    l::SYS_sched_getaffinity,
    l::SYS_pidfd_open,
    l::SYS_pidfd_send_signal,
    l::SYS_uname,
    l::SYS_getrandom,
    l::SYS_capget,
    l::SYS_capset,
];

const SYNC: &[i64] = &[
    l::SYS_futex,
    l::SYS_ppoll,
    l::SYS_pselect6,
    l::SYS_epoll_pwait,
    l::SYS_epoll_pwait2,
    l::SYS_epoll_ctl,
    l::SYS_epoll_create1,
    l::SYS_nanosleep,
    l::SYS_clock_nanosleep,
    l::SYS_sched_yield,
];

const TIME: &[i64] = &[
    l::SYS_clock_gettime,
    l::SYS_clock_getres,
    l::SYS_clock_settime,
    l::SYS_gettimeofday,
    l::SYS_settimeofday,
    l::SYS_times,
    l::SYS_timer_create,
    l::SYS_timer_settime,
    l::SYS_timer_gettime,
    l::SYS_timer_delete,
    l::SYS_timerfd_create,
    l::SYS_timerfd_settime,
    l::SYS_timerfd_gettime,
    l::SYS_getitimer,
    l::SYS_setitimer,
];

const IPC: &[i64] = &[
    l::SYS_pipe2,
    l::SYS_eventfd2,
    l::SYS_signalfd4,
    l::SYS_msgget,
    l::SYS_msgsnd,
    l::SYS_msgrcv,
    l::SYS_msgctl,
    l::SYS_semget,
    l::SYS_semop,
    l::SYS_semtimedop,
    l::SYS_semctl,
    l::SYS_shmget,
    l::SYS_shmat,
    l::SYS_shmdt,
    l::SYS_shmctl,
    l::SYS_mq_open,
    l::SYS_mq_timedsend,
    l::SYS_mq_timedreceive,
];

const CLASSES: &[(SyscallClass, &[i64])] = &[
    (SyscallClass::File, FILE),
    (SyscallClass::File, ARCH_FILE),
    (SyscallClass::Network, NETWORK),
    (SyscallClass::Memory, MEMORY),
    (SyscallClass::Process, PROCESS),
    (SyscallClass::Process, ARCH_PROCESS),
    (SyscallClass::Sync, SYNC),
    (SyscallClass::Sync, ARCH_SYNC),
    (SyscallClass::Time, TIME),
    (SyscallClass::Time, ARCH_TIME),
    (SyscallClass::Ipc, IPC),
    (SyscallClass::Ipc, ARCH_IPC),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_syscalls_land_in_their_class() {
        assert_eq!(class_of(l::SYS_getppid), SyscallClass::Process);
        assert_eq!(class_of(l::SYS_read), SyscallClass::File);
        assert_eq!(class_of(l::SYS_sendto), SyscallClass::Network);
        assert_eq!(class_of(l::SYS_mmap), SyscallClass::Memory);
        assert_eq!(class_of(l::SYS_futex), SyscallClass::Sync);
        assert_eq!(class_of(l::SYS_clock_gettime), SyscallClass::Time);
        assert_eq!(class_of(l::SYS_pipe2), SyscallClass::Ipc);
    }

    #[test]
    fn out_of_range_numbers_are_other() {
        assert_eq!(class_of(-1), SyscallClass::Other);
        assert_eq!(class_of(100_000), SyscallClass::Other);
    }

    #[test]
    fn no_syscall_is_in_two_classes() {
        let mut seen = std::collections::HashMap::new();
        for &(class, numbers) in CLASSES {
            for &nr in numbers {
                if let Some(prev) = seen.insert(nr, class) {
                    assert_eq!(prev, class, "syscall {nr} listed in two classes");
                }
            }
        }
    }
}
