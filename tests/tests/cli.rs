//! The command line's generated companions: shell completions and the manual page (no root
//! needed).

use std::process::Command;

use tcptrace_tests::tcptrace_bin;

fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(tcptrace_bin())
        .args(args)
        .output()
        .expect("run tcptrace");
    assert!(out.status.success(), "tcptrace {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn bash_completions_are_valid_bash_and_know_the_commands() {
    let script = stdout_of(&["completions", "bash"]);
    for word in [
        "watch", "daemon", "report", "status", "--events", "--state", "--socket",
    ] {
        assert!(script.contains(word), "{word} missing from the completions");
    }
    // Syntax check only (`bash -n`): the script defines a function and registers it.
    let dir = std::env::temp_dir().join(format!("tcptrace-completions-{}", std::process::id()));
    std::fs::write(&dir, &script).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&dir)
        .output()
        .expect("bash");
    let _ = std::fs::remove_file(&dir);
    assert!(check.status.success(), "bash -n: {check:?}");
    for shell in ["zsh", "fish"] {
        assert!(
            stdout_of(&["completions", shell]).contains("watch"),
            "{shell}"
        );
    }
}

#[test]
fn manual_page_is_roff_naming_every_command() {
    let page = stdout_of(&["man"]);
    assert!(
        page.contains(".TH tcptrace 1"),
        "{}",
        &page[..page.len().min(300)]
    );
    for word in ["watch", "daemon", "report", "status", "completions"] {
        assert!(page.contains(word), "{word} missing from the manual page");
    }
}

#[test]
fn unknown_shell_is_one_clear_error() {
    let out = Command::new(tcptrace_bin())
        .args(["completions", "tcsh"])
        .output()
        .expect("run tcptrace");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'tcsh'") && err.contains("bash, elvish, fish, powershell, zsh"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
