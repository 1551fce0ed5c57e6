//! Host-key policy: a key pinned by the coordinator (or a static target's
//! `host_key`) is enforced exactly; otherwise the first key seen is trusted
//! and recorded in the per-lease `known_hosts` (atomic, 0600), and any other
//! key later is refused, of the same algorithm or not: only a host with no
//! entry at all is trusted on first use. Nothing is ever accepted blindly.
//!
//! Entries are recorded under the lease's host-key alias, so one entry
//! covers every port and address of the lease, and OpenSSH reads the same
//! file with `-o HostKeyAlias=<alias>`. Hashed (`|1|…`) entries are read.

use std::path::PathBuf;

use russh::keys::{HashAlg, PublicKey};

use super::target::LeaseFiles;
use crate::platform::fs as pfs;

/// Why a host key was refused, or the policy could not be applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HostKeyError {
    /// The pinned key does not parse.
    #[error("the host key pinned for {lease} is not a valid OpenSSH public key ({reason})")]
    BadPin {
        /// The lease.
        lease: String,
        /// The parser's complaint (never the key itself).
        reason: String,
    },
    /// The server's key is not the pinned one.
    #[error(
        "the SSH host key of {lease} does not match the key pinned for it (pinned {pinned}, the server offered {offered}); refusing to connect: the lease may have been rebuilt, or something is intercepting the connection"
    )]
    PinMismatch {
        /// The lease.
        lease: String,
        /// Fingerprint of the pinned key.
        pinned: String,
        /// Fingerprint of the offered key.
        offered: String,
    },
    /// A key was trusted on first use and the server now offers another.
    #[error(
        "the SSH host key of {lease} changed (the server offered {offered}; line {line} of {} records another); refusing to connect. If the lease was rebuilt, forget the old key with: ssh-keygen -f {} -R {alias}",
        file.display(), file.display()
    )]
    Changed {
        /// The lease.
        lease: String,
        /// Fingerprint of the offered key.
        offered: String,
        /// The known_hosts file.
        file: PathBuf,
        /// The line that records the old key.
        line: usize,
        /// The alias the entry is recorded under.
        alias: String,
    },
    /// The known_hosts file could not be read or written.
    #[error("cannot use {}: {message}", file.display())]
    File {
        /// The file.
        file: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// One lease's host-key checker.
#[derive(Debug, Clone)]
pub struct HostKeys {
    lease: String,
    files: LeaseFiles,
    pin: Option<PublicKey>,
}

/// What a known_hosts file holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Audit {
    /// Whether the file exists.
    pub exists: bool,
    /// Entries that parse.
    pub entries: usize,
    /// Lines that do not.
    pub bad_lines: usize,
    /// Entries that are not the pinned key (when one is pinned).
    pub not_pinned: usize,
}

/// What [`HostKeys::check`] decided about an accepted key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// It is the pinned key.
    Pinned,
    /// It was recorded before.
    Known,
    /// It was seen for the first time and recorded now.
    Learned,
}

fn fingerprint(k: &PublicKey) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

impl HostKeys {
    /// A checker for `lease`; `pin` is `"<alg> <base64>"`.
    pub fn new(lease: &str, files: LeaseFiles, pin: Option<&str>) -> Result<Self, HostKeyError> {
        let pin = pin
            .map(|p| {
                PublicKey::from_openssh(p.trim()).map_err(|e| HostKeyError::BadPin {
                    lease: lease.to_owned(),
                    reason: e.to_string(),
                })
            })
            .transpose()?;
        Ok(HostKeys {
            lease: lease.to_owned(),
            files,
            pin,
        })
    }

    /// Whether a key is pinned.
    pub fn is_pinned(&self) -> bool {
        self.pin.is_some()
    }

    /// Writes the pinned key, alone, into the per-lease known_hosts (so
    /// OpenSSH with `HostKeyAlias` can use it too). Skipped when unchanged.
    pub fn install_pin(&self) -> Result<(), HostKeyError> {
        let Some(pin) = &self.pin else {
            return Ok(());
        };
        let line = self.entry(pin)?;
        if std::fs::read_to_string(&self.files.known_hosts)
            .ok()
            .as_deref()
            == Some(line.as_str())
        {
            return Ok(());
        }
        self.write(line.as_bytes())
    }

