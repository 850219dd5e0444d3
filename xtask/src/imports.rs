//! `cargo xtask imports`: the import graph of each crate's modules has no cycle.
//!
//! A module is a file under a crate's `src/` (`a.rs` and `a/mod.rs` are module `a`,
//! `a/b.rs` is `a::b`). Module A imports B when a `use crate::…` or `use super::…`
//! statement in A names a path inside B. Imports between a module and its ancestors are
//! left out: a parent declares and re-exports its children, and a child uses what its
//! parent defines, which is how Rust modules nest, not a tangle.
//!
//! Not seen: paths written inline without a `use` (`crate::a::f()`), and an item imported
//! through an ancestor's re-export (`use crate::X` where the root has `pub use a::X`)
//! counts as an import of the ancestor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path from the crate root: `[]` for lib.rs, `["multi", "write"]`.
type Module = Vec<String>;

/// The crates whose `src/` is checked.
pub(crate) const CRATES: &[&str] = &[
    "capacitor-core",
    "capacitor-memory",
    "capacitor-redis",
    "capacitor-postgres",
    "capacitor-sled",
    "capacitor-redb",
    "capacitor",
    "xtask",
];

/// Every cycle found in `crate_dir/src`, each as the modules around it.
pub(crate) fn cycles(crate_dir: &Path) -> std::io::Result<Vec<Vec<String>>> {
    let src = crate_dir.join("src");
    let mut files = Vec::new();
    collect(&src, &mut files)?;
    let mut sources = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        sources.insert(module, std::fs::read_to_string(&file)?);
    }
    Ok(find_cycles(&sources))
}

/// The cycles among modules given by their sources.
pub(crate) fn find_cycles(sources: &BTreeMap<Module, String>) -> Vec<Vec<String>> {
    let modules: BTreeSet<Module> = sources.keys().cloned().collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, text) in sources {
        for path in imported_paths(module, text) {
            let Some(target) = longest_module(&modules, &path) else {
                continue;
            };
            if related(module, &target) {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    strongly_connected(&modules, &edges)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| c.iter().map(display).collect())
        .collect()
}

fn display(module: &Module) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

fn module_of(src: &Path, file: &Path) -> Option<Module> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    match stem {
        "lib" | "main" if parts.is_empty() => {}
        "mod" => {}
        _ => parts.push(stem.to_owned()),
    }
    Some(parts)
}

/// Whether one module is an ancestor of (or is) the other.
fn related(a: &Module, b: &Module) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn longest_module(modules: &BTreeSet<Module>, path: &[String]) -> Option<Module> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|candidate| modules.contains(candidate))
}

/// The absolute module paths named by the `use crate::` / `use super::` statements of
/// `module`'s source, one per leaf of a `{…}` group.
fn imported_paths(module: &Module, text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for statement in use_statements(text) {
        let (base, rest) = if let Some(rest) = statement.strip_prefix("crate::") {
            (Vec::new(), rest)
        } else if statement.starts_with("super::") {
            let mut base = module.clone();
            let mut rest = statement.as_str();
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
            (base, rest)
        } else {
            continue;
        };
        for leaf in expand(rest) {
            let mut path = base.clone();
            path.extend(leaf);
            out.push(path);
        }
    }
    out
}

/// The text of each `use` statement (between `use` and `;`, whitespace removed), comments
/// and `pub(…)` left out.
fn use_statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.split("//").next().unwrap_or("").trim();
        if let Some(buf) = current.as_mut() {
            buf.push_str(line);
        } else {
            let rest = line
                .strip_prefix("pub(crate) ")
                .or_else(|| line.strip_prefix("pub(super) "))
                .or_else(|| line.strip_prefix("pub "))
                .unwrap_or(line);
            if let Some(body) = rest.strip_prefix("use ") {
                current = Some(body.to_owned());
            }
        }
        if let Some(buf) = current.take() {
            if let Some(end) = buf.find(';') {
                // `x as y` keeps `x`: the alias names nothing in the graph.
                let body: String = buf[..end]
                    .split(" as ")
                    .enumerate()
                    .map(|(i, part)| {
                        if i == 0 {
                            part
                        } else {
                            part.trim_start()
                                .trim_start_matches(|c: char| c.is_alphanumeric() || c == '_')
                        }
                    })
                    .collect();
                out.push(body.chars().filter(|c| !c.is_whitespace()).collect());
            } else {
                current = Some(buf);
            }
        }
    }
    out
}

/// The paths of a use tree: `a::{b, c::d}` is `[a, b]`, `[a, c, d]`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let Some(open) = tree.find('{') else {
        let path: Vec<String> = tree
            .split("::")
            .map(str::to_owned)
            .filter(|s| !s.is_empty() && s != "*" && s != "self")
            .collect();
        return vec![path];
    };
    let prefix: Vec<String> = tree[..open]
        .trim_end_matches("::")
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let inner = tree[open + 1..].strip_suffix('}').unwrap_or(&tree[open + 1..]);
    let mut out = Vec::new();
    for part in split_top(inner) {
        for mut leaf in expand(&part) {
            let mut path = prefix.clone();
            path.append(&mut leaf);
            out.push(path);
        }
    }
    out
}

/// Splits on the commas outside braces.
fn split_top(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
}

/// Tarjan's strongly connected components.
fn strongly_connected(
    modules: &BTreeSet<Module>,
    edges: &BTreeMap<Module, BTreeSet<Module>>,
) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(targets) = s.edges.get(v) {
            for w in targets {
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(lw));
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(iw));
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            component.sort();
            s.out.push(component);
        }
    }
    let mut state = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for m in modules {
        if !state.index.contains_key(m) {
            visit(&mut state, m);
        }
    }
    state.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: &str) -> Module {
        path.split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_cycle_between_siblings_is_found_and_nesting_is_not_one() {
        let mut sources = BTreeMap::new();
        sources.insert(
            m(""),
            "mod config;\nmod layer;\npub use layer::Layer;\n".to_owned(),
        );
        sources.insert(
            m("config"),
            "use crate::layer::{Shared, Layer as L};\nuse crate::Error;\n".to_owned(),
        );
        sources.insert(m("layer"), "use crate::{\n    config::Builder,\n};\n".to_owned());
        sources.insert(m("multi"), "mod write;\nuse write::Fill;\n".to_owned());
        sources.insert(m("multi::write"), "use super::{Inner, Slot};\n".to_owned());
        assert_eq!(
            find_cycles(&sources),
            vec![vec!["config".to_owned(), "layer".to_owned()]]
        );

        sources.insert(m("layer"), "use crate::error::Error;\n".to_owned());
        assert!(find_cycles(&sources).is_empty());
    }

    #[test]
    fn an_aliased_module_is_still_an_import() {
        let paths = imported_paths(&m("a"), "use crate::b as bee;\nuse crate::{c::D as E, f};");
        assert_eq!(paths, vec![m("b"), m("c::D"), m("f")]);
    }

    #[test]
    fn super_paths_climb_from_the_module() {
        let paths = imported_paths(
            &m("multi::write"),
            "use super::super::codec::{Codec, envelope::wrap};",
        );
        assert_eq!(paths, vec![m("codec::Codec"), m("codec::envelope::wrap")]);
    }

    #[test]
    fn the_workspace_has_no_import_cycle() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for krate in CRATES {
            let found = cycles(&root.join(krate)).unwrap_or_else(|e| panic!("{krate}: {e}"));
            assert!(found.is_empty(), "{krate}: {found:?}");
        }
    }
}
