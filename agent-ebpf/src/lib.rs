//! Marker library: the eBPF programs are the `mentat-probes` binary, built for the BPF target.
#![no_std]
