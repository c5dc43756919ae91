//! The hexagon's arrows point inward: the domain, the ports and the services never name an
//! adapter, the composition root, or a web, database or Kubernetes crate. This test reads the
//! source and fails with the offending `file:line` for each arrow that points outward.

use std::path::{Path, PathBuf};

/// Crates that belong to adapters only.
const ADAPTER_CRATES: &[&str] = &[
    "axum",
    "sqlx",
    "kube",
    "k8s_openapi",
    "reqwest",
    "hyper",
    "hyper_util",
    "tower",
    "tower_http",
];

/// Modules of this crate that the inner layers must not reach.
const OUTER_MODULES: &[&str] = &["adapters", "app"];

/// The inner layers: each module file and its directory.
const INNER_LAYERS: &[&str] = &["domain", "ports", "services"];

#[test]
fn domain_ports_and_services_never_import_adapters_app_or_io_crates() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for layer in INNER_LAYERS {
        files.push(src.join(format!("{layer}.rs")));
        collect_rust_files(&src.join(layer), &mut files);
    }
    assert!(
        files.len() > INNER_LAYERS.len(),
        "no source files found under {}",
        src.display()
    );
    let mut violations = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let shown = file
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(file);
        for (line, path) in outward_paths(&text) {
            violations.push(format!("{}:{line}: {path}", shown.display()));
        }
    }
    assert!(
        violations.is_empty(),
        "the domain, ports and services must not depend on adapters, app or {ADAPTER_CRATES:?}:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scan_catches_imports_and_qualified_paths() {
    let source = r#"
use crate::domain::ids::CommandId;
use crate::adapters::sql::PgStore;
pub use crate::app::build;
use crate::{
    domain::Validation,
    adapters::http::ApiError,
};
use super::super::adapters::local::LocalExecutor;
use axum::Json;
use ::sqlx::PgPool;
fn f() {
    let store = crate::adapters::sqlite::SqliteStore::new();
    let client = reqwest::Client::new();
    let other = crate :: adapters :: x :: Y;
}
#[derive(sqlx::FromRow)]
struct Row;
"#;
    let found: Vec<usize> = outward_paths(source)
        .into_iter()
        .map(|(line, _)| line)
        .collect();
    assert_eq!(found, [3, 4, 7, 9, 10, 11, 13, 14, 15, 17], "{found:?}");
}

#[test]
fn the_scan_ignores_comments_and_lookalike_names() {
    let source = r#"
//! Unlike `crate::adapters::http`, this module does no I/O.
use crate::domain::application::Form; // not crate::app
use crate::apply::x;
/// Mirrors `axum::Json` without depending on it.
fn tower_height() -> u32 { my_axum::x() + kube_like::y() }
fn range(first: u16) -> &'static str {
    if first == 0 { "local-use NAT64" } else { "other-use x" }
}
"#;
    assert_eq!(outward_paths(source), Vec::<(usize, String)>::new());
}

fn collect_rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// Every path in `source` that points outward, with its 1-based line: paths in expressions,
/// types and attributes, and each leaf of a `use` tree (`use crate::{adapters::x, domain}`).
fn outward_paths(source: &str) -> Vec<(usize, String)> {
    let code = strip_comments(source);
    let mut found = Vec::new();
    for (index, line) in code.lines().enumerate() {
        let compact: String = line.split_whitespace().collect::<Vec<_>>().join(" ");
        let compact = compact.replace(" ::", "::").replace(":: ", "::");
        for path in paths_in(&compact) {
            if points_outward(&path) {
                found.push((index + 1, path));
            }
        }
    }
    // A grouped `use` spreads one path over several lines; report it at the line of its leaf.
    for (line, path) in grouped_use_leaves(&code) {
        if points_outward(&path) && !found.iter().any(|(l, _)| *l == line) {
            found.push((line, path));
        }
    }
    found.sort();
    found
}

/// Source with `//` comments (doc comments included) blanked, line structure kept. String
/// literals are left alone: a path inside one would be reported, which is the safe side.
fn strip_comments(source: &str) -> String {
    source
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `a::b::c` paths written on one line (at least two segments), each starting at an
/// identifier boundary. A leading `::` is dropped.
fn paths_in(line: &str) -> Vec<String> {
    let bytes = line.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut paths = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if !is_ident(bytes[at]) || (at > 0 && is_ident(bytes[at - 1])) {
            at += 1;
            continue;
        }
        let mut end = at;
        loop {
            while end < bytes.len() && is_ident(bytes[end]) {
                end += 1;
            }
            if line[end..].starts_with("::") && bytes.get(end + 2).is_some_and(|b| is_ident(*b)) {
                end += 2;
            } else {
                break;
            }
        }
        let path = &line[at..end];
        // `use ::sqlx` compacts to `use::sqlx`: a keyword is never a path segment, drop it.
        let path = match path.split_once("::") {
            Some((first, rest)) if KEYWORDS.contains(&first) => rest,
            _ => path,
        };
        if path.contains("::") {
            paths.push(path.to_owned());
        }
        at = end.max(at + 1);
    }
    paths
}

