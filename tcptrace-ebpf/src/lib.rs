#![no_std]
// The programs live in the `tcptrace` binary target (src/main.rs); this library only exists so that
// the userspace crate can name this package as a build dependency.
