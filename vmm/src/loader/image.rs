//! Where an image comes from (a file or bytes in memory, such as the probe guest) and a
//! reader over either that linux-loader and the initrd copy can use.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use super::LoadError;

/// Where an image (kernel or initrd) comes from.
#[derive(Clone, Debug)]
pub enum ImageSource {
    /// A file.
    Path(PathBuf),
    /// Bytes already in memory (the built-in probe guest); `name` is used in messages.
    Bytes {
        /// Shown in errors.
        name: String,
        /// The image.
        data: Cow<'static, [u8]>,
    },
}

impl ImageSource {
    /// How errors refer to this image.
    pub fn name(&self) -> String {
        match self {
            ImageSource::Path(p) => p.display().to_string(),
            ImageSource::Bytes { name, .. } => name.clone(),
        }
    }

    pub(super) fn open(&self) -> Result<Image<'_>, LoadError> {
        match self {
            ImageSource::Path(p) => {
                let open_error = |source| LoadError::Open {
                    image: self.name(),
                    source,
                };
                // Non-blocking, so that a FIFO named as the kernel does not hold the caller
                // (vm.create's check) until a writer comes; no effect on a regular file.
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(p)
                    .map_err(open_error)?;
                // A folder or a FIFO opens fine and reads as an error, a huge size or nothing;
                // say what it is.
                match file.metadata() {
                    Ok(m) if !m.is_file() => Err(open_error(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not a regular file",
                    ))),
                    _ => Ok(Image::File(file)),
                }
            }
            ImageSource::Bytes { data, .. } => Ok(Image::Bytes(Cursor::new(data.as_ref()))),
        }
    }
}

/// An open image: what linux-loader reads from.
pub(super) enum Image<'a> {
    File(File),
    Bytes(Cursor<&'a [u8]>),
}

impl Read for Image<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Image::File(f) => f.read(buf),
            Image::Bytes(c) => c.read(buf),
        }
    }
}

impl Seek for Image<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match self {
            Image::File(f) => f.seek(pos),
            Image::Bytes(c) => c.seek(pos),
        }
    }
}

impl ReadVolatile for Image<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        match self {
            Image::File(f) => f.read_volatile(buf),
            Image::Bytes(c) => c.read_volatile(buf),
        }
    }
}

impl Image<'_> {
    pub(super) fn len(&mut self) -> io::Result<u64> {
        let len = self.seek(SeekFrom::End(0))?;
        self.rewind()?;
        Ok(len)
    }

    /// Reads up to `buf.len()` bytes at `offset`; short at end of file.
    pub(super) fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.seek(SeekFrom::Start(offset))?;
        let mut filled = 0;
        while filled < buf.len() {
            match self.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
    }
}
