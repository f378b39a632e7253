//! Minimal x86-64 ELF executables for loader tests and tiny guests: an ELF
//! header, a PT_LOAD of the code (entry at its first byte), and a PT_NOTE
//! when there are notes (the Xen PVH entry note is what the boot code looks
//! for). One builder for every crate's tests.

const EHSIZE: usize = 64;
const PHSIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// The note type of the PVH 32-bit entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// One ELF note: name and descriptor, each padded to 4 bytes.
pub fn note(name: &[u8], ntype: u32, desc: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&(name.len() as u32).to_le_bytes());
    n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    n.extend_from_slice(&ntype.to_le_bytes());
    n.extend_from_slice(name);
    n.resize(n.len().div_ceil(4) * 4, 0);
    n.extend_from_slice(desc);
    n.resize(n.len().div_ceil(4) * 4, 0);
    n
}

/// The Xen PVH entry note: enter at `entry` in 32-bit protected mode.
pub fn pvh_note(entry: u32) -> Vec<u8> {
    note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &entry.to_le_bytes())
}

/// An executable whose one PT_LOAD puts `code` at `paddr` (`memsz` bytes
/// in memory, at least the code's), entered at `paddr`, with a PT_NOTE
/// holding `notes` if there are any.
pub fn exec(paddr: u64, code: &[u8], memsz: u64, notes: &[u8]) -> Vec<u8> {
    build(
        paddr,
        Some((paddr, code, memsz.max(code.len() as u64))),
        (PT_NOTE, notes),
    )
}

/// An executable with only a PT_NOTE holding `notes` (for note parsers).
pub fn notes_only(notes: &[u8]) -> Vec<u8> {
    build(0, None, (PT_NOTE, notes))
}

/// A dynamically linked executable: one PT_INTERP naming `interpreter`
/// (for checks that refuse such programs).
pub fn dynamic(interpreter: &str) -> Vec<u8> {
    let mut path = interpreter.as_bytes().to_vec();
    path.push(0);
    build(0, None, (PT_INTERP, &path))
}

/// `extra`: a segment of another type (PT_NOTE, PT_INTERP) and its bytes,
/// placed after the program headers; none when the bytes are empty.
fn build(entry: u64, load: Option<(u64, &[u8], u64)>, extra: (u32, &[u8])) -> Vec<u8> {
    let (extra_type, notes) = extra;
    let phnum = usize::from(load.is_some()) + usize::from(!notes.is_empty());
    let note_off = EHSIZE + phnum * PHSIZE;
    let code_off = (note_off + notes.len()).next_multiple_of(16);
    let mut e = vec![0u8; code_off];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELFCLASS64
    e[5] = 1; // little-endian
    e[6] = 1; // ELF version
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&entry.to_le_bytes());
    e[32..40].copy_from_slice(&(EHSIZE as u64).to_le_bytes()); // e_phoff
    e[52..54].copy_from_slice(&(EHSIZE as u16).to_le_bytes());
    e[54..56].copy_from_slice(&(PHSIZE as u16).to_le_bytes());
    e[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
    let mut ph =
        |i: usize, ptype: u32, flags: u32, off: usize, addr: u64, filesz: u64, memsz: u64| {
            // Notes are 4-byte aligned (as Linux's are); code by 16.
            let align: u64 = if ptype == PT_LOAD { 16 } else { 4 };
            let p = EHSIZE + i * PHSIZE;
            e[p..p + 4].copy_from_slice(&ptype.to_le_bytes());
            e[p + 4..p + 8].copy_from_slice(&flags.to_le_bytes());
            e[p + 8..p + 16].copy_from_slice(&(off as u64).to_le_bytes());
            e[p + 16..p + 24].copy_from_slice(&addr.to_le_bytes()); // vaddr
            e[p + 24..p + 32].copy_from_slice(&addr.to_le_bytes()); // paddr
            e[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
            e[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
            e[p + 48..p + 56].copy_from_slice(&align.to_le_bytes());
        };
    let mut i = 0;
    if let Some((paddr, code, memsz)) = load {
        ph(i, PT_LOAD, 5, code_off, paddr, code.len() as u64, memsz); // R+X
        i += 1;
    }
    if !notes.is_empty() {
        ph(
            i,
            extra_type,
            4,
            note_off,
            0,
            notes.len() as u64,
            notes.len() as u64,
        );
    }
    e[note_off..note_off + notes.len()].copy_from_slice(notes);
    if let Some((_, code, _)) = load {
        e.extend_from_slice(code);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(e: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([e[o], e[o + 1]])
    }
    fn u64_at(e: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(e[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn an_executable_has_its_load_and_note_where_its_headers_say() {
        let code = [0xf4u8; 10];
        let e = exec(0x10_0000, &code, 0x1000, &pvh_note(0x10_0000));
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(u64_at(&e, 24), 0x10_0000, "entry");
        assert_eq!(u16_at(&e, 56), 2, "PT_LOAD and PT_NOTE");
        let load = EHSIZE;
        let off = u64_at(&e, load + 8) as usize;
        assert_eq!(&e[off..off + code.len()], &code);
        assert_eq!(u64_at(&e, load + 24), 0x10_0000);
        assert_eq!(u64_at(&e, load + 40), 0x1000, "memsz");
        let n = EHSIZE + PHSIZE;
        let noff = u64_at(&e, n + 8) as usize;
        assert_eq!(&e[noff + 12..noff + 16], b"Xen\0");
        assert_eq!(&e[noff + 16..noff + 20], &0x10_0000u32.to_le_bytes());
    }

    #[test]
    fn notes_are_padded_and_a_notes_only_file_has_one_header() {
        assert_eq!(note(b"GNU\0", 3, &[1, 2, 3]).len(), 12 + 4 + 4);
        let e = notes_only(&pvh_note(7));
        assert_eq!(u16_at(&e, 56), 1);
        assert_eq!(u64_at(&e, EHSIZE + 32), 20, "filesz of the note");
    }
}
