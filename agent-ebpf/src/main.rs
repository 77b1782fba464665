//! mentat-agent's kernel side: count on-CPU time and syscalls per process
//! instance, and report process lifecycle, with as little work per event as
//! the kernel allows.
//!
//! The hot paths (`sys_enter`, `sched_switch`) only touch per-CPU state; a
//! hash update happens once per context switch, never per syscall. No string
//! work happens here: names are copied as fixed-size buffers for userspace.
#![no_std]
#![no_main]

mod maps;
mod probes;
mod task;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path to it.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
