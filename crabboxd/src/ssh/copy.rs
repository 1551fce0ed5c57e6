//! `cp` over the mux: an upload of one regular file travels as its raw
//! bytes (`cat` on the lease, like `ssh … 'cat > f'`, with the size checked
//! and the mode and mtime set after); a directory tree, and every download,
//! as a tar stream (the `tar` crate here, `tar` on the lease). Each uses one
//! exec channel; no scp or sftp needed on either side. Modes are kept. The
//! far side is atomic: the file or tree is written under a temporary name
//! next to the destination and renamed into place only once it is complete.

use std::{
    io::{self, Read, Write},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use russh::ChannelMsg;
use tokio::sync::mpsc;

use super::{
    SshError,
    conn::{CloseOnDrop, Conn, Stats},
    exec::{Session, sh_quote},
};
use crate::supervisor::Supervisor;

/// Which way a copy goes.
#[derive(Debug, Clone)]
pub enum Direction {
    /// Local → lease.
    Upload {
        /// An absolute local path (file or directory).
        local: PathBuf,
        /// The remote destination.
        remote: String,
    },
    /// Lease → local.
    Download {
        /// The remote source.
        remote: String,
        /// An absolute local destination.
        local: PathBuf,
    },
}

/// One copy.
#[derive(Debug, Clone)]
pub struct CopySpec {
    /// The lease id or static target name.
    pub lease: String,
    /// What to copy where.
    pub direction: Direction,
    /// The calling client's SSH agent socket, if any.
    pub agent: Option<PathBuf>,
}

/// Progress of a copy.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Bytes moved so far (tar stream bytes).
    pub bytes: u64,
    /// The expected total of file bytes, when known.
    pub total: Option<u64>,
    /// Set on the last event: the path written.
    pub done: Option<String>,
}

/// The most stderr kept from the remote `tar` for an error message.
const STDERR_MAX: usize = 4096;
/// Chunks between the blocking tar thread and the channel (eight are
/// queued at most: 2 MiB per copy).
const CHUNK: usize = 256 * 1024;

/// Runs one copy.
pub async fn run(
    supervisor: &Supervisor,
    conn: Arc<Conn>,
    spec: CopySpec,
    out: &mpsc::Sender<Result<Progress, SshError>>,
) -> Result<(), SshError> {
    match spec.direction {
        Direction::Upload { local, remote } => upload(supervisor, conn, local, remote, out).await,
        Direction::Download { remote, local } => {
            download(supervisor, conn, remote, local, out).await
        }
    }
}

fn copy_err(e: impl std::fmt::Display) -> SshError {
    SshError::Copy(e.to_string())
}

fn total_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|rd| rd.flatten().map(|e| total_size(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.len()
    }
}

/// Writes into a bounded channel from a blocking thread.
struct ChanWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl Write for ChanWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // A fresh buffer of full capacity: no regrowth copies per chunk.
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the copy was abandoned"))
    }
}

/// Reads from a bounded channel on a blocking thread.
struct ChanReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

async fn upload(
    supervisor: &Supervisor,
    conn: Arc<Conn>,
    local: PathBuf,
    remote: String,
    out: &mpsc::Sender<Result<Progress, SshError>>,
) -> Result<(), SshError> {
    let meta = std::fs::metadata(&local)
        .map_err(|e| copy_err(format!("cannot read {}: {e}", local.display())))?;
    let name = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| copy_err(format!("{} has no file name", local.display())))?;
    let total = total_size(&local);
    // A regular file travels as its bytes alone (`cat` on the far side,
    // like `ssh … 'cat > f'`), then gets its mode and mtime; anything else
    // as a tar stream.
    let plain = std::fs::symlink_metadata(&local)
        .map(|m| m.file_type().is_file())
        .unwrap_or(false);
    if plain {
        return upload_file(supervisor, conn, local, remote, name, &meta, out).await;
    }
    // The remote end: pick the final path (inside DST when it is a
    // directory), unpack next to it, then rename into place.
    let script = r#"set -e
