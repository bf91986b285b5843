//! `--user` / `--group`: who the workers run as, resolved once at startup
//! (names need NSS, which is not async-signal-safe: never between fork and
//! exec, see `spawn`).

use std::ffi::{CStr, CString};

use anyhow::{bail, Result};

/// The identity every worker process takes before exec.
#[derive(Clone, Debug)]
pub struct RunAs {
    /// As given (a name or a number), for messages.
    pub user: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups as `initgroups(3)` sets them (the user's groups
    /// from the group database, plus `gid`).
    pub groups: Vec<libc::gid_t>,
}

impl RunAs {
    /// `--user NAME|UID [--group NAME|GID]`. Without `--group`, the user's
    /// primary group. A number without a passwd entry needs `--group`.
    pub fn resolve(user: &str, group: Option<&str>) -> Result<RunAs> {
        let entry = match user.parse::<libc::uid_t>() {
            Ok(uid) => passwd_by_uid(uid).or(Some(Passwd {
                name: None,
                uid,
                gid: None,
            })),
            Err(_) => passwd_by_name(user),
        };
        let Some(entry) = entry else {
            bail!("no such user `{user}` (--user): give an existing user name or a numeric uid")
        };
        let gid = match group {
            Some(g) => resolve_group(g)?,
            None => match entry.gid {
                Some(gid) => gid,
                None => bail!("uid {user} has no passwd entry, so no primary group: pass --group"),
            },
        };
        let groups = match &entry.name {
            Some(name) => group_list(name, gid),
            None => vec![gid],
        };
        Ok(RunAs {
            user: user.to_owned(),
            uid: entry.uid,
            gid,
            groups,
        })
    }
}

/// An adopted worker keeps running as whatever it runs as (a process's
/// identity cannot be changed from outside); its replacements take
/// `--user`. Says so when they differ.
pub fn note_adopted(index: usize, pid: u32, who: &RunAs) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse::<libc::uid_t>().ok());
    if let Some(uid) = uid.filter(|&uid| uid != who.uid) {
        crate::log!(
            "adopted worker {index} (pid {pid}) runs as uid {uid}, not --user {}: it keeps running as it is; its replacement will run as {}",
            who.user,
            who.user
        );
    }
}

struct Passwd {
    name: Option<CString>,
    uid: libc::uid_t,
    gid: Option<libc::gid_t>,
}

fn resolve_group(group: &str) -> Result<libc::gid_t> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let Ok(name) = CString::new(group) else {
        bail!("no such group `{group}` (--group)")
    };
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: getgrnam_r writes into grp and buf (its length given) only.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        bail!("no such group `{group}` (--group): give an existing group name or a numeric gid");
    }
    Ok(grp.gr_gid)
}

fn passwd_by_name(name: &str) -> Option<Passwd> {
    let cname = CString::new(name).ok()?;
    lookup_passwd(|pw, buf, found| unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            found,
        )
    })
}

fn passwd_by_uid(uid: libc::uid_t) -> Option<Passwd> {
    lookup_passwd(|pw, buf, found| unsafe {
        libc::getpwuid_r(uid, pw, buf.as_mut_ptr().cast(), buf.len(), found)
    })
}

fn lookup_passwd(
    call: impl Fn(&mut libc::passwd, &mut [u8], &mut *mut libc::passwd) -> libc::c_int,
) -> Option<Passwd> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: the callers' getpw*_r write into pw and buf only.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found = std::ptr::null_mut();
    if call(&mut pw, &mut buf, &mut found) != 0 || found.is_null() {
        return None;
    }
    // SAFETY: pw_name points into buf, NUL-terminated, while buf lives.
    let name = unsafe { CStr::from_ptr(pw.pw_name) }.to_owned();
    Some(Passwd {
        name: Some(name),
        uid: pw.pw_uid,
        gid: Some(pw.pw_gid),
    })
}

/// `getgrouplist(3)`: the groups `initgroups` would set.
fn group_list(name: &CStr, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let mut count: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; count as usize];
        // SAFETY: groups has room for count entries; count is updated.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count as usize);
            return groups;
        }
        if count as usize <= groups.len() {
            return vec![gid]; // should not happen; initgroups' minimum
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RunAs;

    #[test]
    fn resolves_names_and_numbers() {
        let root = RunAs::resolve("root", None).unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        let numeric = RunAs::resolve("0", Some("0")).unwrap();
        assert_eq!((numeric.uid, numeric.gid), (0, 0));
        // A uid with no passwd entry works with an explicit group.
        let bare = RunAs::resolve("4000000", Some("4000000")).unwrap();
        assert_eq!(
            (bare.uid, bare.gid, bare.groups),
            (4000000, 4000000, vec![4000000])
        );
        assert!(RunAs::resolve("4000000", None).is_err());
        let unknown = RunAs::resolve("no-such-user-here", None).unwrap_err();
        assert!(unknown.to_string().contains("no such user"), "{unknown}");
        assert!(RunAs::resolve("root", Some("no-such-group-here")).is_err());
    }
}
