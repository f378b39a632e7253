//! The boot GDT and the KVM segment registers derived from it.
//!
//! Layout (selector = index * 8): 0 and 0x08 null, 0x10 code, 0x18 data,
//! 0x20 TSS: the Linux 64-bit boot protocol asks for `__BOOT_CS` = 0x10 and
//! `__BOOT_DS` = 0x18; PVH leaves the selectors free. The code segment is
//! 64-bit (L=1) for the long-mode entry and 32-bit (D=1) for the PVH /
//! protected-mode entry; every segment is flat (base 0, 4 GiB).

use kvm_bindings::kvm_segment;

/// GDT index of the code segment.
pub const CODE_INDEX: u16 = 2;
/// GDT index of the data segment.
pub const DATA_INDEX: u16 = 3;
/// GDT index of the TSS.
pub const TSS_INDEX: u16 = 4;
/// Code segment selector (`__BOOT_CS`).
pub const CODE_SELECTOR: u16 = CODE_INDEX * 8;
/// Data segment selector (`__BOOT_DS`).
pub const DATA_SELECTOR: u16 = DATA_INDEX * 8;
/// TSS selector.
pub const TSS_SELECTOR: u16 = TSS_INDEX * 8;
/// Entries in the boot GDT.
pub const GDT_ENTRIES: usize = 5;

/// Builds a GDT descriptor from flags (the 0xF0FF mask of the access byte and
/// the G/DB/L/AVL nibble, as `0xGAxx`), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The 64-bit boot GDT: null, null, 64-bit code, data, TSS.
pub const GDT_64: [u64; GDT_ENTRIES] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The 32-bit boot GDT: null, null, 32-bit code, data, TSS.
pub const GDT_32: [u64; GDT_ENTRIES] = [
    0,
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

fn get_base(entry: u64) -> u64 {
    (((entry) & 0xff00_0000_0000_0000) >> 32)
        | (((entry) & 0x0000_00ff_0000_0000) >> 16)
        | (((entry) & 0x0000_0000_ffff_0000) >> 16)
}

fn get_limit(entry: u64) -> u32 {
    let limit =
        ((((entry) & 0x000f_0000_0000_0000) >> 32) | ((entry) & 0x0000_0000_0000_ffff)) as u32;
    // With G=1 the limit counts 4 KiB pages.
    if get_bit(entry, 55) != 0 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

fn get_bit(entry: u64, bit: u32) -> u8 {
    ((entry >> bit) & 1) as u8
}

/// The KVM segment register a descriptor loads, for the given table index.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    kvm_segment {
        base: get_base(entry),
        limit: get_limit(entry),
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: get_bit(entry, 47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: get_bit(entry, 54),
        s: get_bit(entry, 44),
        l: get_bit(entry, 53),
        g: get_bit(entry, 55),
        avl: get_bit(entry, 52),
        unusable: if get_bit(entry, 47) == 0 { 1 } else { 0 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_flat_segments() {
        // Well-known encodings of flat segments.
        assert_eq!(GDT_64[0], 0);
        assert_eq!(GDT_64[1], 0);
        assert_eq!(GDT_64[2], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_64[3], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT_32[2], 0x00cf_9b00_0000_ffff);
        assert_eq!(GDT_64[4], 0x008f_8b00_0000_ffff);
        assert_eq!(
            (CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR),
            (0x10, 0x18, 0x20)
        );
    }

    #[test]
    fn segments_decode() {
        let cs = segment_from_gdt(GDT_64[2], CODE_INDEX);
        assert_eq!(cs.selector, CODE_SELECTOR);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        assert_eq!(
            (cs.type_, cs.present, cs.s, cs.l, cs.db, cs.g, cs.dpl),
            (0xb, 1, 1, 1, 0, 1, 0)
        );
        let cs32 = segment_from_gdt(GDT_32[2], CODE_INDEX);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let ds = segment_from_gdt(GDT_64[3], DATA_INDEX);
        assert_eq!(
            (ds.selector, ds.type_, ds.db, ds.unusable),
            (DATA_SELECTOR, 3, 1, 0)
        );
        let tss = segment_from_gdt(GDT_64[4], TSS_INDEX);
        assert_eq!(
            (tss.selector, tss.type_, tss.s, tss.present),
            (TSS_SELECTOR, 0xb, 0, 1)
        );
        let odd = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0xabcd), 5);
        assert_eq!(
            (odd.base, odd.limit, odd.g, odd.selector),
            (0x1234_5678, 0xabcd, 0, 40)
        );
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }
}
