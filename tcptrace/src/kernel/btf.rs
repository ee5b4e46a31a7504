//! Struct member offsets from the kernel's own BTF (`/sys/kernel/btf/vmlinux`), for the few
//! fields the programs read beyond a tracepoint's record. Rust eBPF emits no CO-RE relocations,
//! so the offsets are found here at start-up and handed to the programs as read-only data, the
//! way tracefs offsets are.
//!
//! Only what is needed is parsed: the type section's records, to find a struct by name and a
//! member's byte offset. The format is the kernel's `Documentation/bpf/btf.rst`.

use std::collections::HashMap;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

// BTF kinds (the `info` word's bits 24..28).
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// Why BTF offsets could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {VMLINUX} (a kernel built with CONFIG_DEBUG_INFO_BTF has it)")]
    Read(#[source] std::io::Error),
    #[error("{VMLINUX} is not BTF this parser understands: {0}")]
    Malformed(&'static str),
    #[error("BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("BTF struct `{0}` has no member `{1}`")]
    NoMember(String, String),
    #[error("BTF member `{0}.{1}` is not a whole integer of 1, 2, 4 or 8 bytes")]
    NotAnInteger(String, String),
}

/// One member of a struct or union.
#[derive(Clone, Debug, Default)]
struct Member {
    /// Offset of the name in the string section (names are not copied: vmlinux has hundreds of
    /// thousands of members, and a String each made the start-up's peak memory).
    name: u32,
    /// Offset in bits from the start of the composite.
    bit_off: u32,
    ty: u32,
    /// Size in bits when it is a bitfield, else 0.
    bitfield: u32,
}

/// One struct or union: its members.
#[derive(Clone, Debug, Default)]
struct Composite {
    members: Vec<Member>,
}

/// The structs and unions of a BTF blob, by name (the first of a name wins) and by type id.
pub struct Btf {
    /// The string section.
    strings: Vec<u8>,
    by_name: HashMap<String, u32>,
    by_id: HashMap<u32, Composite>,
    /// typedefs and qualifiers: id -> the type they name.
    aliases: HashMap<u32, u32>,
    /// Integer types: id -> size in bytes.
    ints: HashMap<u32, u32>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn str_at(strings: &[u8], off: u32) -> Option<&str> {
    let s = strings.get(off as usize..)?;
    let end = s.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&s[..end]).ok()
}

impl Btf {
    pub fn from_sys() -> Result<Btf, BtfError> {
        let data = std::fs::read(VMLINUX).map_err(BtfError::Read)?;
        Btf::parse(&data)
    }

    /// Parses a little-endian BTF blob (the byte order of every kernel tcptrace runs on).
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let bad = BtfError::Malformed;
        if u16_at(data, 0) != Some(MAGIC) {
            return Err(bad("bad magic (or a big-endian kernel)"));
        }
        let hdr_len = u32_at(data, 4).ok_or(bad("short header"))? as usize;
        let field = |i: usize| u32_at(data, 8 + 4 * i).map(|v| v as usize);
        let (type_off, type_len, str_off, str_len) = match (field(0), field(1), field(2), field(3))
        {
            (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
            _ => return Err(bad("short header")),
        };
        let types = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(bad("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(bad("string section out of bounds"))?;
        let mut by_name = HashMap::new();
        let mut by_id = HashMap::new();
        let mut aliases = HashMap::new();
        let mut ints = HashMap::new();
        let mut at = 0;
        let mut id = 1u32;
        while at < types.len() {
            let (Some(name_off), Some(info)) = (u32_at(types, at), u32_at(types, at + 4)) else {
                return Err(bad("truncated type"));
            };
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let head = 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                0..=19 => 0,
                _ => return Err(bad("unknown type kind")),
            };
            if matches!(kind, KIND_STRUCT | KIND_UNION) {
                let mut c = Composite::default();
                for m in 0..vlen {
                    let base = at + head + 12 * m;
                    let (Some(m_name), Some(m_type), Some(m_off)) = (
                        u32_at(types, base),
                        u32_at(types, base + 4),
                        u32_at(types, base + 8),
                    ) else {
                        return Err(bad("truncated member"));
                    };
                    // With kind_flag the low 24 bits are the bit offset, the high 8 the size of
                    // a bitfield.
                    let (bit_off, bitfield) = if kind_flag {
                        (m_off & 0xff_ffff, m_off >> 24)
                    } else {
                        (m_off, 0)
                    };
                    c.members.push(Member {
                        name: m_name,
                        bit_off,
                        ty: m_type,
                        bitfield,
                    });
                }
                if let Some(name) = str_at(strings, name_off).filter(|n| !n.is_empty()) {
                    by_name.entry(name.to_string()).or_insert(id);
                }
                by_id.insert(id, c);
            }
            if kind == KIND_INT
                && let Some(size) = u32_at(types, at + 8)
            {
                ints.insert(id, size);
            }
            if matches!(
                kind,
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
            ) && let Some(target) = u32_at(types, at + 8)
            {
                aliases.insert(id, target);
            }
            at += head + extra;
            id += 1;
        }
        Ok(Btf {
            strings: strings.to_vec(),
            by_name,
            by_id,
            aliases,
            ints,
        })
    }

    /// Byte offset of `path` (members separated by dots, through nested structs and unions,
    /// anonymous ones included) inside struct `name`.
    pub fn offset_of(&self, name: &str, path: &str) -> Result<u32, BtfError> {
        Ok(self.member(name, path)?.0 / 8)
    }

    /// Byte offset and size of the integer member `path` of struct `name`; a bitfield counts
    /// when it is whole bytes on a byte boundary (read as an integer of that size).
    pub fn integer_member(&self, name: &str, path: &str) -> Result<(u32, u32), BtfError> {
        let (bit_off, m) = self.member(name, path)?;
        let size = match m.bitfield {
            0 => self.ints.get(&self.resolve(m.ty)).copied().unwrap_or(0),
            bits if bits % 8 == 0 && bit_off % 8 == 0 => bits / 8,
            _ => 0,
        };
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(BtfError::NotAnInteger(name.into(), path.into()));
        }
        Ok((bit_off / 8, size))
    }

    /// The member at `path` inside struct `name`, with its offset in bits from the struct's start.
    fn member(&self, name: &str, path: &str) -> Result<(u32, Member), BtfError> {
        let mut id = *self
            .by_name
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.into()))?;
        let mut total = 0;
        let mut last = None;
        for part in path.split('.') {
            let (off, m) = self
                .find_member(id, part)
                .ok_or_else(|| BtfError::NoMember(name.into(), path.into()))?;
            total += off;
            id = self.resolve(m.ty);
            last = Some(m);
        }
        let m = last.ok_or_else(|| BtfError::NoMember(name.into(), path.into()))?;
        Ok((total, m))
    }

    /// A member by name in the composite `id`, looking into anonymous members; returns its
    /// offset in bits and the member.
    fn find_member(&self, id: u32, member: &str) -> Option<(u32, Member)> {
        let c = self.by_id.get(&id)?;
        let name = |m: &Member| str_at(&self.strings, m.name).unwrap_or("");
        if let Some(m) = c.members.iter().find(|m| name(m) == member) {
            return Some((m.bit_off, m.clone()));
        }
        for m in c.members.iter().filter(|m| name(m).is_empty()) {
            if let Some((o, found)) = self.find_member(self.resolve(m.ty), member) {
                return Some((m.bit_off + o, found));
            }
        }
        None
    }

    /// The type a type id names, through typedefs and qualifiers.
    fn resolve(&self, mut ty: u32) -> u32 {
        for _ in 0..32 {
            match self.aliases.get(&ty) {
                Some(&t) => ty = t,
                None => break,
            }
        }
        ty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made blob: struct outer { int a; struct { int b; }; struct inner c; } with
    /// struct inner { int x; int y; }.
    fn blob() -> Vec<u8> {
        let mut strings = b"\0int\0outer\0a\0b\0c\0inner\0x\0y\0".to_vec();
        let off = |s: &str| {
            let hay = &strings;
            let needle = [s.as_bytes(), b"\0"].concat();
            (hay.windows(needle.len())
                .position(|w| w == needle.as_slice())
                .unwrap()) as u32
        };
        let (int, outer, a, b, c, inner, x, y) = (
            off("int"),
            off("outer"),
            off("a"),
            off("b"),
            off("c"),
            off("inner"),
            off("x"),
            off("y"),
        );
        let mut t = Vec::new();
        let mut put = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // 1: int
        put(int);
        put(KIND_INT << 24);
        put(4);
        put(32);
        // 2: anonymous struct { int b; }
        put(0);
        put((KIND_STRUCT << 24) | 1);
        put(4);
        put(b);
        put(1);
        put(0);
        // 3: struct inner { int x; int y; }
        put(inner);
        put((KIND_STRUCT << 24) | 2);
        put(8);
        put(x);
        put(1);
        put(0);
        put(y);
        put(1);
        put(32);
        // 4: struct outer { int a; <anon> ; struct inner c; }
        put(outer);
        put((KIND_STRUCT << 24) | 3);
        put(16);
        put(a);
        put(1);
        put(0);
        put(0);
        put(2);
        put(32);
        put(c);
        put(3);
        put(64);
        let mut d = Vec::new();
        d.extend_from_slice(&MAGIC.to_le_bytes());
        d.push(1);
        d.push(0);
        d.extend_from_slice(&24u32.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes());
        d.extend_from_slice(&(t.len() as u32).to_le_bytes());
        d.extend_from_slice(&(t.len() as u32).to_le_bytes());
        d.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        d.extend_from_slice(&t);
        d.append(&mut strings);
        d
    }

    #[test]
    fn members_nested_and_anonymous() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset_of("outer", "a").unwrap(), 0);
        assert_eq!(btf.offset_of("outer", "b").unwrap(), 4);
        assert_eq!(btf.offset_of("outer", "c.y").unwrap(), 12);
        assert_eq!(btf.integer_member("outer", "c.y").unwrap(), (12, 4));
        assert!(matches!(
            btf.offset_of("outer", "z"),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.offset_of("nope", "a"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(Btf::parse(&[0, 1, 2]).is_err());
    }

    #[test]
    fn this_kernel_has_the_network_namespace_fields() {
        // Every kernel tcptrace supports (5.8+ with BTF) has these; this machine's too.
        let btf = Btf::from_sys().expect("this kernel has BTF");
        let skc_net = btf.offset_of("sock_common", "skc_net.net").unwrap();
        let inum = btf.offset_of("net", "ns.inum").unwrap();
        assert!(skc_net > 0 && skc_net < 256, "{skc_net}");
        assert!(inum < 4096, "{inum}");
    }

    #[test]
    fn this_kernel_gives_the_raw_state_program_its_socket_layout() {
        let btf = Btf::from_sys().expect("this kernel has BTF");
        let s = crate::kernel::offsets::sock_offsets(&btf).expect("usable sock offsets");
        // The start of struct sock_common has kept this layout since Linux 4.x on 64-bit.
        assert_eq!(
            (s.daddr, s.rcv_saddr, s.dport, s.num, s.family),
            (0, 4, 12, 14, 16)
        );
        assert_eq!(s.protocol_size, 2, "sk_protocol is a u16 since Linux 5.6");
        assert_eq!(
            btf.integer_member("sock", "sk_protocol").unwrap(),
            (s.protocol as u32, 2)
        );
        assert!(matches!(
            btf.integer_member("sock", "__sk_common"),
            Err(BtfError::NotAnInteger(..))
        ));
    }
}
