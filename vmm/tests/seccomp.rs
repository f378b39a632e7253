//! The seccomp filters do not get in the way of the real work: a thread
//! confined by the vCPU filter drives a virtio-net device through the guest
//! driver's bring-up (DRIVER_OK starts the device thread from the confined
//! thread, which then confines itself further) and exchanges an ARP request
//! and reply with the real user-mode network; and the same confined thread
//! is refused what a vCPU never needs.

mod fuzz_targets;

use osso_vmm::net::user::{UserNet, UserNetConfig, GATEWAY_IP, GATEWAY_MAC, GUEST_IP};
use osso_vmm::net::MacAddr;
use osso_vmm::seccomp::{apply_to_current_thread, ThreadKind};
use osso_vmm::virtio::{MmioTransport, NetDevice};

#[test]
fn virtio_net_works_from_a_vcpu_confined_thread() {
    let mac = MacAddr::DEFAULT_GUEST;
    let (backend, handle) = UserNet::start(UserNetConfig::default()).expect("user net");
    let mem = fuzz_targets::guest_ram();
    let mut dev = NetDevice::new(mac, Box::new(backend));
    dev.set_seccomp(true);
    let mut t = MmioTransport::new(dev, mem.clone()).expect("transport");
    let (reply, refused) = std::thread::spawn(move || {
        apply_to_current_thread(ThreadKind::Vcpu).expect("vCPU filter");
        let reply = fuzz_targets::bring_up_and_exchange(
            &mut t,
            &mem,
            &osso_testkit::frames::arp_request(mac.0, GUEST_IP, GATEWAY_IP),
        );
        // SAFETY: a plain socket(2) call; the result is only compared.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        let err = std::io::Error::last_os_error().raw_os_error();
        drop(t); // stops and joins the device thread from the confined thread
        (reply, (s, err))
    })
    .join()
    .expect("confined thread");
    let reply = reply.expect("an ARP reply came back through the confined device thread");
    assert_eq!(&reply[0..6], &mac.0, "to the guest");
    assert_eq!(&reply[6..12], &GATEWAY_MAC, "from the gateway");
    assert_eq!(&reply[12..14], &[0x08, 0x06], "ARP");
    assert_eq!(&reply[20..22], &[0, 2], "a reply");
    assert_eq!(
        refused,
        (-1, Some(libc::EPERM)),
        "socket refused on a vCPU thread"
    );
    assert!(handle.stats().frames_from_guest >= 1);
}
