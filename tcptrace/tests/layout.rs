//! The layout rules, checked on the sources: data flows one way between the stage folders
//! (a stage imports only the stages before it) and no source file outside tests grows past
//! about 600 lines.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// Stages in the order data flows; a stage may import only stages of a lower rank. Stages of the
/// same rank do not import each other.
const STAGES: &[(&str, u32)] = &[
    ("kernel", 0),
    ("host", 0),
    ("state", 1),
    ("tracer", 2),
    ("views", 3),
    ("daemon", 4),
];

const MAX_LINES: usize = 600;

fn rank(stage: &str) -> Option<u32> {
    STAGES.iter().find(|(s, _)| *s == stage).map(|(_, r)| *r)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The crate's top-level modules a file refers to: `crate::x` anywhere, and the first segment
/// of each item of a `use crate::{x::.., y, ..}` group.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at depth-0 commas.
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        refs.insert(ident(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        refs.insert(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            refs.insert(ident(rest));
        }
    }
    refs.remove("");
    refs
}

/// Lines of a file outside its `#[cfg(test)] mod tests` (by convention, the end of the file).
fn code_lines(text: &str) -> usize {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    code.lines().count()
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn stages_import_only_earlier_stages() {
    let src = src_dir();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let stage = first.trim_end_matches(".rs");
        let Some(own) = rank(stage) else {
            // lib.rs and main.rs sit above every stage.
            assert!(
                matches!(stage, "lib" | "main"),
                "{}: a file outside the stage folders; add its stage to STAGES",
                rel.display()
            );
            continue;
        };
        checked += 1;
        let text = fs::read_to_string(f).unwrap();
        for r in crate_refs(&text) {
            let Some(theirs) = rank(&r) else {
                violations.push(format!("{}: refers to unknown crate::{r}", rel.display()));
                continue;
            };
            if r != stage && theirs >= own {
                violations.push(format!(
                    "{}: stage `{stage}` imports `{r}`, which is not an earlier stage",
                    rel.display()
                ));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} files found under {}",
        src.display()
    );
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn no_source_file_over_600_lines_outside_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for dir in [
        "tcptrace/src",
        "tcptrace-common/src",
        "tcptrace-ebpf/src",
        "xtask/src",
    ] {
        sources(&root.join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "tests.rs"))
        .filter_map(|f| {
            let n = code_lines(&fs::read_to_string(f).unwrap());
            (n > MAX_LINES).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these files: {long:#?}");
}

#[test]
fn the_checker_sees_what_it_must() {
    let refs = crate_refs(
        "use crate::{\n    kernel::event::{A, B},\n    state::{Table, TableConfig},\n    views,\n};\n\
         let x = crate::daemon::logfmt::line();",
    );
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        vec!["daemon", "kernel", "state", "views"]
    );
    assert_eq!(code_lines("a\nb\n#[cfg(test)]\nmod tests {\n}\n"), 2);
}
