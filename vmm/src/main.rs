//! `osso-vmm` command line: boots a kernel and initrd with a serial console.
fn main() {
    eprintln!("osso-vmm: not implemented yet");
    std::process::exit(2);
}