/// Keywords that can stand right before a path (`use ::x`, `return ::x`, `dyn ::x`).
const KEYWORDS: &[&str] = &[
    "use", "pub", "return", "in", "as", "let", "mut", "ref", "move", "dyn", "impl", "where",
    "else", "match", "if", "for", "while", "break", "const", "static", "type", "unsafe", "await",
];

/// The leaves of every `use` tree with braces, each with the line it is written on.
fn grouped_use_leaves(code: &str) -> Vec<(usize, String)> {
    let mut leaves = Vec::new();
    let mut rest = code;
    let mut offset = 0;
    while let Some(start) = find_use(rest) {
        let statement_start = offset + start;
        let Some(end) = code[statement_start..].find(';') else {
            break;
        };
        let statement = &code[statement_start..statement_start + end];
        let tree_start = statement.find("use").map_or(0, |u| u + 3);
        if statement.contains('{') {
            let line_of = |position: usize| code[..position].matches('\n').count() + 1;
            expand_use_tree(
                statement,
                tree_start,
                statement.len(),
                "",
                &mut |leaf, position| leaves.push((line_of(statement_start + position), leaf)),
            );
        }
        offset = statement_start + end + 1;
        rest = &code[offset..];
    }
    leaves
}

/// The start of the next `use` keyword where a statement can begin: after `;`, a brace, an
/// attribute or a visibility, not inside an expression (so `"local-use x"` in a string is no
/// `use`).
fn find_use(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(found) = text[from..].find("use") {
        let at = from + found;
        let before = text[..at].trim_end();
        let visibility = before.ends_with("pub")
            || before
                .rfind("pub(")
                .is_some_and(|open| before.ends_with(')') && !before[open..].contains(' '));
        let before_ok = before.is_empty()
            || before.ends_with([';', '{', '}', ']'])
            || (visibility && (at == 0 || !bytes[at - 1].is_ascii_alphanumeric()));
        let after_ok = bytes.get(at + 3).is_some_and(|b| b.is_ascii_whitespace());
        if before_ok && after_ok {
            return Some(at);
        }
        from = at + 3;
    }
    None
}

/// Walks the use tree in `statement[from..to]`, calling `leaf` with each full path (whitespace
/// removed) and the position of its last segment.
fn expand_use_tree(
    statement: &str,
    from: usize,
    to: usize,
    prefix: &str,
    leaf: &mut dyn FnMut(String, usize),
) {
    let bytes = statement.as_bytes();
    let mut depth = 0;
    let mut item_start = from;
    let mut items = Vec::new();
    for (at, byte) in bytes.iter().enumerate().take(to).skip(from) {
        match byte {
            b'{' => depth += 1,
            b'}' => depth -= 1,
            b',' if depth == 0 => {
                items.push((item_start, at));
                item_start = at + 1;
            }
            _ => {}
        }
    }
    items.push((item_start, to));
    for (start, end) in items {
        let item = &statement[start..end];
        if item.trim().is_empty() {
            continue;
        }
        match (item.find('{'), item.rfind('}')) {
            (Some(open), Some(close)) => {
                let head: String = item[..open].split_whitespace().collect();
                expand_use_tree(
                    statement,
                    start + open + 1,
                    start + close,
                    &format!("{prefix}{head}"),
                    leaf,
                );
            }
            _ => {
                let unaliased = item.split(" as ").next().unwrap_or(item);
                let path: String = unaliased.split_whitespace().collect();
                let position = start + item.len() - item.trim_start().len();
                leaf(format!("{prefix}{path}"), position);
            }
        }
    }
}

fn points_outward(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_start_matches("::").split("::").collect();
    match segments.as_slice() {
        ["crate", module, ..] => OUTER_MODULES.contains(module),
        [first, ..] if ADAPTER_CRATES.contains(first) => true,
        // `super::super::adapters` from inside a layer: no inner module is named like an outer one.
        ["super", rest @ ..] => rest
            .iter()
            .find(|s| **s != "super")
            .is_some_and(|s| OUTER_MODULES.contains(s)),
        _ => false,
    }
}
