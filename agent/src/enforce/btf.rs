//! Just enough of BTF (the kernel's own type information, /sys/kernel/btf/vmlinux) to find
//! where a struct field lives in the running kernel, so the programs read the right bytes
//! on any kernel version without CO-RE relocations.
//!
//! The file is read once at load ([`KernelBtf`]) for both readers that need it: aya (the
//! LSM programs' attach points) and this module's walk, which gives the field offsets aya
//! 0.14 does not expose (its BTF types are crate-private).

use std::collections::HashMap;
use usher_ebpf_common::Offsets;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("{VMLINUX}: {0} (the kernel has no BTF)")]
    Unreadable(#[source] std::io::Error),
    #[error("not little-endian BTF")]
    NotLittleEndian,
    #[error("BTF is truncated")]
    Truncated,
    #[error("BTF {0} section out of bounds")]
    SectionOutOfBounds(&'static str),
    #[error("the kernel's BTF as aya reads it: {0}")]
    Aya(#[source] aya::BtfError),
    #[error("no struct {0} in BTF")]
    NoStruct(String),
    #[error("no field {field} in struct {name}")]
    NoField { name: String, field: String },
}

/// The running kernel's BTF, read once, in the two forms the load needs.
pub struct KernelBtf {
    /// aya's parse: the attach points of the LSM programs. Without it only BPF-LSM is
    /// unavailable, so its failure is kept as the reason.
    pub aya: Result<aya::Btf, BtfError>,
    /// Where the programs find the kernel fields they read.
    pub offsets: Offsets,
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<KernelBtf, BtfError> {
        let data = std::fs::read(VMLINUX).map_err(BtfError::Unreadable)?;
        Ok(KernelBtf {
            offsets: Btf::parse(&data)?.offsets()?,
            aya: aya::Btf::parse(&data, aya::Endianness::default()).map_err(BtfError::Aya),
        })
    }
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset.
    offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    /// For modifiers and typedefs: the type referred to.
    ty: u32,
    members: Vec<Member>,
}

pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id (0 is void).
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Truncated)
}

impl Btf {
    #[cfg(test)]
    fn from_sys_fs() -> Result<Btf, BtfError> {
        Btf::parse(&std::fs::read(VMLINUX).map_err(BtfError::Unreadable)?)
    }

    fn parse(b: &[u8]) -> Result<Btf, BtfError> {
        if b.len() < 24 || b[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::NotLittleEndian);
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types_bytes = b
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::SectionOutOfBounds("type"))?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::SectionOutOfBounds("string"))?
            .to_vec();
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            ty: 0,
            members: vec![],
        }];
        let mut at = 0;
        while at < types_bytes.len() {
            let name = u32_at(types_bytes, at)?;
            let info = u32_at(types_bytes, at + 4)?;
            let size_or_type = u32_at(types_bytes, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => at += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let m_name = u32_at(types_bytes, at)?;
                        let m_ty = u32_at(types_bytes, at + 4)?;
                        let raw = u32_at(types_bytes, at + 8)?;
                        let offset = if kind_flag { raw & 0xff_ffff } else { raw };
                        members.push(Member {
                            name: m_name,
                            ty: m_ty,
                            offset,
                        });
                        at += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => at += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => at += 12 * vlen,
                _ => {}
            }
            types.push(Type {
                name,
                kind,
                ty: size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            strings,
            types,
            structs: HashMap::new(),
        };
        for id in 1..btf.types.len() {
            let t = &btf.types[id];
            if t.kind == KIND_STRUCT && t.name != 0 {
                let name = btf.name(t.name).to_string();
                btf.structs.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize).map(|t| t.kind) {
                Some(KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) => {
                    id = self.types[id as usize].ty
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `field` in `struct name`, looking through anonymous structs and
    /// unions (as the kernel nests many fields).
    fn field_offset(&self, name: &str, field: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))?;
        self.find_in(id, field)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoField {
                name: name.to_string(),
                field: field.to_string(),
            })
    }

    /// Every field the programs read (see `usher_ebpf_common::Offsets`).
    fn offsets(&self) -> Result<Offsets, BtfError> {
        Ok(Offsets {
            task_mm: self.field_offset("task_struct", "mm")?,
            task_real_parent: self.field_offset("task_struct", "real_parent")?,
            task_tgid: self.field_offset("task_struct", "tgid")?,
            mm_exe_file: self.field_offset("mm_struct", "exe_file")?,
            mm_arg_start: self.field_offset("mm_struct", "arg_start")?,
            mm_arg_end: self.field_offset("mm_struct", "arg_end")?,
            file_inode: self.field_offset("file", "f_inode")?,
            file_path_dentry: self.field_offset("file", "f_path")?
                + self.field_offset("path", "dentry")?,
            dentry_parent: self.field_offset("dentry", "d_parent")?,
            dentry_inode: self.field_offset("dentry", "d_inode")?,
            inode_ino: self.field_offset("inode", "i_ino")?,
            inode_sb: self.field_offset("inode", "i_sb")?,
            inode_nlink: self.field_offset("inode", "i_nlink")?,
            sb_dev: self.field_offset("super_block", "s_dev")?,
            binprm_file: self.field_offset("linux_binprm", "file")?,
            vma_file: self.field_offset("vm_area_struct", "vm_file")?,
            inode_mode: self.field_offset("inode", "i_mode")?,
            inode_uid: self.field_offset("inode", "i_uid")?,
            _pad: 0,
        })
    }

    fn find_in(&self, id: u32, field: &str) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        for m in &t.members {
            if m.name != 0 && self.name(m.name) == field {
                return Some(m.offset);
            }
        }
        for m in &t.members {
            if m.name == 0 {
                let inner = self.resolve(m.ty);
                let kind = self.types.get(inner as usize)?.kind;
                if kind == KIND_STRUCT || kind == KIND_UNION {
                    if let Some(off) = self.find_in(inner, field) {
                        return Some(m.offset + off);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_of_the_running_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else { return };
        let mm = btf.field_offset("task_struct", "mm").unwrap();
        let tgid = btf.field_offset("task_struct", "tgid").unwrap();
        assert_ne!(mm, tgid);
        // i_nlink lives in an anonymous union of struct inode.
        assert!(btf.field_offset("inode", "i_nlink").is_ok());
        assert!(btf.field_offset("mm_struct", "exe_file").is_ok());
        // The mapping hooks read these (vm_file, and the owner and mode of a library).
        assert!(btf.field_offset("vm_area_struct", "vm_file").is_ok());
        assert!(btf.field_offset("inode", "i_mode").is_ok());
        assert!(btf.field_offset("inode", "i_uid").is_ok());
        assert!(matches!(
            btf.field_offset("task_struct", "no_such_field"),
            Err(BtfError::NoField { .. })
        ));
        assert!(matches!(
            btf.field_offset("no_such_struct", "x"),
            Err(BtfError::NoStruct(_))
        ));
        // Every field the programs read is there, and the shared load agrees.
        let offsets = btf.offsets().unwrap();
        let kernel = KernelBtf::from_sys_fs().unwrap();
        assert_eq!(kernel.offsets, offsets);
        assert!(kernel.aya.is_ok());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(Btf::parse(b""), Err(BtfError::NotLittleEndian)));
        assert!(matches!(
            Btf::parse(&[
                0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ]),
            Err(BtfError::SectionOutOfBounds("type"))
        ));
    }
}
