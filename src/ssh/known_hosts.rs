//! Host key verification against OpenSSH `known_hosts` files.
//!
//! The files are read line by line here rather than by libssh2, whose reader stops at the
//! first line it cannot parse and which cannot say on which line a changed key sits. Plain
//! (`host`, `[host]:port`, `*` and `?` wildcards, `!` negation) and hashed (`|1|salt|hash`)
//! host fields are understood; `@revoked` keys are refused; `@cert-authority` lines vouch
//! for no plain key, but are remembered so that a host only they cover is refused with a
//! message naming the line (libssh2 cannot verify host certificates; the OpenSSH transport
//! can). New keys are appended, never by rewriting
//! the file, so comments and unknown lines survive.

use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::Signer;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One usable line of a known_hosts file.
#[derive(Debug)]
struct Entry {
    file: PathBuf,
    line: usize,
    revoked: bool,
    /// `@cert-authority`: the key signs host certificates; it is no host's key itself.
    authority: bool,
    hosts: String,
    key_type: String,
    key: Vec<u8>,
}

/// What the files say about a host's key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The key is listed for this host.
    Known,
    /// This host has a different key of the same type, at `file:line`.
    Changed { file: PathBuf, line: usize },
    /// The key is marked `@revoked` at `file:line`.
    Revoked { file: PathBuf, line: usize },
    /// No key of this type is listed for the host; `other_types` are the types that are, and
    /// `authority` the first `@cert-authority` line that covers the host, if any.
    Unknown {
        other_types: Vec<String>,
        authority: Option<(PathBuf, usize)>,
    },
}

/// The known_hosts entries of some files, ready to check keys against.
#[derive(Debug, Default)]
pub(crate) struct KnownHosts {
    entries: Vec<Entry>,
}

impl KnownHosts {
    /// Reads `files`; missing files count as empty, unparsable lines are skipped.
    pub(crate) fn load(files: &[PathBuf]) -> KnownHosts {
        let mut entries = Vec::new();
        for file in files {
            let text = match fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        log::warn!("known_hosts: cannot read {}: {e}", file.display());
                    }
                    continue;
                }
            };
            for (i, line) in text.lines().enumerate() {
                if let Some(e) = parse_line(file, i + 1, line) {
                    entries.push(e);
                }
            }
        }
        KnownHosts { entries }
    }

    /// The key types listed for `host` (on `port`), in file order, without repeats.
    pub(crate) fn key_types(&self, host: &str, port: u16) -> Vec<String> {
        let name = host_field(host, port);
        let mut types: Vec<String> = Vec::new();
        for e in self
            .entries
            .iter()
            .filter(|e| !e.revoked && !e.authority && host_matches(&e.hosts, &name))
        {
            if !types.contains(&e.key_type) {
                types.push(e.key_type.clone());
            }
        }
        types
    }

    /// Checks the server's public key `blob` for `host` on `port`.
    pub(crate) fn check(&self, host: &str, port: u16, blob: &[u8]) -> Verdict {
        let name = host_field(host, port);
        let key_type = blob_key_type(blob).unwrap_or_default();
        let mut changed = None;
        let mut other_types = Vec::new();
        let mut known = false;
        let mut authority = None;
        for e in &self.entries {
            if e.authority {
                if host_matches(&e.hosts, &name) {
                    authority.get_or_insert((e.file.clone(), e.line));
                }
                continue;
            }
            if e.revoked {
                if e.key == blob {
                    return Verdict::Revoked {
                        file: e.file.clone(),
                        line: e.line,
                    };
                }
                continue;
            }
            if !host_matches(&e.hosts, &name) {
                continue;
            }
            if e.key == blob {
                known = true;
            } else if e.key_type == key_type {
                changed.get_or_insert((e.file.clone(), e.line));
            } else if !other_types.contains(&e.key_type) {
                other_types.push(e.key_type.clone());
            }
        }
        match (known, changed) {
            (true, _) => Verdict::Known,
            (false, Some((file, line))) => Verdict::Changed { file, line },
            (false, None) => Verdict::Unknown {
                other_types,
                authority,
            },
        }
    }
}

