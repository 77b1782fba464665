//! Socket traffic: payload bytes per process from `sock_send_length` and
//! `sock_recv_length` (Linux ≥ 6.3), which fire in the context of the
//! process that sends or receives, whoever created the socket, so prefork
//! servers' workers are billed for their own connections.
//!
//! Like syscalls, the counts go to per-CPU pending counters and are folded
//! into the process's entry at its next context switch: no hash update here.

use agent_common::{NET_RX_BYTES, NET_RX_CALLS, NET_TX_BYTES, NET_TX_CALLS};
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{
    maps::{CPU_STATE, off},
    task,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// Data read with MSG_PEEK stays in the queue and is read again later.
const MSG_PEEK: i32 = 2;

/// `sock_send_length(struct sock *sk, int ret, int flags)`.
///
/// BTF tracepoints, as `sched_switch`: `sk` is typed, so its family is a
/// direct load rather than a `bpf_probe_read_kernel` call on every send.
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send(ctx: BtfTracePointContext) -> i32 {
    count(&ctx, NET_TX_BYTES, NET_TX_CALLS);
    0
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv(ctx: BtfTracePointContext) -> i32 {
    let flags: u64 = ctx.arg(2);
    if (flags as i32) & MSG_PEEK != 0 {
        return 0;
    }
    count(&ctx, NET_RX_BYTES, NET_RX_CALLS);
    0
}

#[inline(always)]
fn count(ctx: &BtfTracePointContext, bytes_idx: usize, calls_idx: usize) {
    let ret: u64 = ctx.arg(1);
    let ret = ret as i32;
    if ret <= 0 {
        return;
    }
    if off!(valid) == 0 {
        return;
    }
    let sk: *const u8 = ctx.arg(0);
    // Unix sockets and netlink are local IPC, not network traffic.
    if sk.is_null() {
        return;
    }
    match task::load::<u16>(sk, off!(sock_family)) {
        AF_INET | AF_INET6 => {}
        _ => return,
    }
    if let Some(st) = CPU_STATE.get_ptr_mut(0) {
        // SAFETY: this CPU's entry; only sched_switch (IRQs off) folds these.
        unsafe {
            if let Some(b) = (*st).pending_net.get_mut(bytes_idx) {
                *b += ret as u64;
            }
            if let Some(c) = (*st).pending_net.get_mut(calls_idx) {
                *c += 1;
            }
        }
    }
}
