//! With no image built and none named, `spawn` (and `run`, `prepare_image`)
//! fail at once with `Error::NoImage`, which names what builds the image, and
//! start no build. Its own test binary: it points `OSSO_CACHE_DIR` at an
//! empty directory for the whole process.

#[test]
fn spawn_without_an_image_fails_at_once_naming_the_build() {
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("OSSO_CACHE_DIR", cache.path());
    std::env::remove_var(osso_sdk::IMAGE_DIR_ENV);
    let config = osso_sdk::Config::builder().mem_mib(64).build();

    let e = match osso_sdk::spawn(config.clone()) {
        Ok(_) => panic!("spawn without an image booted a VM"),
        Err(e) => e,
    };
    assert!(
        matches!(&e, osso_sdk::Error::NoImage { cache: c } if c == cache.path()),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("osso-guest") && msg.contains("build_image"),
        "{msg}"
    );
    assert!(matches!(
        osso_sdk::prepare_image(&config),
        Err(osso_sdk::Error::NoImage { .. })
    ));
    // run() fails too: NoImage, or first the host's reason (a PVM host
    // refuses jobs before it looks for an image).
    match osso_sdk::run(osso_sdk::Job::new("true")) {
        Err(osso_sdk::Error::NoImage { .. }) | Err(osso_sdk::Error::NoGuestUserSpace) => {}
        other => panic!("run without an image: {other:?}"),
    }
    // Nothing was built or fetched into the cache: no build was started.
    let left: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.iter()
            .all(|n| n != "build" && n != "src" && n != "images"),
        "{left:?}"
    );
}