fn parse_line(file: &Path, line: usize, text: &str) -> Option<Entry> {
    let text = text.trim();
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    let mut fields = text.split_whitespace();
    let mut first = fields.next()?;
    let (mut revoked, mut authority) = (false, false);
    if let Some(marker) = first.strip_prefix('@') {
        match marker {
            "revoked" => revoked = true,
            "cert-authority" => authority = true,
            _ => return None,
        }
        first = fields.next()?;
    }
    let key_type = fields.next()?.to_string();
    let key = openssl::base64::decode_block(fields.next()?).ok()?;
    if blob_key_type(&key).as_deref() != Some(key_type.as_str()) {
        log::debug!(
            "known_hosts: {}:{line}: key does not match its type {key_type}; skipped",
            file.display()
        );
        return None;
    }
    Some(Entry {
        file: file.to_path_buf(),
        line,
        revoked,
        authority,
        hosts: first.to_string(),
        key_type,
        key,
    })
}

/// How OpenSSH writes a host in known_hosts: `host`, or `[host]:port` off port 22.
pub(crate) fn host_field(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

/// Whether the comma-separated patterns (or one hashed name) of a line match `name`.
fn host_matches(patterns: &str, name: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        let Some((salt, hash)) = hashed.split_once('|') else {
            return false;
        };
        let (Ok(salt), Ok(hash)) = (
            openssl::base64::decode_block(salt),
            openssl::base64::decode_block(hash),
        ) else {
            return false;
        };
        return hmac_sha1(&salt, name.as_bytes()).is_some_and(|h| h == hash);
    }
    let mut matched = false;
    for p in patterns.split(',') {
        let (negated, p) = match p.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, p),
        };
        if glob(&p.to_ascii_lowercase(), name) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// `*` and `?` wildcards, as in OpenSSH's `match_pattern`.
fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

fn hmac_sha1(key: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let pkey = PKey::hmac(key).ok()?;
    let mut signer = Signer::new(MessageDigest::sha1(), &pkey).ok()?;
    signer.update(data).ok()?;
    signer.sign_to_vec().ok()
}

/// The key type named at the start of an SSH public key blob (`ssh-ed25519`, ...).
pub(crate) fn blob_key_type(blob: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4 + len)?;
    String::from_utf8(name.to_vec()).ok()
}

/// OpenSSH's fingerprint of a key: `SHA256:` and the unpadded base64 of its SHA-256.
pub(crate) fn fingerprint(blob: &[u8]) -> String {
    let b64 = openssl::base64::encode_block(&openssl::sha::sha256(blob));
    format!("SHA256:{}", b64.trim_end_matches('='))
}

/// How OpenSSH names a key type in messages: `ED25519`, `RSA`, `ECDSA`.
pub(crate) fn key_type_label(key_type: &str) -> String {
    match key_type {
        "ssh-ed25519" => "ED25519".into(),
        "ssh-rsa" => "RSA".into(),
        "ssh-dss" => "DSA".into(),
        t if t.starts_with("ecdsa-") => "ECDSA".into(),
        t => t.to_string(),
    }
}

