//! Linux errno names for the errors `connect()` and TCP sockets report.

/// (errno, name) for every error a TCP connect can plausibly return (values from libc).
const NAMES: &[(i32, &str)] = &[
    (libc::EPERM, "EPERM"),
    (libc::EINTR, "EINTR"),
    (libc::EBADF, "EBADF"),
    (libc::EAGAIN, "EAGAIN"),
    (libc::ENOMEM, "ENOMEM"),
    (libc::EACCES, "EACCES"),
    (libc::EFAULT, "EFAULT"),
    (libc::EINVAL, "EINVAL"),
    (libc::EMFILE, "EMFILE"),
    (libc::EPIPE, "EPIPE"),
    (libc::ENOTSOCK, "ENOTSOCK"),
    (libc::EPROTOTYPE, "EPROTOTYPE"),
    (libc::EAFNOSUPPORT, "EAFNOSUPPORT"),
    (libc::EADDRINUSE, "EADDRINUSE"),
    (libc::EADDRNOTAVAIL, "EADDRNOTAVAIL"),
    (libc::ENETDOWN, "ENETDOWN"),
    (libc::ENETUNREACH, "ENETUNREACH"),
    (libc::ECONNABORTED, "ECONNABORTED"),
    (libc::ECONNRESET, "ECONNRESET"),
    (libc::ENOBUFS, "ENOBUFS"),
    (libc::EISCONN, "EISCONN"),
    (libc::ETIMEDOUT, "ETIMEDOUT"),
    (libc::ECONNREFUSED, "ECONNREFUSED"),
    (libc::EHOSTDOWN, "EHOSTDOWN"),
    (libc::EHOSTUNREACH, "EHOSTUNREACH"),
    (libc::EALREADY, "EALREADY"),
    (libc::EINPROGRESS, "EINPROGRESS"),
    (libc::ECANCELED, "ECANCELED"),
];

pub const EINPROGRESS: i32 = libc::EINPROGRESS;
pub const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

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
    matches!(
        errno,
        libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::EISCONN
            | libc::ETIMEDOUT
            | libc::ECONNREFUSED
            | libc::EALREADY
            | libc::EINPROGRESS
    )
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
