//! The layers of `src/` import one way only: each top-level module may use modules of lower
//! layers, never a higher one nor a sibling of its own layer. This test reads the sources and
//! fails, naming the file and the line, when an arrow points the wrong way.

use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may use those of earlier rows only.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["base"],
    &["wire"],
    &["transport"],
    &["auth"],
    &["tls", "ssh"],
    &["core"],
    &["client", "server"],
    &["testing"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|row| row.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a line of code names through `crate::` (comments are skipped).
fn uses(line: &str) -> Vec<String> {
    let code = line.trim_start();
    if code.starts_with("//") {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push(name);
            }
        } else {
            found.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    found
}

#[test]
fn imports_between_the_layers_of_src_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" {
            continue; // the crate root re-exports every layer
        }
        let own = layer_of(&module)
            .unwrap_or_else(|| panic!("src/{} is in no layer: add it to LAYERS", rel.display()));
        let text = std::fs::read_to_string(file).unwrap();
        // Unit tests at the end of a file may use anything.
        let code = text.split("#[cfg(test)]\nmod tests {").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            for used in uses(line) {
                if used == module || used.is_empty() {
                    continue;
                }
                // Items the crate root re-exports are named by their own module instead.
                let Some(theirs) = layer_of(&used) else {
                    wrong.push(format!(
                        "src/{}:{}: `crate::{used}` is not a layer's module",
                        rel.display(),
                        n + 1
                    ));
                    continue;
                };
                if theirs >= own {
                    wrong.push(format!(
                        "src/{}:{}: {module} (layer {own}) uses {used} (layer {theirs})",
                        rel.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}
