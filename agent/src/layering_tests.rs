//! The module layering, checked on the source text: imports point only down the layers (see
//! `STYLE.md`, rule 12). A lower module that needs a type from a higher one means the type lives
//! in the wrong place: move it down rather than add the reference.
//!
//! Each `agent/src/**.rs` file's `crate::…` (and `super::…` that leaves its top-level module)
//! references are read, outside comments and test code (`#[cfg(test)]` modules, `tests.rs`,
//! `*_tests.rs`), and each must name a module in the same layer or one below.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// The layers, lowest first. Every top-level module must be in one.
const LAYERS: &[(&str, &[&str])] = &[
    // Plain types and hooks every layer may use: the task contract, host paths, the kernel
    // and filesystem helpers, the test-only fault hooks.
    (
        "types",
        &[
            "paths",
            "task",
            "containers",
            "notify",
            "ebpf",
            "probe",
            "fault",
        ],
    ),
    // Runs tasks and restarts them; it applies a fault's back-off, never the other way round.
    ("supervisor", &["supervise"]),
    ("store", &["store"]),
    ("sources", &["sources"]),
    ("bridge", &["bridge"]),
    ("health", &["health"]),
    ("outputs", &["api", "metrics", "client", "kube"]),
    // The root config gathers every layer's own section, so it sits above them all; each layer
    // is handed its section, never the root.
    ("config", &["config"]),
    ("daemon", &["daemon", "reload", "logging", "verify", "cli"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// The source with comments, string literals and `#[cfg(test)]` items blanked out.
fn product_code(text: &str) -> String {
    let without_comments = strip_comments_and_strings(text);
    strip_test_items(&without_comments)
}

fn strip_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'"' {
            // A raw string's `r#"` leaves `r#` behind: harmless for finding paths.
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal such as '"' or '\n' (not a lifetime).
            let end = b[i + 1..]
                .iter()
                .skip(1)
                .position(|&c| c == b'\'')
                .map_or(b.len(), |p| i + 2 + p + 1);
            i = end;
            out.push_str("' '");
        } else {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Removes each item under `#[cfg(test)]` or `#[cfg(all(test, ...))]`: a `mod x { ... }` block
/// or a `mod x;` line.
fn strip_test_items(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_test_attr(rest) {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        // The item ends at its `;` or at the `}` that closes its first `{`.
        let mut depth = 0usize;
        let mut end = item.len();
        for (i, c) in item.char_indices() {
            match c {
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

fn find_test_attr(text: &str) -> Option<usize> {
    ["#[cfg(test)]", "#[cfg(all(test"]
        .iter()
        .filter_map(|a| text.find(a))
        .min()
}

/// The top-level modules that `code` (in module `path`, e.g. `["api", "service"]`) refers to.
fn referenced_modules(code: &str, path: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    // Inline `mod x { ... }` blocks open at these brace depths: `super` inside one stays in
    // the file's module.
    let mut inline_mods: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !is_ident(bytes[i - 1]);
        let path_from = |at: usize, found: &mut Vec<String>| -> usize {
            if code[at..].starts_with('{') {
                let close = matching_brace(&code[at..]).map_or(code.len(), |c| at + c);
                found.extend(top_level_names(&code[at + 1..close]));
                close
            } else {
                found.push(ident_at(&code[at..]).to_owned());
                at
            }
        };
        if starts_word && code[i..].starts_with("crate::") {
            i = path_from(i + "crate::".len(), &mut found);
        } else if starts_word && code[i..].starts_with("super::") {
            let mut ups = 0;
            while code[i..].starts_with("super::") {
                ups += 1;
                i += "super::".len();
            }
            // `super` from a top-level module's file (or beyond) is the crate root.
            if ups >= path.len() + inline_mods.len() {
                i = path_from(i, &mut found);
            }
        } else if starts_word && code[i..].starts_with("mod ") {
            let after = &code[i + "mod ".len()..];
            let name = ident_at(after.trim_start());
            let rest = after.trim_start()[name.len()..].trim_start();
            if !name.is_empty() && rest.starts_with('{') {
                inline_mods.push(depth);
            }
            i += "mod ".len();
        } else {
            match bytes[i] {
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.saturating_sub(1);
                    if inline_mods.last() == Some(&depth) {
                        inline_mods.pop();
                    }
                }
                _ => {}
            }
            i += code[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The index of the `}` that closes the `{` at the start of `s`.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The first segment of each path in a `use` group's body: `a::b, c, d::{e, f}` → a, c, d.
fn top_level_names(group: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in group.char_indices().chain([(group.len(), ',')]) {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                let item = group[start..i].trim();
                names.push(ident_at(item).to_owned());
                start = i + 1;
            }
            _ => {}
        }
    }
    names
}

/// Every product source file under `root`, with its module path.
fn product_files(root: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "generated") {
                    dirs.push(path);
                }
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if path.extension().is_none_or(|e| e != "rs")
                || stem == "tests"
                || stem.ends_with("_tests")
            {
                continue;
            }
            let rel = path.strip_prefix(root).expect("under the root");
            let mut module: Vec<String> = rel
                .parent()
                .into_iter()
                .flat_map(Path::components)
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if stem != "mod" {
                module.push(stem.to_owned());
            }
            files.push((path, module));
        }
    }
    files.sort();
    files
}

/// The references from a lower layer to a higher one, as `file: module (layer) -> module
/// (layer)`, and the modules that are in no layer.
fn violations(root: &Path) -> (Vec<String>, Vec<String>) {
    let mut wrong = Vec::new();
    let mut unplaced = BTreeMap::new();
    for (file, module) in product_files(root) {
        let Some(top) = module.first() else {
            continue; // lib.rs, main.rs: the crate root wires everything.
        };
        if top == "main" || top == "lib" {
            continue;
        }
        let Some(from) = layer_of(top) else {
            unplaced.insert(top.clone(), ());
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
        for to_module in referenced_modules(&product_code(&text), &module) {
            // Constants and items of the crate root (`EXIT_USAGE`, ...) belong to no layer.
            if to_module.chars().next().is_some_and(char::is_uppercase) || to_module == *top {
                continue;
            }
            match layer_of(&to_module) {
                Some(to) if to > from => wrong.push(format!(
                    "{}: {top} ({}) -> {to_module} ({})",
                    file.strip_prefix(root).unwrap_or(&file).display(),
                    LAYERS[from].0,
                    LAYERS[to].0
                )),
                Some(_) => {}
                None => {
                    unplaced.insert(to_module, ());
                }
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    (wrong, unplaced.into_keys().collect())
}

#[test]
fn imports_point_only_down_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (wrong, unplaced) = violations(&root);
    assert!(
        unplaced.is_empty(),
        "modules in no layer (add them to LAYERS in {}): {unplaced:?}",
        file!()
    );
    assert!(
        wrong.is_empty(),
        "lower layers refer to higher ones (move the type down):\n{}",
        wrong.join("\n")
    );
}

/// The parser itself, on text whose references are known.
#[test]
fn references_are_read_from_code_and_not_from_comments_strings_or_tests() {
    let code = r#"
        use crate::{store::Store, sources::{tcp, Feeds}};
        use super::daemon::TaskResult;
        // crate::api is only mentioned here
        /* and crate::metrics here */
        let s = "crate::client";
        fn f() -> crate::health::Verdict { todo!() }
        #[cfg(test)]
        mod tests {
            use crate::cli;
        }
    "#;
    let mut got = referenced_modules(&product_code(code), &["bridge".to_owned()]);
    got.sort();
    assert_eq!(got, ["daemon", "health", "sources", "store"]);
    // `super` inside a nested module, or an inline one, stays within its top-level module.
    let nested = referenced_modules("use super::drain::Drain;", &["api".into(), "x".into()]);
    assert!(nested.is_empty(), "{nested:?}");
    let inline = "mod armed { use super::parse; }\nuse super::daemon;";
    assert_eq!(referenced_modules(inline, &["fault".into()]), ["daemon"]);
}

/// A reference from a lower layer to a higher one is reported, naming the file and both layers.
#[test]
fn an_upward_reference_is_reported() {
    let dir = std::env::temp_dir().join(format!("nodeward-layering-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("store")).expect("temp dir");
    std::fs::write(
        dir.join("store/mod.rs"),
        "use crate::supervise::TaskHealth;\npub fn f(_: crate::daemon::TaskResult) {}\n",
    )
    .expect("write");
    std::fs::write(dir.join("newthing.rs"), "use crate::store::Store;\n").expect("write");
    let (wrong, unplaced) = violations(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(wrong, ["store/mod.rs: store (store) -> daemon (daemon)"]);
    assert_eq!(unplaced, ["newthing"]);
}
