//! Socket traffic: payload bytes per process from `sock_send_length` and
//! `sock_recv_length` (Linux ≥ 6.3), which fire in the context of the
//! process that sends or receives, whoever created the socket, so prefork
//! servers' workers are billed for their own connections.
//!
//! Like syscalls, the counts go to per-CPU pending counters and are folded
//! into the process's entry at its next context switch: no hash update here.
//!
//! Sender binding rides on the same hook: a send on an established TCP
//! socket to one of the OTLP receiver's ports records the socket's own
//! (address, port) → the sending process, so the receiver can ask the kernel,
//! not the client, who a connection's sender is. Every other send costs one
//! array lookup and a port compare more.

use agent_common::{
    NET_RX_BYTES, NET_RX_CALLS, NET_TX_BYTES, NET_TX_CALLS, SenderKey, SenderValue,
};
use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    maps::{CPU_STATE, RECEIVER_PORTS, SENDER_STATS, SENDERS, off, sock_off},
    task,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// Data read with MSG_PEEK stays in the queue and is read again later.
const MSG_PEEK: i32 = 2;
const IPPROTO_TCP: u16 = 6;
const TCP_ESTABLISHED: u8 = 1;

/// `sock_send_length(struct sock *sk, int ret, int flags)`.
///
/// BTF tracepoints, as `sched_switch`: `sk` is typed, so its family is a
/// direct load rather than a `bpf_probe_read_kernel` call on every send.
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send(ctx: BtfTracePointContext) -> i32 {
    if let Some(family) = count(&ctx, NET_TX_BYTES, NET_TX_CALLS) {
        record_sender(ctx.arg(0), family);
    }
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

/// Counts one send or receive; the socket's family when it was an inet one.
#[inline(always)]
fn count(ctx: &BtfTracePointContext, bytes_idx: usize, calls_idx: usize) -> Option<u16> {
    let ret: u64 = ctx.arg(1);
    let ret = ret as i32;
    if ret <= 0 {
        return None;
    }
    if off!(valid) == 0 {
        return None;
    }
    let sk: *const u8 = ctx.arg(0);
    // Unix sockets and netlink are local IPC, not network traffic.
    if sk.is_null() {
        return None;
    }
    let family = task::load::<u16>(sk, off!(sock_family));
    match family {
        AF_INET | AF_INET6 => {}
        _ => return None,
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
    Some(family)
}

/// Records the current process as the sender on `sk` when `sk` is an
/// established TCP connection to one of the receiver's ports. Established:
/// the handshake proves the local address routes back to this socket, so a
/// spoofed source (IP_FREEBIND, a TCP Fast Open SYN, UDP) records nothing.
#[inline(always)]
fn record_sender(sk: *const u8, family: u16) {
    if sock_off!(valid) == 0 {
        return;
    }
    let Some(ports) = RECEIVER_PORTS.get(0) else {
        return;
    };
    let dport = u16::from_be(task::load::<u16>(sk, sock_off!(dport)));
    if dport == 0 || !ports.ports.contains(&dport) {
        return;
    }
    if task::load::<u16>(sk, sock_off!(protocol)) != IPPROTO_TCP
        || task::load::<u8>(sk, sock_off!(state)) != TCP_ESTABLISHED
    {
        return;
    }
    let mut key = SenderKey {
        port: task::load::<u16>(sk, sock_off!(num)),
        ..SenderKey::default()
    };
    if family == AF_INET {
        let v4: [u8; 4] = task::load(sk, sock_off!(rcv_saddr));
        key.addr[10] = 0xff;
        key.addr[11] = 0xff;
        key.addr[12] = v4[0];
        key.addr[13] = v4[1];
        key.addr[14] = v4[2];
        key.addr[15] = v4[3];
    } else {
        key.addr = task::load(sk, sock_off!(v6_rcv_saddr));
    }
    let net: *const u8 = task::load(sk, sock_off!(net));
    let Ok(start_ns) = task::leader_start_ns(task::current()) else {
        return;
    };
    let value = SenderValue {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        netns: task::load(net, sock_off!(net_inum)),
        start_ns,
        // SAFETY: no preconditions in tracing programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
    // SAFETY: the value is copied out at once; LRU entries may be replaced
    // concurrently, and a stale copy only costs one more write.
    if unsafe { SENDERS.get(key) }.is_some_and(|v| *v == value) {
        return;
    }
    let slot = match SENDERS.insert(key, value, 0) {
        Ok(()) => 0,
        Err(_) => 1,
    };
    if let Some(n) = SENDER_STATS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot.
        unsafe { *n += 1 };
    }
}
