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
    &["python"],
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

/// The top-level modules that code names through `crate::`, each with the line it is named on
/// (1-based). Comments are skipped; a group `crate::{a::X, b::{Y, Z}}` names `a` and `b`, also
/// when rustfmt spreads it over several lines.
fn uses(code: &str) -> Vec<(String, usize)> {
    let code: String = code
        .lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let line_at = |at: usize| code[..at].matches('\n').count() + 1;
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("crate::") {
        let start = from + at + "crate::".len();
        from = start;
        let rest = &code[start..];
        let Some(group) = rest.strip_prefix('{') else {
            found.push((ident(rest), line_at(start)));
            continue;
        };
        // Items of the group at its top level: split at commas outside inner braces.
        let (mut depth, mut item_start) = (0usize, 0usize);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth > 0 => depth -= 1,
                ',' | '}' if depth == 0 => {
                    let at = start + 1 + item_start;
                    let name = ident(&group[item_start..i]);
                    let lead = group[item_start..i].len() - group[item_start..i].trim_start().len();
                    if !name.is_empty() {
                        found.push((name, line_at(at + lead)));
                    }
                    item_start = i + 1;
                    if c == '}' {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    found
}

#[test]
fn the_import_scan_finds_paths_groups_and_groups_over_several_lines() {
    let code = "use crate::base::lock; // crate::ssh in a comment\n\
                let x = crate::wire::Frame::new();\n\
                use crate::{\n    transport::{Transport, Sink},\n    core::Config,\n};\n";
    assert_eq!(
        uses(code),
        [
            ("base".to_string(), 1),
            ("wire".to_string(), 2),
            ("transport".to_string(), 4),
            ("core".to_string(), 5),
        ]
    );
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
        for (used, line) in uses(code) {
            if used == module {
                continue;
            }
            // Items the crate root re-exports are named by their own module instead.
            let Some(theirs) = layer_of(&used) else {
                wrong.push(format!(
                    "src/{}:{line}: `crate::{used}` is not a layer's module",
                    rel.display(),
                ));
                continue;
            };
            if theirs >= own {
                wrong.push(format!(
                    "src/{}:{line}: {module} (layer {own}) uses {used} (layer {theirs})",
                    rel.display(),
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}
