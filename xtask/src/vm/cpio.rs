//! A "newc" cpio archive, the format the kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst). Written
//! here rather than by `cpio` so that device nodes need no root and the
//! host needs no cpio package.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes entries in order; a parent directory must come before its files.
pub struct Writer<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer { out, ino: 1 }
    }

    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[])
    }

    /// A regular file; `executable` gives it mode 0755, else 0644.
    pub fn file(&mut self, path: &str, data: &[u8], executable: bool) -> io::Result<()> {
        let perm = if executable { 0o755 } else { 0o644 };
        self.entry(path, S_IFREG | perm, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// A character device, e.g. /dev/console (5, 1): the kernel opens it
    /// for init's stdio before init can mount devtmpfs.
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[])
    }

    /// The trailer entry; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, (rmajor, rminor): (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let size = u32::try_from(data.len()).map_err(|_| io::Error::other(format!("{path}: over 4 GiB")))?;
        let name_size = u32::try_from(name.len() + 1).map_err(|_| io::Error::other("name too long"))?;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize, check: 8 hex digits each.
        let fields = [self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, name_size, 0];
        self.ino += 1;
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        // Header plus name, then the data, each padded to 4 bytes.
        self.pad(header.len() + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        self.out.write_all(&[0; 3][..(4 - len % 4) % 4])
    }
}

#[cfg(test)]
mod tests {
    use super::Writer;

    #[test]
    fn entries_are_newc_headers_padded_to_four_bytes() {
        let mut w = Writer::new(Vec::new());
        w.dir("/bin").unwrap();
        w.file("/bin/hi", b"hello", true).unwrap();
        w.char_device("/dev/console", 5, 1).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        // First header: ino 1, a directory 0755, nlink 2, name "bin\0" (size 4).
        let first = std::str::from_utf8(&out[..110]).unwrap();
        assert_eq!(&first[..6], "070701");
        assert_eq!(&first[6..14], "00000001");
        assert_eq!(&first[14..22], "000041ed");
        assert_eq!(&first[38..46], "00000002");
        assert_eq!(&first[94..102], "00000004");
        assert_eq!(&out[110..114], b"bin\0");
        // The file's data starts on a 4-byte boundary after its name.
        let at = out.windows(5).position(|w| w == b"hello").unwrap();
        assert_eq!(at % 4, 0);
        let text = String::from_utf8_lossy(&out);
        // The device: mode 020600, rdev 5:1.
        assert!(text.contains("00002180"), "{text}");
        assert!(text.contains("0000000500000001"), "{text}");
        assert!(text.contains("TRAILER!!!"));
    }
}
