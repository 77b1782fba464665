//! Just enough of the kernel's BPF Type Format (BTF) to find struct member offsets.
//!
//! Our eBPF programs are Rust (aya-ebpf), which has no CO-RE: nothing relocates
//! `task->start_time` for the running kernel when the programs are loaded. They
//! read kernel structs with `bpf_probe_read_kernel(ptr + offset)` instead, and
//! the agent looks those offsets up here, in the running kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`), and passes them to the programs as a read-only
//! global ([`agent_common::TaskOffsets`]) before loading them.
//!
//! Only base (vmlinux) BTF is read, not split module BTF. The format is
//! described in the kernel's `Documentation/bpf/btf.rst`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use agent_common::TaskOffsets;

const MAGIC: u16 = 0xeb9f;
const VERSION: u8 = 1;
/// Size of the header fields we know; newer kernels may append more.
const HEADER_LEN: usize = 24;
/// `struct btf_type`: name_off, info, size_or_type.
const TYPE_LEN: usize = 12;
/// `struct btf_member`: name_off, type, offset.
const MEMBER_LEN: usize = 12;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Real kernel structs nest anonymous members a few levels deep; anything much
/// deeper is a malformed (possibly cyclic) blob, and recursing on it could
/// exhaust the stack.
const MAX_ANON_DEPTH: usize = 32;
/// Same for typedef/const/volatile chains, which a malformed blob could make cyclic.
const MAX_MODIFIER_CHAIN: usize = 32;

/// Why BTF could not be read or did not have what was asked for.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file could not be read.
    #[error("reading BTF from {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The file was read but its contents are not valid BTF.
    #[error("parsing BTF from {}: {error}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        error: Box<BtfError>,
    },
    /// The blob cannot even hold the header.
    #[error("BTF blob is {len} bytes, too short for the {HEADER_LEN}-byte header")]
    TooShort {
        /// Length of the blob.
        len: usize,
    },
    /// The magic is BTF's, but in the other byte order.
    #[error(
        "BTF magic is byte-swapped (0x9feb): the blob is big-endian and only little-endian BTF is supported"
    )]
    ByteSwapped,
    /// The blob does not start with the BTF magic.
    #[error("BTF magic is {magic:#06x}, expected 0xeb9f: not a BTF blob")]
    BadMagic {
        /// The first two bytes, little-endian.
        magic: u16,
    },
    /// A BTF version this parser does not know.
    #[error("BTF version {version} is not supported (only version {VERSION} is)")]
    UnsupportedVersion {
        /// Version byte from the header.
        version: u8,
    },
    /// `hdr_len` is smaller than the known header or runs past the blob.
    #[error("BTF header length {hdr_len} is invalid for a {len}-byte blob")]
    BadHeaderLen {
        /// `hdr_len` from the header.
        hdr_len: u32,
        /// Length of the blob.
        len: usize,
    },
    /// The header places a section outside the blob.
    #[error(
        "BTF {section} section (offset {offset}, length {length} after the header) runs past the end of the {len}-byte blob"
    )]
    SectionOutOfBounds {
        /// `"type"` or `"string"`.
        section: &'static str,
        /// Offset from the header.
        offset: u32,
        /// Length from the header.
        length: u32,
        /// Length of the blob.
        len: usize,
    },
    /// The string section does not start with the empty string that offset 0 must name.
    #[error("BTF string section does not start with a NUL byte")]
    BadStringSection,
    /// A type's header is cut off by the end of the type section.
    #[error(
        "BTF type section is truncated at type #{id}: {left} bytes left, a type header needs {TYPE_LEN}"
    )]
    TruncatedTypeHeader {
        /// Id the type would have had.
        id: u32,
        /// Bytes left in the section.
        left: usize,
    },
    /// A type's trailing data (members, enumerators, ...) is cut off by the end of the type section.
    #[error("BTF type section is truncated at type #{id} (kind {kind})")]
    TruncatedType {
        /// Id of the type.
        id: u32,
        /// Its kind.
        kind: u32,
    },
    /// A kind this parser does not know, so it cannot tell how long the type is.
    #[error("BTF type #{id} has unknown kind {kind}")]
    UnknownKind {
        /// Id of the type.
        id: u32,
        /// Its kind.
        kind: u32,
    },
    /// A name offset outside the string section, or a string without a terminating NUL.
    #[error("BTF string offset {offset} is outside the string section or not NUL-terminated")]
    BadString {
        /// The offset into the string section.
        offset: u32,
    },
    /// A type id that names no type.
    #[error("BTF refers to type #{id}, but type ids run from 1 to {count}")]
    BadTypeRef {
        /// The id referred to.
        id: u32,
        /// Number of types in the blob.
        count: usize,
    },
    /// No struct of that name has members.
    #[error("BTF has no struct `{struct_name}` (with members)")]
    StructNotFound {
        /// Name looked for.
        struct_name: String,
    },
    /// The struct exists but has no such member, not even in an anonymous struct or union.
    #[error("struct {struct_name} has no member `{member}`")]
    MemberNotFound {
        /// The struct.
        struct_name: String,
        /// The member looked for.
        member: String,
    },
    /// The member is a bitfield, which has no byte offset to read at.
    #[error(
        "struct {struct_name} member `{member}` is a {bits}-bit bitfield, not byte-addressable"
    )]
    Bitfield {
        /// The struct.
        struct_name: String,
        /// The member.
        member: String,
        /// Width of the bitfield.
        bits: u32,
    },
    /// The member does not start on a byte boundary.
    #[error(
        "struct {struct_name} member `{member}` is at bit offset {bit_offset}, not a whole byte"
    )]
    Unaligned {
        /// The struct.
        struct_name: String,
        /// The member.
        member: String,
        /// Its bit offset from the start of the struct.
        bit_offset: u64,
    },
    /// The member's offset does not fit in 32 bits.
    #[error(
        "struct {struct_name} member `{member}` is at bit offset {bit_offset}, too far to express in bytes as u32"
    )]
    OffsetOverflow {
        /// The struct.
        struct_name: String,
        /// The member.
        member: String,
        /// Its bit offset from the start of the struct.
        bit_offset: u64,
    },
    /// Anonymous members or modifier chains nest deeper than any real kernel's.
    #[error("struct {struct_name}: BTF types nest more than {MAX_ANON_DEPTH} deep (cyclic BTF?)")]
    TooDeep {
        /// The struct being searched.
        struct_name: String,
    },
}