dst=$1; name=$2
if [ -d "$dst" ]; then final="${dst%/}/$name"; else final=$dst; fi
case $final in */*) parent=${final%/*}; parent=${parent:-/} ;; *) parent=. ;; esac
tmp="$parent/.crabbox-cp.$3"
mkdir -m 700 -- "$tmp"
trap 'rm -rf -- "$tmp"' EXIT
trap 'exit 1' HUP INT TERM PIPE
tar -xpf - -C "$tmp"
[ -e "$tmp/.crabbox-cp-end.$3" ] || { echo "the upload was cut off" >&2; exit 1; }
mv -fT -- "$tmp/$name" "$final"
printf '%s\n' "$final""#;
    let suffix = random_suffix();
    let cmd = format!(
        "sh -c {} sh {} {} {suffix}",
        sh_quote(script),
        sh_quote(&remote),
        sh_quote(&name),
    );
    let (mut rd, wr) = start(supervisor, &conn, cmd, "an upload").await?;
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let is_dir = meta.is_dir();
    let packer = supervisor.spawn_blocking(move || -> io::Result<()> {
        let mut b = tar::Builder::new(ChanWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        });
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        if is_dir {
            b.append_dir_all(&name, &local)?;
        } else {
            b.append_path_with_name(&local, &name)?;
        }
        // The last entry, an empty file the far side checks for: GNU tar
        // takes a stream cut at an entry boundary for a complete archive,
        // so only this says the whole tree arrived.
        let mut end = tar::Header::new_gnu();
        end.set_size(0);
        end.set_mode(0o600);
        end.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut end, format!(".crabbox-cp-end.{suffix}"), io::empty())?;
        let mut w = b.into_inner()?;
        w.flush()
    });
    let send = send_chunks(&wr, rx, Arc::clone(&conn.stats), out, total);
    let (sent_result, remote_result) = upload_both(send, collect(&mut rd, &conn)).await;
    wr.ended();
    let packed = packer
        .await
        .map_err(|e| copy_err(format!("the local tar failed: {e}")))?;
    let (stdout, _) = remote_result?;
    packed.map_err(|e| copy_err(format!("cannot read the local files: {e}")))?;
    report_uploaded(sent_result, &stdout, total, out).await
}

/// Starts a copy's far-side command on a session of its own; the write half
/// closes the channel (then frees the session) if the copy is dropped.
async fn start(
    supervisor: &Supervisor,
    conn: &Conn,
    cmd: String,
    what: &'static str,
) -> Result<(russh::ChannelReadHalf, CloseOnDrop), SshError> {
    let session = Session::open(conn).await?;
    session
        .channel
        .exec(true, cmd)
        .await
        .map_err(|e| SshError::Lost(format!("cannot start the copy: {e}")))?;
    Ok(session.split_closing(supervisor, &conn.target.lease, what))
}

/// The far side of a file upload: `$1` destination, `$2` name, `$3` mode,
/// `$4` mtime, `$5` size, `$6` the temp name's random suffix.
const FILE_SCRIPT: &str = r#"set -e
umask 077
dst=$1; name=$2
if [ -d "$dst" ]; then final="${dst%/}/$name"; else final=$dst; fi
case $final in */*) parent=${final%/*}; parent=${parent:-/} ;; *) parent=. ;; esac
tmp="$parent/.crabbox-cp.$6"
set -C; : > "$tmp"; set +C
[ -f "$tmp" ] && [ ! -L "$tmp" ] || { echo "$tmp is not the file just created" >&2; exit 1; }
trap 'rm -f -- "$tmp"' EXIT
trap 'exit 1' HUP INT TERM PIPE
cat > "$tmp"
n=$(wc -c < "$tmp")
[ "$n" -eq "$5" ] || { echo "received $n of $5 bytes" >&2; exit 1; }
chmod "$3" "$tmp"
touch -m -d "@$4" "$tmp" 2>/dev/null || true
mv -fT -- "$tmp" "$final"
printf '%s\n' "$final""#;

/// Uploads one regular file as its raw bytes: written to a temporary name
/// next to the destination, given the local mode and mtime, then renamed
/// into place.
async fn upload_file(
    supervisor: &Supervisor,
    conn: Arc<Conn>,
    local: PathBuf,
    remote: String,
    name: String,
    meta: &std::fs::Metadata,
    out: &mpsc::Sender<Result<Progress, SshError>>,
) -> Result<(), SshError> {
    use std::os::unix::fs::MetadataExt as _;
    let total = meta.len();
    let mode = format!("{:o}", meta.mode() & 0o7777);
    let mtime = meta.mtime().to_string();
    let script = FILE_SCRIPT;
    let cmd = format!(
        "sh -c {} sh {} {} {} {} {total} {}",
        sh_quote(script),
        sh_quote(&remote),
        sh_quote(&name),
        sh_quote(&mode),
        sh_quote(&mtime),
        random_suffix()
    );
    let (mut rd, wr) = start(supervisor, &conn, cmd, "an upload").await?;
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let reader = supervisor.spawn_blocking(move || -> io::Result<()> {
        // The size announced to the far side, at most: a file that shrinks
        // fails there; one that grows is cut to its size at the start.
        let mut f = std::fs::File::open(&local)?.take(total);
        loop {
            // Read into spare capacity: no zeroing of each chunk first.
            let mut buf = Vec::with_capacity(CHUNK);
            let got = (&mut f).take(CHUNK as u64).read_to_end(&mut buf)?;
            if got == 0 {
                return Ok(());
            }
            if tx.blocking_send(Bytes::from(buf)).is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the copy was abandoned",
                ));
            }
        }
    });
    let send = send_chunks(&wr, rx, Arc::clone(&conn.stats), out, total);
    let (sent_result, remote_result) = upload_both(send, collect(&mut rd, &conn)).await;
    wr.ended();
    let read = reader
        .await
        .map_err(|e| copy_err(format!("reading the local file failed: {e}")))?;
    let (stdout, _) = remote_result?;
    read.map_err(|e| {
        copy_err(format!(
            "cannot read {}: {e}",
            PathBuf::from(&name).display()
        ))
    })?;
    report_uploaded(sent_result, &stdout, total, out).await
}

/// An upload's last word: the bytes sent and the path the far side printed
/// (where the file landed), or why nothing was sent.
async fn report_uploaded(
    sent: Option<Result<u64, SshError>>,
    stdout: &[u8],
    total: u64,
    out: &mpsc::Sender<Result<Progress, SshError>>,
) -> Result<(), SshError> {
    let sent = sent.unwrap_or_else(|| {
        Err(copy_err(
            "the far side ended before the copy was sent (its exit status was 0)",
        ))
    })?;
    let final_path = String::from_utf8_lossy(stdout).trim().to_owned();
    let _ = out
        .send(Ok(Progress {
            bytes: sent,
            total: Some(total),
            done: Some(final_path),
        }))
        .await;
    Ok(())
}

/// Sends an upload's chunks into its channel (counted, with a progress
/// report every MiB), then end-of-file; the number of bytes sent.
async fn send_chunks(
    wr: &russh::ChannelWriteHalf<russh::client::Msg>,
    mut rx: mpsc::Receiver<Bytes>,
    stats: Arc<Stats>,
    out: &mpsc::Sender<Result<Progress, SshError>>,
    total: u64,
) -> Result<u64, SshError> {
    let mut sent: u64 = 0;
    let mut last_report: u64 = 0;
    while let Some(chunk) = rx.recv().await {
        sent += chunk.len() as u64;
        stats
            .bytes_out
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        wr.data_bytes(chunk)
            .await
            .map_err(|e| SshError::Lost(format!("the copy's channel failed: {e}")))?;
        if sent - last_report >= 1 << 20 {
            last_report = sent;
            let _ = out.try_send(Ok(Progress {
                bytes: sent,
                total: Some(total),
                done: None,
            }));
        }
    }
    wr.eof()
        .await
        .map_err(|e| SshError::Lost(format!("the copy's channel failed: {e}")))?;
    Ok(sent)
}

/// Runs an upload's sender beside the reader of its channel. When the far
/// side ends first (it failed: no such directory, …) the sender is dropped,
/// not awaited — its window would never open again — which also ends the
/// local reading thread (its queue is gone).
async fn upload_both<S, C>(send: S, collecting: C) -> (Option<Result<u64, SshError>>, C::Output)
where
    S: std::future::Future<Output = Result<u64, SshError>>,
    C: std::future::Future,
{
    tokio::pin!(send);
    tokio::pin!(collecting);
    let mut sent = None;
    loop {
        tokio::select! {
            r = &mut send, if sent.is_none() => sent = Some(r),
            r = &mut collecting => return (sent, r),
        }
    }
}

/// Reads a copy channel to its end: stdout, and the exit status (a
/// non-zero one is an error carrying the remote stderr).
async fn collect(rd: &mut russh::ChannelReadHalf, conn: &Conn) -> Result<(Vec<u8>, ()), SshError> {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut status = None;
    while let Some(msg) = rd.wait().await {
        match msg {
            ChannelMsg::Data { data } if stdout.len() < STDERR_MAX => {
                stdout.extend_from_slice(&data)
            }
            ChannelMsg::ExtendedData { data, .. } if stderr.len() < STDERR_MAX => {
                stderr.extend_from_slice(&data)
            }
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            ChannelMsg::ExitSignal { .. } => status = Some(255),
            _ => {}
        }
    }
    conn.stats
        .bytes_in
        .fetch_add((stdout.len() + stderr.len()) as u64, Ordering::Relaxed);
    match status {
        Some(0) => Ok((stdout, ())),
        Some(code) => Err(copy_err(format!(
            "the copy failed on {} (exit {code}): {}",
            conn.target.lease,
            String::from_utf8_lossy(&stderr).trim()
        ))),
        None => Err(SshError::Lost(format!(
            "the SSH connection to {} was lost during the copy",
            conn.target.lease
        ))),
    }
}

fn random_suffix() -> String {
    use rand::Rng as _;
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

async fn download(
    supervisor: &Supervisor,
    conn: Arc<Conn>,
    remote: String,
    local: PathBuf,
    out: &mpsc::Sender<Result<Progress, SshError>>,
) -> Result<(), SshError> {
    let name = Path::new(&remote)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| copy_err(format!("{remote:?} has no file name")))?;
    if name == "." || name == ".." {
        return Err(copy_err(format!("{remote:?} has no file name")));
    }
    let final_path = if local.is_dir() {
        local.join(&name)
    } else {
        local.clone()
    };
    let parent = final_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let tmp = parent.join(format!(".crabbox-cp.{}", random_suffix()));
    std::fs::create_dir(&tmp)
        .map_err(|e| copy_err(format!("cannot create {}: {e}", tmp.display())))?;
    let cleanup = TmpDir(tmp.clone());
    let script = r#"cd -- "$(dirname -- "$1")" && exec tar -cf - "./$2""#;
    let cmd = format!(
        "sh -c {} sh {} {}",
        sh_quote(script),
        sh_quote(&remote),
        sh_quote(&name)
    );
    let (mut rd, wr) = start(supervisor, &conn, cmd, "a download").await?;
    let _ = wr.eof().await;
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let dest = tmp.clone();
    // The unpacker owns the temp directory's removal while it runs: if this
    // copy is dropped mid-way, the directory goes once the unpacker has
    // stopped writing into it, not while it still may.
    let unpacker = supervisor.spawn_blocking(move || -> (TmpDir, io::Result<()>) {
        let unpack = || -> io::Result<()> {
            let mut a = tar::Archive::new(ChanReader {
                rx,
                cur: Bytes::new(),
            });
            a.set_preserve_permissions(true);
            a.set_preserve_mtime(true);
            a.set_overwrite(false);
            a.unpack(&dest)?;
            // Drain anything after the archive's end so the sender never blocks.
            let mut rest = a.into_inner();
            io::copy(&mut rest, &mut io::sink())?;
            Ok(())
        };
        let result = unpack();
        (cleanup, result)
    });
    let mut got: u64 = 0;
    let mut last_report = 0u64;
    let mut stderr = Vec::new();
    let mut status = None;
    let mut tx = Some(tx);
    while let Some(msg) = rd.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                got += data.len() as u64;
                conn.stats
                    .bytes_in
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Some(t) = &tx
                    && t.send(data).await.is_err()
                {
                    // The unpacker stopped (its error is reported below).
                    tx = None;
                }
                if got - last_report >= 1 << 20 {
                    last_report = got;
                    let _ = out.try_send(Ok(Progress {
                        bytes: got,
                        total: None,
                        done: None,
                    }));
                }
            }
            ChannelMsg::ExtendedData { data, .. } if stderr.len() < STDERR_MAX => {
                stderr.extend_from_slice(&data)
            }
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            ChannelMsg::ExitSignal { .. } => status = Some(255),
            _ => {}
        }
    }
    wr.ended();
    drop(tx);
    let (cleanup, unpacked) = unpacker
        .await
        .map_err(|e| copy_err(format!("the local tar failed: {e}")))?;
    match status {
        Some(0) => {}
        Some(code) => {
            return Err(copy_err(format!(
                "cannot read {remote:?} on {} (exit {code}): {}",
                conn.target.lease,
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
        None => {
            return Err(SshError::Lost(format!(
                "the SSH connection to {} was lost during the copy",
                conn.target.lease
            )));
        }
    }
    unpacked.map_err(|e| copy_err(format!("cannot unpack into {}: {e}", tmp.display())))?;
    let staged = tmp.join(&name);
    std::fs::rename(&staged, &final_path).map_err(|e| {
        copy_err(format!(
            "cannot move the copy into place at {}: {e}",
            final_path.display()
        ))
    })?;
    drop(cleanup);
    let _ = out
        .send(Ok(Progress {
            bytes: got,
            total: None,
            done: Some(final_path.display().to_string()),
        }))
        .await;
    Ok(())
}

/// Removes the staging directory when the copy ends, done or not.
struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name planted at the temp path (a symlink to another user's FIFO)
    /// is refused, not written through.
    #[test]
    fn a_planted_temp_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("theirs");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        std::os::unix::fs::symlink(&fifo, dir.path().join(".crabbox-cp.planted")).unwrap();
        // The other user's reader.
        let reader = std::process::Command::new("cat")
            .arg(&fifo)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(FILE_SCRIPT)
            .arg("sh")
            .arg(dir.path().join("dest"))
            .args(["dest", "644", "0", "6", "planted"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                let _ = c.stdin.take().unwrap().write_all(b"secret");
                c.wait_with_output()
            })
            .unwrap();
        assert!(!out.status.success(), "{out:?}");
        let got = reader.wait_with_output().unwrap().stdout;
        assert_eq!(got, b"", "the upload went to the planted FIFO");
        assert!(!dir.path().join("dest").exists());
    }
}