    /// Decides about the key the server offered.
    pub fn check(&self, offered: &PublicKey) -> Result<Accepted, HostKeyError> {
        if let Some(pin) = &self.pin {
            if pin.key_data() == offered.key_data() {
                return Ok(Accepted::Pinned);
            }
            return Err(HostKeyError::PinMismatch {
                lease: self.lease.clone(),
                pinned: fingerprint(pin),
                offered: fingerprint(offered),
            });
        }
        let file = &self.files.known_hosts;
        // Every entry recorded under the alias, whatever its algorithm:
        // russh's own check only compares entries of the offered key's
        // algorithm, so a server switching from ed25519 to ecdsa would look
        // unknown and be trusted again. Only a host with no entry at all is
        // trusted on first use.
        let known = russh::keys::known_hosts::known_host_keys_path(&self.files.alias, 22, file)
            .map_err(|e| self.file_error(e.to_string()))?;
        if known
            .iter()
            .any(|(_, k)| k.key_data() == offered.key_data())
        {
            return Ok(Accepted::Known);
        }
        if let Some((line, _)) = known.first() {
            return Err(HostKeyError::Changed {
                lease: self.lease.clone(),
                offered: fingerprint(offered),
                file: file.clone(),
                line: *line,
                alias: self.files.alias.clone(),
            });
        }
        let mut text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(self.file_error(e.to_string())),
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&self.entry(offered)?);
        self.write(text.as_bytes())?;
        tracing::info!(lease = %self.lease, fingerprint = %fingerprint(offered), file = %file.display(), "trusting the host key on first use");
        Ok(Accepted::Learned)
    }

    /// What the per-lease known_hosts holds, for `doctor`: entries that
    /// parse, lines that do not, and (when pinned) entries that are not the
    /// pinned key.
    pub fn audit(&self) -> Audit {
        let text = match std::fs::read_to_string(&self.files.known_hosts) {
            Ok(t) => t,
            Err(_) => return Audit::default(),
        };
        let mut a = Audit {
            exists: true,
            ..Audit::default()
        };
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let key = (f.len() >= 3)
                .then(|| PublicKey::from_openssh(&format!("{} {}", f[1], f[2])).ok())
                .flatten();
            match key {
                None => a.bad_lines += 1,
                Some(k) => {
                    a.entries += 1;
                    if self
                        .pin
                        .as_ref()
                        .is_some_and(|p| p.key_data() != k.key_data())
                    {
                        a.not_pinned += 1;
                    }
                }
            }
        }
        a
    }

    fn entry(&self, key: &PublicKey) -> Result<String, HostKeyError> {
        let mut k = key.clone();
        k.set_comment("");
        let text = k
            .to_openssh()
            .map_err(|e| self.file_error(format!("cannot encode the host key: {e}")))?;
        Ok(format!("{} {}\n", self.files.alias, text.trim()))
    }

    fn write(&self, contents: &[u8]) -> Result<(), HostKeyError> {
        pfs::ensure_private_dir(&self.files.dir).map_err(|e| HostKeyError::File {
            file: self.files.dir.clone(),
            message: e.to_string(),
        })?;
        pfs::write_private(&self.files.known_hosts, contents)
            .map_err(|e| self.file_error(e.to_string()))
    }

    fn file_error(&self, message: String) -> HostKeyError {
        HostKeyError::File {
            file: self.files.known_hosts.clone(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDqf+EOFzIqNmFX6iLKpOu/o6Sh1AI1wW6YNF3MxWpBq";
    const B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIE7flXTMZHql076Mfwr9+Q2mBPkyvQdHqVvP97qegTc";

    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBD30qtHtKpLzPsmSIkd9tzCfsBIaXRdzJcELjC3FzKmRDCOgRl1aX/+/J8V5gIEMWrY+siaFGkCXFgjuPo/SYNk=";

    fn files(dir: &std::path::Path) -> LeaseFiles {
        LeaseFiles::new(dir, "lab")
    }

    #[test]
    fn tofu_learns_then_refuses_a_changed_key() {
        let tmp = tempfile::tempdir().unwrap();
        let hk = HostKeys::new("lab", files(tmp.path()), None).unwrap();
        let a = PublicKey::from_openssh(A).unwrap();
        let b = PublicKey::from_openssh(B).unwrap();
        assert_eq!(hk.check(&a).unwrap(), Accepted::Learned);
        assert_eq!(hk.check(&a).unwrap(), Accepted::Known);
        let f = files(tmp.path()).known_hosts;
        assert_eq!(pfs::mode_of(&f).unwrap() & 0o777, 0o600);
        let err = hk.check(&b).unwrap_err().to_string();
        assert!(err.contains("changed"), "{err}");
        assert!(err.contains(&f.display().to_string()), "{err}");
        assert!(err.contains("ssh-keygen -f"), "{err}");
    }

    #[test]
    fn a_key_of_another_algorithm_is_a_changed_key_not_a_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        let f = files(tmp.path());
        // An ed25519 entry under the alias (with an unrelated host before
        // it), as a first connection records it.
        let recorded = format!("other-host {B}\n{} {A}\n", f.alias);
        std::fs::create_dir_all(&f.dir).unwrap();
        std::fs::write(&f.known_hosts, &recorded).unwrap();
        let hk = HostKeys::new("lab", f.clone(), None).unwrap();
        let ecdsa = PublicKey::from_openssh(ECDSA).unwrap();
        let err = hk.check(&ecdsa).unwrap_err();
        assert!(
            matches!(&err, HostKeyError::Changed { line: 2, .. }),
            "{err:?}"
        );
        let err = err.to_string();
        assert!(err.contains("changed"), "{err}");
        assert!(err.contains("ssh-keygen -f"), "{err}");
        // Nothing was recorded, and the recorded key still works.
        assert_eq!(std::fs::read_to_string(&f.known_hosts).unwrap(), recorded);
        let a = PublicKey::from_openssh(A).unwrap();
        assert_eq!(hk.check(&a).unwrap(), Accepted::Known);
        // Another host's entry does not count as one for this alias.
        std::fs::write(&f.known_hosts, format!("other-host {A}\n")).unwrap();
        assert_eq!(hk.check(&ecdsa).unwrap(), Accepted::Learned);
        assert_eq!(hk.check(&ecdsa).unwrap(), Accepted::Known);
        assert!(matches!(
            hk.check(&a).unwrap_err(),
            HostKeyError::Changed { line: 2, .. }
        ));
    }

    #[test]
    fn a_pin_is_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let hk = HostKeys::new("lab", files(tmp.path()), Some(A)).unwrap();
        let a = PublicKey::from_openssh(A).unwrap();
        let b = PublicKey::from_openssh(B).unwrap();
        assert_eq!(hk.check(&a).unwrap(), Accepted::Pinned);
        let err = hk.check(&b).unwrap_err().to_string();
        assert!(err.contains("does not match the key pinned"), "{err}");
        assert!(!err.contains("AAAA"), "no key material in errors: {err}");
        hk.install_pin().unwrap();
        let text = std::fs::read_to_string(files(tmp.path()).known_hosts).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(HostKeys::new("lab", files(tmp.path()), Some("ssh-ed25519 !!")).is_err());
    }
}
