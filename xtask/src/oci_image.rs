//! `cargo xtask busybox-image`: the demo image, an OCI image layout (a
//! directory and a tar of it) holding Debian's static busybox with its
//! applet symlinks, `/etc/passwd` and `/etc/group` (root and nobody) and
//! `/tmp`. Reproducible: fixed owners and mtimes, sorted entries, an
//! uncompressed layer, no timestamps in the config.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};

const BUSYBOX: &str = "/bin/busybox";
/// Modification time of every entry (2024-01-01T00:00:00Z).
const MTIME: u64 = 1_704_067_200;
const IMAGE_NAME: &str = "docker.io/library/busybox:latest";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds `<out>/busybox/` (the layout) and `<out>/busybox.tar`.
pub fn build(out: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let busybox =
        fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX} (install busybox-static)"))?;
    let listed = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    ensure!(listed.status.success(), "busybox --list failed");
    let mut applets: Vec<String> = String::from_utf8(listed.stdout)?
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_owned)
        .collect();
    applets.sort();
    applets.dedup();
    for needed in ["sh", "echo", "cat", "ls", "sleep"] {
        ensure!(
            applets.iter().any(|a| a == needed),
            "busybox lacks the {needed} applet"
        );
    }

    let layer = rootfs_tar(&busybox, &applets);
    let layer_digest = sha256_hex(&layer);
    let config = format!(
        concat!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["{path}"],"Cmd":["sh"],"WorkingDir":"/"}},"#,
            r#""rootfs":{{"type":"layers","diff_ids":["sha256:{layer}"]}},"#,
            r#""history":[{{"created_by":"cargo xtask busybox-image"}}]}}"#
        ),
        path = PATH_ENV,
        layer = layer_digest
    );
    let config_digest = sha256_hex(config.as_bytes());
    let manifest = format!(
        concat!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","#,
            r#""config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{cd}","size":{cs}}},"#,
            r#""layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{ld}","size":{ls}}}]}}"#
        ),
        cd = config_digest,
        cs = config.len(),
        ld = layer_digest,
        ls = layer.len()
    );
    let manifest_digest = sha256_hex(manifest.as_bytes());
    let index = format!(
        concat!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"#,
            r#""mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{md}","size":{ms},"#,
            r#""annotations":{{"io.containerd.image.name":"{name}","org.opencontainers.image.ref.name":"latest"}}}}]}}"#
        ),
        md = manifest_digest,
        ms = manifest.len(),
        name = IMAGE_NAME
    );
    let layout_file = r#"{"imageLayoutVersion":"1.0.0"}"#;

    let blobs: Vec<(String, &[u8])> = {
        let mut v = vec![
            (layer_digest, layer.as_slice()),
            (config_digest, config.as_bytes()),
            (manifest_digest, manifest.as_bytes()),
        ];
        v.sort();
        v
    };

    let dir = out.join("busybox");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::write(dir.join("oci-layout"), layout_file)?;
    fs::write(dir.join("index.json"), &index)?;
    for (hex, data) in &blobs {
        fs::write(dir.join("blobs/sha256").join(hex), data)?;
    }

    let mut tar = Tar::default();
    tar.dir("blobs/", 0o755);
    tar.dir("blobs/sha256/", 0o755);
    for (hex, data) in &blobs {
        tar.file(&format!("blobs/sha256/{hex}"), 0o644, data);
    }
    tar.file("index.json", 0o644, index.as_bytes());
    tar.file("oci-layout", 0o644, layout_file.as_bytes());
    let tar_path = out.join("busybox.tar");
    fs::write(&tar_path, tar.finish())
        .with_context(|| format!("writing {}", tar_path.display()))?;
    Ok((dir, tar_path))
}

/// The image's only layer.
fn rootfs_tar(busybox: &[u8], applets: &[String]) -> Vec<u8> {
    let passwd =
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    let group = "root:x:0:\nnobody:x:65534:\n";
    let mut t = Tar::default();
    t.dir("bin/", 0o755);
    t.file("bin/busybox", 0o755, busybox);
    for a in applets {
        t.symlink(&format!("bin/{a}"), "busybox");
    }
    for d in ["dev/", "etc/", "proc/", "sys/", "usr/", "usr/bin/", "var/"] {
        t.dir(d, 0o755);
    }
    t.file("etc/group", 0o644, group.as_bytes());
    t.file("etc/passwd", 0o644, passwd.as_bytes());
    t.dir("root/", 0o700);
    t.dir("tmp/", 0o1777);
    t.finish()
}

/// A minimal ustar writer: root-owned entries with a fixed mtime.
#[derive(Default)]
struct Tar {
    out: Vec<u8>,
}

impl Tar {
    fn header(&mut self, name: &str, mode: u32, size: usize, kind: u8, link: &str) {
        assert!(
            name.len() <= 100 && link.len() <= 100,
            "tar name too long: {name}"
        );
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |h: &mut [u8; 512], at: usize, width: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = width - 1);
            h[at..at + width].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, u64::from(mode));
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, size as u64);
        octal(&mut h, 136, 12, MTIME);
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.out.extend_from_slice(&h);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.header(name, mode, data.len(), b'0', "");
        self.out.extend_from_slice(data);
        self.out.resize(self.out.len().div_ceil(512) * 512, 0);
    }

    fn dir(&mut self, name: &str, mode: u32) {
        self.header(name, mode, 0, b'5', "");
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.header(name, 0o777, 0, b'2', target);
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 1024]);
        self.out
    }
}

/// SHA-256 (FIPS 180-4), lowercase hex.
fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

/// Checks a built layout with `sha256sum` (an independent implementation).
pub fn verify_with_sha256sum(dir: &Path) -> anyhow::Result<()> {
    for e in fs::read_dir(dir.join("blobs/sha256"))? {
        let p = e?.path();
        let out = Command::new("sha256sum")
            .arg(&p)
            .output()
            .context("running sha256sum")?;
        let sum = String::from_utf8(out.stdout)?;
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !sum.starts_with(name) {
            bail!("{} does not hash to its name", p.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answers() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let long = vec![b'a'; 1_000_000];
        assert_eq!(
            sha256_hex(&long),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn builds_a_reproducible_verified_layout() {
        if !Path::new(BUSYBOX).exists() {
            panic!("{BUSYBOX} is missing: install busybox-static");
        }
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (dir_a, tar_a) = build(a.path()).unwrap();
        let (_, tar_b) = build(b.path()).unwrap();
        assert_eq!(
            fs::read(&tar_a).unwrap(),
            fs::read(&tar_b).unwrap(),
            "reproducible"
        );
        verify_with_sha256sum(&dir_a).unwrap();
        let listing = Command::new("tar")
            .arg("-tvf")
            .arg(&tar_a)
            .output()
            .unwrap();
        assert!(listing.status.success(), "GNU tar reads the layout tar");
    }
}