/// Parsed kernel BTF, enough to resolve struct member offsets.
pub struct Btf {
    /// The type section.
    types: Vec<u8>,
    /// The string section.
    strings: Vec<u8>,
    /// Where each type starts in `types`; type id `n` is at index `n - 1` (id 0 is `void`).
    type_starts: Vec<u32>,
    /// STRUCT type ids by name: the only kind lookups start from, and indexing
    /// only these keeps parsing cheap (vmlinux has over 100k types, ~10k structs).
    structs: HashMap<Vec<u8>, Vec<u32>>,
}

impl std::fmt::Debug for Btf {
    // The derived form would print megabytes of type data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.type_starts.len())
            .field("type_bytes", &self.types.len())
            .field("string_bytes", &self.strings.len())
            .finish()
    }
}

/// The fixed part of one type.
#[derive(Clone, Copy, Debug)]
struct Type {
    id: u32,
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    vlen: u32,
    size_or_type: u32,
    /// Where its trailing data (members, ...) starts in the type section.
    data: usize,
}

/// A member found by name.
struct Found {
    bit_offset: u64,
    /// From `kind_flag` members; 0 for ordinary members.
    bitfield_size: u32,
    kind_flag: bool,
    type_id: u32,
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(b.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

/// Bytes of data following the fixed type header, which is what walking the
/// type section depends on: there is no per-type length field.
fn trailing_len(kind: u32, vlen: u32) -> Option<usize> {
    let vlen = vlen as usize;
    Some(match kind {
        KIND_INT => 4,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION => MEMBER_LEN * vlen,
        KIND_ENUM => 8 * vlen,
        KIND_FUNC_PROTO => 8 * vlen,
        KIND_VAR => 4,
        KIND_DATASEC => 12 * vlen,
        KIND_DECL_TAG => 4,
        KIND_ENUM64 => 12 * vlen,
        _ => return None,
    })
}

impl Btf {
    /// Reads and parses a BTF file, normally `/sys/kernel/btf/vmlinux`.
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let bytes = std::fs::read(path).map_err(|error| BtfError::Read {
            path: path.to_owned(),
            error,
        })?;
        Btf::from_bytes(bytes).map_err(|error| BtfError::Parse {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    /// Parses a BTF blob.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Btf, BtfError> {
        let len = bytes.len();
        let magic = read_u16(&bytes, 0).ok_or(BtfError::TooShort { len })?;
        if magic == MAGIC.swap_bytes() {
            return Err(BtfError::ByteSwapped);
        }
        if magic != MAGIC {
            return Err(BtfError::BadMagic { magic });
        }
        if len < HEADER_LEN {
            return Err(BtfError::TooShort { len });
        }
        let field = |at| read_u32(&bytes, at).ok_or(BtfError::TooShort { len });
        let version = bytes.get(2).copied().ok_or(BtfError::TooShort { len })?;
        if version != VERSION {
            return Err(BtfError::UnsupportedVersion { version });
        }
        // Byte 3 holds flags; none are defined, and none would change the layout.
        let hdr_len = field(4)?;
        let (type_off, type_len) = (field(8)?, field(12)?);
        let (str_off, str_len) = (field(16)?, field(20)?);
        if (hdr_len as usize) < HEADER_LEN || hdr_len as usize > len {
            return Err(BtfError::BadHeaderLen { hdr_len, len });
        }
        let section = |section, offset: u32, length: u32| -> Result<Range<usize>, BtfError> {
            // u64 so that crafted offsets cannot overflow on 32-bit targets.
            let start = u64::from(hdr_len) + u64::from(offset);
            let end = start + u64::from(length);
            if end > len as u64 {
                return Err(BtfError::SectionOutOfBounds {
                    section,
                    offset,
                    length,
                    len,
                });
            }
            Ok(start as usize..end as usize)
        };
        let type_range = section("type", type_off, type_len)?;
        let str_range = section("string", str_off, str_len)?;
        let types = bytes
            .get(type_range)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        let strings = bytes.get(str_range).map(<[u8]>::to_vec).unwrap_or_default();
        drop(bytes);
        if strings.first() != Some(&0) {
            return Err(BtfError::BadStringSection);
        }

        let mut btf = Btf {
            // vmlinux types average a little over 30 bytes.
            type_starts: Vec::with_capacity(types.len() / 32),
            structs: HashMap::new(),
            types,
            strings,
        };
        let mut pos = 0usize;
        while pos < btf.types.len() {
            let id = u32::try_from(btf.type_starts.len() + 1).unwrap_or(u32::MAX);
            let start = u32::try_from(pos).map_err(|_| BtfError::TruncatedTypeHeader {
                id,
                left: btf.types.len().saturating_sub(pos),
            })?;
            let ty = btf.type_at_offset(id, pos)?;
            let extra = trailing_len(ty.kind, ty.vlen)
                .ok_or(BtfError::UnknownKind { id, kind: ty.kind })?;
            let end = ty.data + extra;
            if end > btf.types.len() {
                return Err(BtfError::TruncatedType { id, kind: ty.kind });
            }
            if ty.kind == KIND_STRUCT && ty.name_off != 0 {
                let name = btf.str_at(ty.name_off)?.to_vec();
                btf.structs.entry(name).or_default().push(id);
            }
            btf.type_starts.push(start);
            pos = end;
        }
        Ok(btf)
    }

    /// Byte offset of `member` inside struct `struct_name`, looking through anonymous struct/union members recursively (kernel structs nest fields inside anonymous unions/structs, e.g. with randomized_struct_fields_start). Errors if missing, if the member is a bitfield, or if its bit offset is not a multiple of 8.
    pub fn member_offset(&self, struct_name: &str, member: &str) -> Result<u32, BtfError> {
        let not_found = || BtfError::MemberNotFound {
            struct_name: struct_name.to_owned(),
            member: member.to_owned(),
        };
        let candidates =
            self.structs
                .get(struct_name.as_bytes())
                .ok_or_else(|| BtfError::StructNotFound {
                    struct_name: struct_name.to_owned(),
                })?;
        // An empty name would match every anonymous member.
        if member.is_empty() {
            return Err(not_found());
        }
        // Duplicates of a name can differ; a sized one is the real definition.
        for want_sized in [true, false] {
            for &id in candidates {
                let ty = self.type_by_id(id)?;
                if (ty.size_or_type != 0) != want_sized {
                    continue;
                }
                let mut visited = Vec::new();
                let found =
                    self.find_member(ty, member.as_bytes(), 0, 0, &mut visited, struct_name)?;
                if let Some(found) = found {
                    return self.byte_offset(&found, struct_name, member);
                }
            }
        }
        Err(not_found())
    }

    fn type_at_offset(&self, id: u32, pos: usize) -> Result<Type, BtfError> {
        let truncated = || BtfError::TruncatedTypeHeader {
            id,
            left: self.types.len().saturating_sub(pos),
        };
        let word = |n: usize| read_u32(&self.types, pos + 4 * n).ok_or_else(truncated);
        let (name_off, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
        Ok(Type {
            id,
            name_off,
            kind: (info >> 24) & 0x1f,
            kind_flag: info >> 31 == 1,
            vlen: info & 0xffff,
            size_or_type,
            data: pos + TYPE_LEN,
        })
    }

    fn type_by_id(&self, id: u32) -> Result<Type, BtfError> {
        let bad = || BtfError::BadTypeRef {
            id,
            count: self.type_starts.len(),
        };
        let index = (id as usize).checked_sub(1).ok_or_else(bad)?;
        let start = self.type_starts.get(index).ok_or_else(bad)?;
        self.type_at_offset(id, *start as usize)
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, id: u32, struct_name: &str) -> Result<Type, BtfError> {
        let mut ty = self.type_by_id(id)?;
        for _ in 0..MAX_MODIFIER_CHAIN {
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    ty = self.type_by_id(ty.size_or_type)?;
                }
                _ => return Ok(ty),
            }
        }
        Err(BtfError::TooDeep {
            struct_name: struct_name.to_owned(),
        })
    }

    fn str_at(&self, offset: u32) -> Result<&[u8], BtfError> {
        let bad = BtfError::BadString { offset };
        let rest = self.strings.get(offset as usize..).ok_or(bad)?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(BtfError::BadString { offset })?;
        rest.get(..end).ok_or(BtfError::BadString { offset })
    }

    /// Searches `ty`'s members, descending into anonymous struct/union members;
    /// `base_bits` is where `ty` itself sits in the outermost struct.
    fn find_member(
        &self,
        ty: Type,
        member: &[u8],
        base_bits: u64,
        depth: usize,
        visited: &mut Vec<u32>,
        struct_name: &str,
    ) -> Result<Option<Found>, BtfError> {
        if depth > MAX_ANON_DEPTH {
            return Err(BtfError::TooDeep {
                struct_name: struct_name.to_owned(),
            });
        }
        // C forbids two anonymous members from bringing in the same names, so a
        // type seen twice in one lookup can only come from a malformed blob; skipping
        // it bounds the work by the blob's size instead of letting it grow exponentially.
        if visited.contains(&ty.id) {
            return Ok(None);
        }
        visited.push(ty.id);
        for i in 0..ty.vlen as usize {
            let at = ty.data + i * MEMBER_LEN;
            let word = |n: usize| {
                read_u32(&self.types, at + 4 * n).ok_or(BtfError::TruncatedType {
                    id: ty.id,
                    kind: ty.kind,
                })
            };
            let (name_off, type_id, offset) = (word(0)?, word(1)?, word(2)?);
            let (bit_offset, bitfield_size) = if ty.kind_flag {
                (offset & 0x00ff_ffff, offset >> 24)
            } else {
                (offset, 0)
            };
            let bit_offset = base_bits + u64::from(bit_offset);
            let name = self.str_at(name_off)?;
            if name == member {
                return Ok(Some(Found {
                    bit_offset,
                    bitfield_size,
                    kind_flag: ty.kind_flag,
                    type_id,
                }));
            }
            if name.is_empty() {
                let inner = self.resolve(type_id, struct_name)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    let found = self.find_member(
                        inner,
                        member,
                        bit_offset,
                        depth + 1,
                        visited,
                        struct_name,
                    )?;
                    if found.is_some() {
                        return Ok(found);
                    }
                }
            }
        }
        Ok(None)
    }

    fn byte_offset(&self, found: &Found, struct_name: &str, member: &str) -> Result<u32, BtfError> {
        let mut bitfield_bits = found.bitfield_size;
        // Without kind_flag, BTF marks a bitfield by giving the member an INT type
        // narrower than its storage or shifted within it.
        if !found.kind_flag {
            let ty = self.resolve(found.type_id, struct_name)?;
            if ty.kind == KIND_INT {
                let encoding = read_u32(&self.types, ty.data).ok_or(BtfError::TruncatedType {
                    id: ty.id,
                    kind: ty.kind,
                })?;
                let (bits, shift) = (encoding & 0xff, (encoding >> 16) & 0xff);
                if u64::from(bits) != u64::from(ty.size_or_type) * 8 || shift != 0 {
                    bitfield_bits = bits;
                }
            }
        }
        if bitfield_bits != 0 {
            return Err(BtfError::Bitfield {
                struct_name: struct_name.to_owned(),
                member: member.to_owned(),
                bits: bitfield_bits,
            });
        }
        if !found.bit_offset.is_multiple_of(8) {
            return Err(BtfError::Unaligned {
                struct_name: struct_name.to_owned(),
                member: member.to_owned(),
                bit_offset: found.bit_offset,
            });
        }
        u32::try_from(found.bit_offset / 8).map_err(|_| BtfError::OffsetOverflow {
            struct_name: struct_name.to_owned(),
            member: member.to_owned(),
            bit_offset: found.bit_offset,
        })
    }
}

/// Offsets the eBPF programs need, resolved from BTF.
pub fn task_offsets(btf: &Btf) -> Result<TaskOffsets, BtfError> {
    let task = |member| btf.member_offset("task_struct", member);
    Ok(TaskOffsets {
        task_pid: task("pid")?,
        task_tgid: task("tgid")?,
        task_flags: task("flags")?,
        task_start_boottime: task("start_boottime")?,
        task_group_leader: task("group_leader")?,
        task_real_parent: task("real_parent")?,
        task_signal: task("signal")?,
        signal_live: btf.member_offset("signal_struct", "live")?,
        binprm_filename: btf.member_offset("linux_binprm", "filename")?,
        // skc_family lives in the embedded (named, not anonymous) sock_common.
        sock_family: btf.member_offset("sock", "__sk_common")?
            + btf.member_offset("sock_common", "skc_family")?,
        task_sum_exec_runtime: task("se")?
            + btf.member_offset("sched_entity", "sum_exec_runtime")?,
        task_cgroups: task("cgroups")?,
        css_set_dfl_cgrp: btf.member_offset("css_set", "dfl_cgrp")?,
        cgroup_kn: btf.member_offset("cgroup", "kn")?,
        kernfs_node_id: btf.member_offset("kernfs_node", "id")?,
        task_ioac: task("ioac")?,
        signal_ioac: btf.member_offset("signal_struct", "ioac")?,
        ioac_read_bytes: btf.member_offset("task_io_accounting", "read_bytes")?,
        ioac_write_bytes: btf.member_offset("task_io_accounting", "write_bytes")?,
        ioac_cancelled_write_bytes: btf
            .member_offset("task_io_accounting", "cancelled_write_bytes")?,
        task_mm: task("mm")?,
        // Both sit in an anonymous struct inside mm_struct on recent kernels.
        mm_env_start: btf.member_offset("mm_struct", "env_start")?,
        mm_env_end: btf.member_offset("mm_struct", "env_end")?,
        valid: 1,
    })
}

/// `struct sock` offsets for sender binding, resolved from BTF.
pub fn sock_offsets(btf: &Btf) -> Result<agent_common::SockOffsets, BtfError> {
    let common = btf.member_offset("sock", "__sk_common")?;
    let skc = |member| btf.member_offset("sock_common", member).map(|o| o + common);
    Ok(agent_common::SockOffsets {
        daddr: skc("skc_daddr")?,
        rcv_saddr: skc("skc_rcv_saddr")?,
        dport: skc("skc_dport")?,
        num: skc("skc_num")?,
        state: skc("skc_state")?,
        v6_rcv_saddr: skc("skc_v6_rcv_saddr")?,
        net: skc("skc_net")?,
        net_inum: btf.member_offset("net", "ns")? + btf.member_offset("ns_common", "inum")?,
        protocol: btf.member_offset("sock", "sk_protocol")?,
        valid: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

    /// Builds a BTF blob type by type, so tests can describe exactly the layout they need.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Builder {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn name(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn words(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }

        /// Adds a type header and returns its id; trailing data follows via `words`.
        fn ty(&mut self, name: &str, kind: u32, kind_flag: bool, vlen: u32, size: u32) -> u32 {
            let name_off = self.name(name);
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            self.words(&[name_off, info, size]);
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        fn member(&mut self, name: &str, type_id: u32, offset: u32) {
            let name_off = self.name(name);
            self.words(&[name_off, type_id, offset]);
        }

        fn int(&mut self, name: &str, size: u32, bits: u32) -> u32 {
            let id = self.ty(name, KIND_INT, false, 0, size);
            self.words(&[bits]);
            id
        }

        fn finish(&self) -> Vec<u8> {
            let mut blob = Vec::new();
            blob.extend_from_slice(&MAGIC.to_le_bytes());
            blob.push(VERSION);
            blob.push(0);
            let type_len = self.types.len() as u32;
            for w in [
                HEADER_LEN as u32,
                0,
                type_len,
                type_len,
                self.strings.len() as u32,
            ] {
                blob.extend_from_slice(&w.to_le_bytes());
            }
            blob.extend_from_slice(&self.types);
            blob.extend_from_slice(&self.strings);
            blob
        }
    }

    /// One of every kind ahead of the structs, so a wrong trailing length for
    /// any kind would misplace every later type.
    fn synthetic() -> Vec<u8> {
        let mut b = Builder::new();
        let int = b.int("int", 4, 32);
        let uint = b.int("unsigned int", 4, 32);
        let ptr = b.ty("", KIND_PTR, false, 0, int);
        let arr = b.ty("", KIND_ARRAY, false, 0, 0);
        b.words(&[int, uint, 4]);
        let en = b.ty("colour", KIND_ENUM, false, 2, 4);
        let (red, green) = (b.name("RED"), b.name("GREEN"));
        b.words(&[red, 0, green, 1]);
        b.ty("outer", KIND_FWD, false, 0, 0);
        let td = b.ty("myint", KIND_TYPEDEF, false, 0, int);
        b.ty("", KIND_VOLATILE, false, 0, int);
        b.ty("", KIND_CONST, false, 0, int);
        b.ty("", KIND_RESTRICT, false, 0, ptr);
        let proto = b.ty("", KIND_FUNC_PROTO, false, 2, int);
        let (a, c) = (b.name("a"), b.name("c"));
        b.words(&[a, int, c, ptr]);
        b.ty("f", KIND_FUNC, false, 1, proto);
        let var = b.ty("v", KIND_VAR, false, 0, arr);
        b.words(&[1]);
        b.ty(".data", KIND_DATASEC, false, 1, 16);
        b.words(&[var, 0, 16]);
        b.ty("double", KIND_FLOAT, false, 0, 8);
        b.ty("tag", KIND_DECL_TAG, false, 0, var);
        b.words(&[u32::MAX]);
        b.ty("user", KIND_TYPE_TAG, false, 0, int);
        b.ty("big", KIND_ENUM64, false, 1, 8);
        let big = b.name("BIG");
        b.words(&[big, 1, 2]);
        // A zero-sized duplicate that must not shadow the real definition.
        b.ty("outer", KIND_STRUCT, false, 1, 0);
        b.member("first", int, 64);

        let anon_struct = b.ty("", KIND_STRUCT, false, 2, 8);
        b.member("inner_a", int, 0);
        b.member("target", td, 32);
        let anon_union = b.ty("", KIND_UNION, false, 2, 8);
        b.member("", anon_struct, 0);
        b.member("alt", en, 0);
        b.ty("outer", KIND_STRUCT, true, 5, 24);
        b.member("first", int, 0);
        b.member("", anon_union, 64);
        b.member("flags3", uint, (3 << 24) | 128);
        b.member("odd", uint, 131);
        b.member("last", uint, 160);

        // Pre-kind_flag encoding: the bitfield lives in the INT type.
        let one_bit = b.int("unsigned int", 4, 1);
        b.ty("legacy", KIND_STRUCT, false, 2, 8);
        b.member("bit", one_bit, 0);
        b.member("whole", uint, 32);

        // Anonymous member of its own type: must end, not recurse forever.
        let self_id = b.next_id;
        b.ty("loop", KIND_STRUCT, false, 1, 4);
        b.member("", self_id, 0);
        b.finish()
    }

    #[test]
    fn synthetic_offsets_through_anonymous_members() {
        let btf = Btf::from_bytes(synthetic()).expect("synthetic BTF parses");
        assert_eq!(btf.member_offset("outer", "first").ok(), Some(0));
        assert_eq!(btf.member_offset("outer", "alt").ok(), Some(8));
        assert_eq!(btf.member_offset("outer", "inner_a").ok(), Some(8));
        assert_eq!(btf.member_offset("outer", "target").ok(), Some(12));
        assert_eq!(btf.member_offset("outer", "last").ok(), Some(20));
        assert_eq!(btf.member_offset("legacy", "whole").ok(), Some(4));
    }

    #[test]
    fn synthetic_errors() {
        let btf = Btf::from_bytes(synthetic()).expect("synthetic BTF parses");
        let err = |s, m| match btf.member_offset(s, m) {
            Ok(off) => panic!("{s}.{m} resolved to {off}, expected an error"),
            Err(e) => e,
        };
        assert!(matches!(
            err("outer", "flags3"),
            BtfError::Bitfield { bits: 3, .. }
        ));
        assert!(matches!(
            err("legacy", "bit"),
            BtfError::Bitfield { bits: 1, .. }
        ));
        assert!(matches!(
            err("outer", "odd"),
            BtfError::Unaligned {
                bit_offset: 131,
                ..
            }
        ));
        let missing = err("outer", "nope");
        assert!(matches!(missing, BtfError::MemberNotFound { .. }));
        assert_eq!(missing.to_string(), "struct outer has no member `nope`");
        assert!(matches!(err("outer", ""), BtfError::MemberNotFound { .. }));
        assert!(matches!(
            err("nostruct", "x"),
            BtfError::StructNotFound { .. }
        ));
        // An enum is not a struct.
        assert!(matches!(
            err("colour", "RED"),
            BtfError::StructNotFound { .. }
        ));
        assert!(matches!(err("loop", "x"), BtfError::MemberNotFound { .. }));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let blob = synthetic();
        for len in 0..blob.len() {
            let cut = blob.get(..len).expect("len < blob.len()").to_vec();
            assert!(
                Btf::from_bytes(cut).is_err(),
                "truncated to {len} bytes parsed"
            );
        }
    }

    #[test]
    fn truncated_type_is_named() {
        let mut blob = synthetic();
        // Shrink type_len by one member so the last struct's members run out.
        let type_len = read_u32(&blob, 12).expect("header") - 4;
        blob.splice(12..16, type_len.to_le_bytes());
        let err = Btf::from_bytes(blob).expect_err("must fail");
        assert!(
            matches!(
                err,
                BtfError::TruncatedType {
                    kind: KIND_STRUCT,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("BTF type section is truncated at type #")
        );
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let blob = synthetic();
        for at in 0..blob.len() {
            let orig = blob.get(at).copied().expect("in range");
            for value in [
                0x00,
                0xff,
                0x80,
                0x01,
                0x7f,
                orig ^ 0x04,
                orig.wrapping_add(1),
            ] {
                let mut bad = blob.clone();
                if let Some(b) = bad.get_mut(at) {
                    *b = value;
                }
                if let Ok(btf) = Btf::from_bytes(bad) {
                    for (s, m) in [
                        ("outer", "target"),
                        ("outer", "x"),
                        ("legacy", "bit"),
                        ("loop", "x"),
                    ] {
                        let _ = btf.member_offset(s, m);
                    }
                    let _ = task_offsets(&btf);
                }
            }
        }
    }

    #[test]
    fn header_errors() {
        let mut swapped = synthetic();
        swapped.swap(0, 1);
        assert!(matches!(
            Btf::from_bytes(swapped),
            Err(BtfError::ByteSwapped)
        ));
        assert!(matches!(
            Btf::from_bytes(b"\x7fELF and so on and so forth".to_vec()),
            Err(BtfError::BadMagic { magic: 0x457f })
        ));
        let mut v2 = synthetic();
        if let Some(v) = v2.get_mut(2) {
            *v = 2;
        }
        assert!(matches!(
            Btf::from_bytes(v2),
            Err(BtfError::UnsupportedVersion { version: 2 })
        ));
        let mut unknown = Builder::new();
        unknown.ty("x", 31, false, 0, 0);
        assert!(matches!(
            Btf::from_bytes(unknown.finish()),
            Err(BtfError::UnknownKind { id: 1, kind: 31 })
        ));
        let err = Btf::from_file(Path::new("/nonexistent/btf")).expect_err("must fail");
        assert!(
            err.to_string()
                .starts_with("reading BTF from /nonexistent/btf: "),
            "{err}"
        );
    }

    fn vmlinux() -> Btf {
        Btf::from_file(Path::new(VMLINUX))
            .unwrap_or_else(|e| panic!("these tests need the running kernel's BTF: {e}"))
    }

    #[test]
    fn real_kernel_task_offsets_are_plausible() {
        let btf = vmlinux();
        let o = task_offsets(&btf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.valid, 1);
        let task = [
            o.task_pid,
            o.task_tgid,
            o.task_flags,
            o.task_start_boottime,
            o.task_group_leader,
            o.task_real_parent,
            o.task_signal,
        ];
        for (i, a) in task.iter().enumerate() {
            assert!(
                *a < 16384,
                "task_struct offset {a} is implausibly large: {o:?}"
            );
            for b in task.iter().skip(i + 1) {
                assert_ne!(a, b, "two task_struct members share an offset: {o:?}");
            }
        }
        // pid and tgid are adjacent pid_t fields in every mainline kernel.
        assert_eq!(o.task_pid + 4, o.task_tgid, "{o:?}");
        // Pointers and u64s are 8-byte aligned on 64-bit kernels.
        for ptr in [
            o.task_group_leader,
            o.task_real_parent,
            o.task_signal,
            o.task_start_boottime,
        ] {
            assert_eq!(ptr % 8, 0, "{o:?}");
        }
        assert!(o.signal_live < 4096 && o.binprm_filename < 4096, "{o:?}");
        assert_eq!(o.binprm_filename % 8, 0, "{o:?}");
        // env_end follows env_start (both unsigned long) in mm_struct's anonymous struct.
        assert_eq!(o.mm_env_start + 8, o.mm_env_end, "{o:?}");
        assert_eq!(o.task_mm % 8, 0, "{o:?}");
    }

    /// Non-bitfield members of the first sized `STRUCT 'name'` in `bpftool ... format raw`
    /// output, as (name, bits_offset).
    fn bpftool_members(dump: &str, name: &str) -> Vec<(String, u64)> {
        let header = format!("STRUCT '{name}' size=");
        let mut lines = dump
            .lines()
            .skip_while(|l| !(l.starts_with('[') && l.contains(&header) && !l.contains("size=0 ")));
        assert!(
            lines.next().is_some(),
            "bpftool dump has no STRUCT '{name}'"
        );
        let mut members = Vec::new();
        for line in lines.take_while(|l| l.starts_with('\t')) {
            // \t'name' type_id=N bits_offset=M[ bitfield_size=K]
            let mut quoted = line.trim().split('\'');
            let member = quoted.nth(1).unwrap_or_default();
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let bits = field("bits_offset=")
                .unwrap_or_else(|| panic!("no bits_offset in bpftool line {line:?}"));
            if !member.is_empty() && field("bitfield_size=").unwrap_or(0) == 0 {
                members.push((member.to_owned(), bits));
            }
        }
        members
    }

    #[test]
    fn real_kernel_offsets_match_bpftool() {
        let btf = vmlinux();
        let out = ["bpftool", "/usr/sbin/bpftool"]
            .iter()
            .find_map(|bin| {
                std::process::Command::new(bin)
                    .args(["btf", "dump", "file", VMLINUX, "format", "raw"])
                    .output()
                    .ok()
            })
            .unwrap_or_else(|| {
                panic!(
                    "this test needs bpftool (apt-get install -y bpftool) to cross-check offsets"
                )
            });
        assert!(
            out.status.success(),
            "bpftool failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump = String::from_utf8_lossy(&out.stdout);

        let task = bpftool_members(&dump, "task_struct");
        let start_time = task
            .iter()
            .find(|(m, _)| m == "start_boottime")
            .map(|(_, bits)| *bits)
            .expect("bpftool shows task_struct.start_boottime");
        let offsets = task_offsets(&btf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u64::from(offsets.task_start_boottime) * 8, start_time);

        // Every directly named, non-bitfield member must agree, not just the ones we use.
        for (s, want_more) in [
            ("task_struct", 100),
            ("signal_struct", 10),
            ("linux_binprm", 5),
        ] {
            let members = bpftool_members(&dump, s);
            assert!(
                members.len() >= want_more,
                "{s}: only {} members",
                members.len()
            );
            for (m, bits) in members {
                if bits % 8 != 0 {
                    continue;
                }
                let ours = btf.member_offset(s, &m).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(u64::from(ours) * 8, bits, "{s}.{m}");
            }
        }
    }
}
