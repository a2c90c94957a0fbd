//! Creating the socket file: never over something that is not a stale socket, owner-only, and
//! removed at the end only while it is still the one this process made.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("--api-socket {}: its folder does not exist; create it or choose another path", .0.display())]
    NoFolder(PathBuf),
    #[error("--api-socket {} exists and is not a socket; remove it or choose another --api-socket", .0.display())]
    NotSocket(PathBuf),
    #[error("--api-socket {}: another process serves this socket; stop it or choose another --api-socket", .0.display())]
    InUse(PathBuf),
    #[error("--api-socket {}: cannot tell whether the socket there is in use ({source}); remove it or choose another --api-socket", .path.display())]
    Probe {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--api-socket {}: cannot {what} ({source}); choose another --api-socket", .path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// The socket file this process made: its device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<FileId> {
        let m = std::fs::symlink_metadata(path)?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Listens at `path` (non-blocking), made 0600; see [`super::Server::bind`].
pub(super) fn listen(path: &Path) -> Result<(UnixListener, FileId), BindError> {
    let io = |what, source| BindError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    let folder = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => return Err(BindError::NotSocket(path.to_path_buf())),
    };
    if !folder.is_dir() {
        return Err(BindError::NoFolder(path.to_path_buf()));
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("read what is at the path", e)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(BindError::NotSocket(path.to_path_buf()))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(path.to_path_buf())),
            // Nobody listens: a socket a crashed vmm left behind.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| io("remove the stale socket", e))?
            }
            Err(e) => {
                return Err(BindError::Probe {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        },
    }
    let listener = UnixListener::bind(path).map_err(|e| io("listen", e))?;
    // Until this chmod the file has the umask's mode; a peer of another user connecting in
    // that window is refused by the peer check.
    let made = (|| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        FileId::of(path)
    })();
    match made {
        Ok(id) => Ok((listener, id)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(io("make the socket owner-only", e))
        }
    }
}

/// Removes `path` if it is still the file `id` (another vmm may have replaced it).
pub(super) fn remove_if_ours(path: &Path, id: FileId) {
    if FileId::of(path).is_ok_and(|now| now == id) {
        let _ = std::fs::remove_file(path);
    }
}