/// The host key algorithms that can produce a key of `key_type`, for `method_pref(HostKey)`.
pub(crate) fn algorithms_for(key_type: &str) -> &'static [&'static str] {
    match key_type {
        "ssh-ed25519" => &["ssh-ed25519"],
        "ecdsa-sha2-nistp256" => &["ecdsa-sha2-nistp256"],
        "ecdsa-sha2-nistp384" => &["ecdsa-sha2-nistp384"],
        "ecdsa-sha2-nistp521" => &["ecdsa-sha2-nistp521"],
        "ssh-rsa" => &["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
        "ssh-dss" => &["ssh-dss"],
        _ => &[],
    }
}

/// Appends a line for `host`/`port` with key `blob` to `file` (hashed if `hash`), creating the
/// file (and its directory, mode 0700) if needed.
pub(crate) fn append(
    file: &Path,
    host: &str,
    port: u16,
    blob: &[u8],
    hash: bool,
) -> std::io::Result<()> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    let name = host_field(host, port);
    let field = if hash {
        let mut salt = [0u8; 20];
        openssl::rand::rand_bytes(&mut salt).map_err(std::io::Error::other)?;
        let h = hmac_sha1(&salt, name.as_bytes())
            .ok_or_else(|| std::io::Error::other("HMAC-SHA1 failed"))?;
        format!(
            "|1|{}|{}",
            openssl::base64::encode_block(&salt),
            openssl::base64::encode_block(&h)
        )
    } else {
        name
    };
    let key_type = blob_key_type(blob).unwrap_or_else(|| "unknown".into());
    let mut line = format!(
        "{field} {key_type} {}\n",
        openssl::base64::encode_block(blob)
    );
    let mut f = OpenOptions::new().create(true).append(true).open(file)?;
    let len = f.metadata()?.len();
    if len > 0 {
        // Start on a line of our own if the file does not end with a newline.
        use std::io::{Read, Seek, SeekFrom};
        let mut last = [0u8; 1];
        let mut r = fs::File::open(file)?;
        r.seek(SeekFrom::Start(len - 1))?;
        r.read_exact(&mut last)?;
        if last[0] != b'\n' {
            line.insert(0, '\n');
        }
    }
    f.write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(kind: &str, body: &[u8]) -> Vec<u8> {
        let mut b = (kind.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(kind.as_bytes());
        b.extend_from_slice(body);
        b
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        let f = dir.join("known_hosts");
        fs::write(&f, text).unwrap();
        f
    }

    #[test]
    fn plain_bracketed_hashed_and_wildcard_entries_match() {
        let dir = std::env::temp_dir().join(format!("rpyc-kh-unit-{}", std::process::id()));
        let k1 = blob("ssh-ed25519", b"one");
        let k2 = blob("ssh-ed25519", b"two");
        let b64 = |b: &[u8]| openssl::base64::encode_block(b);
        let f = write(
            &dir,
            &format!(
                "# comment\ngarbage line\nexample.org ssh-ed25519 {}\n\
                 [127.0.0.1]:2222 ssh-ed25519 {}\n*.wild.test,!bad.wild.test ssh-ed25519 {}\n",
                b64(&k1),
                b64(&k2),
                b64(&k1)
            ),
        );
        let kh = KnownHosts::load(std::slice::from_ref(&f));
        assert_eq!(kh.check("example.org", 22, &k1), Verdict::Known);
        assert_eq!(
            kh.check("example.org", 22, &k2),
            Verdict::Changed {
                file: f.clone(),
                line: 3
            }
        );
        assert_eq!(kh.check("127.0.0.1", 2222, &k2), Verdict::Known);
        assert!(matches!(
            kh.check("127.0.0.1", 22, &k2),
            Verdict::Unknown { .. }
        ));
        assert_eq!(kh.check("a.wild.test", 22, &k1), Verdict::Known);
        assert!(matches!(
            kh.check("bad.wild.test", 22, &k1),
            Verdict::Unknown { .. }
        ));
        // Appending a hashed entry makes it known, and keeps what was there.
        append(&f, "hashed.test", 2200, &k2, true).unwrap();
        let kh = KnownHosts::load(std::slice::from_ref(&f));
        assert_eq!(kh.check("hashed.test", 2200, &k2), Verdict::Known);
        assert_eq!(kh.key_types("hashed.test", 2200), vec!["ssh-ed25519"]);
        assert!(fs::read_to_string(&f).unwrap().starts_with("# comment\n"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fingerprint_has_openssh_form() {
        let fp = fingerprint(b"abc");
        assert!(fp.starts_with("SHA256:") && !fp.ends_with('='), "{fp}");
        assert_eq!(fp.len(), 7 + 43);
    }
}
