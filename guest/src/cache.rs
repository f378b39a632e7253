//! The build cache: where artifacts live and the keys that name them.
//!
//! Layout under the cache root (`$OSSO_CACHE_DIR`, else `~/.cache/osso`):
//!
//! ```text
//! downloads/           source tarballs fetched by the builder
//! src/linux-<key>/     an extracted, patched kernel tree (key: source + patches)
//! build/kernel-<key>/  the kernel's out-of-tree build (key: tree + config + builder)
//! build/toybox-<key>/  an extracted, configured, built Toybox tree
//! images/<key>/        a finished image: vmlinux, bzImage, initramfs.cpio.gz, manifest.json
//! file-ids.json        memoised sha256 of large source files, by path, size and mtime
//! ```
//!
//! Every key is a sha256 over tagged, length-prefixed fields ([`KeyHasher`]), so
//! changing any one input changes the key, and no two inputs can run together.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

/// Bumped whenever the builder's output for the same inputs would change.
pub const BUILDER_FORMAT_VERSION: u32 = 1;

/// The cache root: `$OSSO_CACHE_DIR`, else the user's cache directory + `osso`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("OSSO_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(|| std::env::temp_dir().join(".cache"))
        .join("osso")
}

/// Builds a cache key from tagged fields.
#[derive(Clone)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    /// A hasher for keys of one kind (`domain` keeps kinds apart).
    pub fn new(domain: &str) -> Self {
        let mut h = KeyHasher(Sha256::new());
        h.field("domain", domain.as_bytes());
        h.field("builder-format", &BUILDER_FORMAT_VERSION.to_le_bytes());
        h
    }

    /// Adds one named field; the name and the value are length-prefixed.
    pub fn field(&mut self, name: &str, value: &[u8]) -> &mut Self {
        for part in [name.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    /// The key, as 16 hex digits (64 bits: plenty for a local cache's names).
    pub fn finish(&self) -> String {
        let digest = self.0.clone().finalize();
        hex::encode(&digest[..8])
    }
}

/// Every input of an image, as the keys see them.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The kernel source's identity (tarball sha256, or path + version).
    pub kernel_source: &'a str,
    /// The kernel patches: (name, contents), in order.
    pub patches: &'a [(&'a str, &'a str)],
    pub kernel_fragment: &'a str,
    pub toybox_source: &'a str,
    pub toybox_fragment: &'a str,
    pub init: &'a str,
    /// The initramfs layout version.
    pub layout: u32,
}

/// The cache keys derived from [`Inputs`]; each covers everything its artifact depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// The unpacked, patched kernel tree.
    pub kernel_tree: String,
    /// The configured, built kernel.
    pub kernel_build: String,
    /// Toybox, built against the kernel tree's headers.
    pub toybox: String,
    /// The finished image.
    pub image: String,
}

impl Inputs<'_> {
    pub fn keys(&self) -> Keys {
        let mut tree = KeyHasher::new("kernel-tree");
        tree.field("source", self.kernel_source.as_bytes());
        for (name, body) in self.patches {
            tree.field(name, body.as_bytes());
        }
        let kernel_tree = tree.finish();
        let kernel_build = KeyHasher::new("kernel-build")
            .field("tree", kernel_tree.as_bytes())
            .field("fragment", self.kernel_fragment.as_bytes())
            .finish();
        let toybox = KeyHasher::new("toybox")
            .field("source", self.toybox_source.as_bytes())
            .field("fragment", self.toybox_fragment.as_bytes())
            .field("kernel-headers", kernel_tree.as_bytes())
            .field("cc", b"musl-gcc -Os --static")
            .finish();
        let image = KeyHasher::new("image")
            .field("kernel", kernel_build.as_bytes())
            .field("toybox", toybox.as_bytes())
            .field("init", self.init.as_bytes())
            .field("layout", &self.layout.to_le_bytes())
            .finish();
        Keys {
            kernel_tree,
            kernel_build,
            toybox,
            image,
        }
    }
}

