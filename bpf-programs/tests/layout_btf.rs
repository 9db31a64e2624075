//! Alignment check (as Cilium's alignchecker): every `#[repr(C)]` mirror in
//! `ballast_bpf::layout` must have the size and field offsets of its C struct, read from the
//! BTF of the compiled object. Drift between `c/ballast.h` and Rust fails here.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use object::{Object, ObjectSection};

struct Member {
    name: String,
    offset_bytes: usize,
}

/// Structs of a raw BTF blob: name -> (size, members). A small parser of the BTF format
/// (kernel Documentation/bpf/btf.rst), little-endian.
fn btf_structs(btf: &[u8]) -> HashMap<String, (usize, Vec<Member>)> {
    let u16_at = |o: usize| u16::from_le_bytes([btf[o], btf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(btf[o..o + 4].try_into().unwrap());
    assert_eq!(u16_at(0), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(4) as usize;
    let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
    let str_off = u32_at(16) as usize;
    let strs = hdr_len + str_off;
    let name = |off: u32| {
        let start = strs + off as usize;
        let end = start + btf[start..].iter().position(|&b| b == 0).unwrap();
        String::from_utf8_lossy(&btf[start..end]).into_owned()
    };
    let mut out = HashMap::new();
    let mut p = hdr_len + type_off;
    let end = p + type_len;
    while p < end {
        let (name_off, info, size) = (u32_at(p), u32_at(p + 4), u32_at(p + 8));
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kflag = info >> 31 == 1;
        p += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            4 | 5 | 15 | 19 => 12 * vlen,
            6 | 13 => 8 * vlen,
            _ => 0,
        };
        if kind == 4 {
            let members = (0..vlen)
                .map(|i| {
                    let m = p + 12 * i;
                    let bits = u32_at(m + 8);
                    let bits = if kflag { bits & 0x00ff_ffff } else { bits };
                    Member {
                        name: name(u32_at(m)),
                        offset_bytes: (bits / 8) as usize,
                    }
                })
                .collect();
            out.insert(name(name_off), (size as usize, members));
        }
        p += extra;
    }
    out
}

#[test]
fn layout_matches_btf() {
    let obj = object::File::parse(ballast_bpf::BPF_OBJECT).unwrap();
    let btf = obj
        .section_by_name(".BTF")
        .expect("object has .BTF (built with -g)");
    let structs = btf_structs(btf.data().unwrap());
    let mut checked = 0;
    for (c_name, size, fields) in ballast_bpf::layout::mirrors() {
        let (c_size, members) = structs
            .get(c_name)
            .unwrap_or_else(|| panic!("struct {c_name} not in the object's BTF"));
        assert_eq!(size, *c_size, "size of {c_name}: Rust {size}, C {c_size}");
        assert_eq!(fields.len(), members.len(), "field count of {c_name}");
        for (field, off) in fields {
            let m = members
                .iter()
                .find(|m| m.name == field)
                .unwrap_or_else(|| panic!("{c_name}.{field} not in C"));
            assert_eq!(
                off, m.offset_bytes,
                "offset of {c_name}.{field}: Rust {off}, C {}",
                m.offset_bytes
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 14);
}
