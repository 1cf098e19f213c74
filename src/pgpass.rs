//! libpq's password file (`.pgpass`): a DSN without a password looks its
//! password up there at `build()`, as libpq does at connect.
//!
//! The file is the DSN's `passfile`, else `PGPASSFILE`, else `~/.pgpass`.
//! Each line is `hostname:port:database:username:password`; `*` matches
//! anything, `\` escapes `:` and `\`, `#` starts a comment; the first line
//! that matches wins. As libpq, a file that group or others can read is
//! ignored with a warning, and a missing file is no error.

use std::path::{Path, PathBuf};

/// What a line is matched against.
#[derive(Debug)]
pub(crate) struct Target<'a> {
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    pub(crate) dbname: &'a str,
    pub(crate) user: &'a str,
}

/// The file to read: `passfile`, else `PGPASSFILE`, else `$HOME/.pgpass`.
pub(crate) fn location(passfile: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = passfile {
        return Some(path.to_owned());
    }
    let from_env = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
    if let Some(path) = from_env("PGPASSFILE") {
        return Some(PathBuf::from(path));
    }
    from_env("HOME").map(|home| PathBuf::from(home).join(".pgpass"))
}

/// The password for `target` in the file at `path`, if the file exists, is
/// private to its owner and has a matching line.
pub(crate) fn lookup(path: &Path, target: &Target<'_>) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_file() {
            log::warn!(
                "password file {} is not a plain file; ignored",
                path.display()
            );
            return None;
        }
        if meta.permissions().mode() & 0o077 != 0 {
            log::warn!(
                "password file {} has group or world access; permissions should be u=rw (0600) or less; ignored",
                path.display()
            );
            return None;
        }
    }
    let text = std::fs::read_to_string(path).ok()?;
    find(&text, target)
}

/// The first matching line's password.
pub(crate) fn find(text: &str, target: &Target<'_>) -> Option<String> {
    let port = target.port.to_string();
    let wanted = [target.host, port.as_str(), target.dbname, target.user];
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(fields)
        .find(|fields| {
            fields[..4]
                .iter()
                .zip(wanted)
                .all(|(field, want)| field == "*" || field == want)
        })
        .map(|mut fields| fields.swap_remove(4))
}

/// A line's five fields, unescaped; `None` for a line with fewer.
fn fields(line: &str) -> Option<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.push(chars.next().unwrap_or('\\')),
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target<'static> {
        Target {
            host: "db1",
            port: 5432,
            dbname: "app",
            user: "svc",
        }
    }

    #[test]
    fn first_matching_line_with_wildcards_and_escapes() {
        let text = "# comment\n\
                    db2:5432:app:svc:wrong-host\n\
                    db1:5433:app:svc:wrong-port\n\
                    db1:*:app:svc:p\\:w\\\\d:x\n\
                    *:*:*:*:catch-all\n";
        assert_eq!(find(text, &target()).as_deref(), Some("p:w\\d:x"));
        assert_eq!(
            find("*:*:*:*:catch-all\n", &target()).as_deref(),
            Some("catch-all")
        );
        assert_eq!(find("db1:5432:app\n", &target()), None);
        assert_eq!(find("db1:5432:other:svc:x\n", &target()), None);
    }

    #[test]
    fn a_file_others_can_read_is_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "*:*:*:*:secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(lookup(&path, &target()), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(lookup(&path, &target()).as_deref(), Some("secret"));
        assert_eq!(lookup(&dir.path().join("missing"), &target()), None);
    }
}