/// The sha256 of a file's contents, as hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The sha256 of bytes, as hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The sha256 of a large file, memoised in `file-ids.json` by path, size and
/// modification time: hashing the 150 MB kernel tarball on every warm build
/// would cost most of a second.
pub fn file_identity(root: &Path, path: &Path) -> io::Result<String> {
    let meta = fs::metadata(path)?;
    let mtime = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let canonical = fs::canonicalize(path)?;
    let memo_key = format!("{}|{}|{}", canonical.display(), meta.len(), mtime);
    let memo_path = root.join("file-ids.json");
    let mut memo: BTreeMap<String, String> = fs::read(&memo_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(hash) = memo.get(&memo_key) {
        return Ok(hash.clone());
    }
    let hash = sha256_file(path)?;
    memo.insert(memo_key, hash.clone());
    fs::create_dir_all(root)?;
    // A lost memo only costs a re-hash, so a failure to write it is not an error.
    if let Ok(bytes) = serde_json::to_vec_pretty(&memo) {
        let tmp = memo_path.with_extension("json.tmp");
        if fs::write(&tmp, bytes).is_ok() {
            let _ = fs::rename(&tmp, &memo_path);
        }
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_key() {
        let base = || {
            let mut h = KeyHasher::new("image");
            h.field("a", b"1").field("b", b"2");
            h
        };
        let k = base().finish();
        assert_eq!(k, base().finish(), "same inputs, same key");
        let mut h = KeyHasher::new("image");
        h.field("a", b"1").field("b", b"3");
        assert_ne!(k, h.finish());
        let mut h = KeyHasher::new("other");
        h.field("a", b"1").field("b", b"2");
        assert_ne!(k, h.finish(), "domain is part of the key");
        // Length prefixes keep "ab"+"c" apart from "a"+"bc".
        let mut x = KeyHasher::new("d");
        x.field("f", b"ab").field("g", b"c");
        let mut y = KeyHasher::new("d");
        y.field("f", b"a").field("g", b"bc");
        assert_ne!(x.finish(), y.finish());
    }

    #[test]
    fn changing_any_one_input_changes_the_image_key() {
        let patches = [("p1", "a"), ("p2", "b")];
        let base = Inputs {
            kernel_source: "k",
            patches: &patches,
            kernel_fragment: "CONFIG_A=y",
            toybox_source: "t",
            toybox_fragment: "CONFIG_SH=y",
            init: "#!/bin/sh",
            layout: 1,
        };
        let k = base.keys();
        assert_eq!(k, base.keys());
        let other_patch = [("p1", "a"), ("p2", "c")];
        let renamed_patch = [("p1", "a"), ("p3", "b")];
        let fewer_patches = [("p1", "a")];
        let variants = [
            Inputs {
                kernel_source: "k2",
                ..base
            },
            Inputs {
                patches: &other_patch,
                ..base
            },
            Inputs {
                patches: &renamed_patch,
                ..base
            },
            Inputs {
                patches: &fewer_patches,
                ..base
            },
            Inputs {
                kernel_fragment: "CONFIG_A=n",
                ..base
            },
            Inputs {
                toybox_source: "t2",
                ..base
            },
            Inputs {
                toybox_fragment: "CONFIG_LS=y",
                ..base
            },
            Inputs {
                init: "#!/bin/sh\n",
                ..base
            },
            Inputs { layout: 2, ..base },
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(v.keys().image, k.image, "variant {i} kept the image key");
        }
        // Narrower keys move only with their own inputs: the init script does not
        // rebuild the kernel, the kernel fragment does not rebuild Toybox.
        assert_eq!(variants[7].keys().kernel_build, k.kernel_build);
        assert_eq!(variants[4].keys().toybox, k.toybox);
        assert_ne!(
            variants[1].keys().toybox,
            k.toybox,
            "patched headers rebuild Toybox"
        );
    }

    #[test]
    fn file_identity_is_memoised_and_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("src.tar");
        fs::write(&f, b"hello").unwrap();
        let id = file_identity(dir.path(), &f).unwrap();
        assert_eq!(id, sha256_bytes(b"hello"));
        assert!(dir.path().join("file-ids.json").exists());
        assert_eq!(file_identity(dir.path(), &f).unwrap(), id);
        fs::write(&f, b"hello, world").unwrap();
        assert_eq!(
            file_identity(dir.path(), &f).unwrap(),
            sha256_bytes(b"hello, world")
        );
    }
}
