//! Linux errno names for the errors `connect()` and TCP sockets report.

/// (errno, name) for every error a TCP connect can plausibly return.
const NAMES: &[(i32, &str)] = &[
    (1, "EPERM"),
    (4, "EINTR"),
    (9, "EBADF"),
    (11, "EAGAIN"),
    (12, "ENOMEM"),
    (13, "EACCES"),
    (14, "EFAULT"),
    (22, "EINVAL"),
    (24, "EMFILE"),
    (32, "EPIPE"),
    (88, "ENOTSOCK"),
    (91, "EPROTOTYPE"),
    (97, "EAFNOSUPPORT"),
    (98, "EADDRINUSE"),
    (99, "EADDRNOTAVAIL"),
    (100, "ENETDOWN"),
    (101, "ENETUNREACH"),
    (103, "ECONNABORTED"),
    (104, "ECONNRESET"),
    (105, "ENOBUFS"),
    (106, "EISCONN"),
    (110, "ETIMEDOUT"),
    (111, "ECONNREFUSED"),
    (112, "EHOSTDOWN"),
    (113, "EHOSTUNREACH"),
    (114, "EALREADY"),
    (115, "EINPROGRESS"),
    (125, "ECANCELED"),
];

pub const EINPROGRESS: i32 = 115;
pub const EADDRNOTAVAIL: i32 = 99;

/// The symbolic name of a positive errno, or `E<number>` for one not in the table.
pub fn name(errno: i32) -> std::borrow::Cow<'static, str> {
    match NAMES.iter().find(|(n, _)| *n == errno) {
        Some((_, s)) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(format!("E{errno}")),
    }
}

/// Errors that a connect() on a socket that never changed state can only report when an earlier
/// non-blocking attempt failed (already counted from its error report), or that are not failures.
pub fn is_repeat_or_not_failure(errno: i32) -> bool {
    matches!(errno, 103 | 104 | 106 | 110 | 111 | 114 | 115)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name(99), "EADDRNOTAVAIL");
        assert_eq!(name(111), "ECONNREFUSED");
        assert_eq!(name(4242), "E4242");
    }
}
