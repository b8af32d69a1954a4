//! The layering of the workspace holds: no module cycle inside any crate.
//!
//! Cargo already refuses a cycle between the crates (wire < core < host < usernet). Inside
//! a crate, this test reads every source file, resolves each `crate::`, `super::` and
//! `self::` path in the production code (test modules are left out) to the module it names,
//! and turns it into an edge between two sibling modules: a use of `crate::engine::tx::X`
//! in `engine/flows/tcp.rs` is the edge `flows -> tx` among the children of `engine`. A
//! module using its own parent or child is no edge. Any cycle among siblings fails the test
//! and names the files that make it. docs/architecture.md gives the intended order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// A module path inside a crate: `["engine", "flows", "tcp"]`; the crate root is empty.
type ModPath = Vec<String>;

/// One module-to-module reference and the file that makes it.
struct Reference {
    from: ModPath,
    to: ModPath,
    file: PathBuf,
}

fn crates_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    dir.canonicalize().unwrap_or(dir)
}

/// The module path of a source file of a crate whose sources are in `src`.
fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    match last.as_str() {
        "lib.rs" | "main.rs" | "mod.rs" => {}
        name => parts.push(name.trim_end_matches(".rs").to_string()),
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| a.path().is_ident("cfg") && a.parse_args::<syn::Meta>().is_ok_and(|m| m.path().is_ident("test")))
}

/// Collects the paths a file uses, each resolved against the module it appears in.
struct Collector {
    /// The module being visited (the file's, plus inline `mod` blocks).
    current: ModPath,
    /// Every module declared anywhere (files and inline blocks).
    modules: BTreeSet<ModPath>,
    /// (module the path appears in, absolute path it names).
    uses: Vec<(ModPath, ModPath)>,
}

impl Collector {
    /// Resolves `segments` (as written) seen in the current module; None when the path does
    /// not start at `crate`, `super` or `self`.
    fn resolve(&self, segments: &[String]) -> Option<ModPath> {
        let first = segments.first()?;
        let (mut base, rest) = match first.as_str() {
            "crate" => (Vec::new(), &segments[1..]),
            "self" => (self.current.clone(), &segments[1..]),
            "super" => {
                let mut base = self.current.clone();
                let mut rest = segments;
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
                (base, rest)
            }
            _ => return None,
        };
        base.extend(rest.iter().cloned());
        Some(base)
    }

    fn record(&mut self, segments: Vec<String>) {
        if let Some(abs) = self.resolve(&segments) {
            self.uses.push((self.current.clone(), abs));
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.record(full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                if r.ident != "self" {
                    full.push(r.ident.to_string());
                }
                self.record(full);
            }
            syn::UseTree::Glob(_) => self.record(prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Collector {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_cfg_test(&m.attrs) {
            return;
        }
        self.current.push(m.ident.to_string());
        self.modules.insert(self.current.clone());
        syn::visit::visit_item_mod(self, m);
        self.current.pop();
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_cfg_test(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if !is_cfg_test(&i.attrs) {
            syn::visit::visit_item_impl(self, i);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if !is_cfg_test(&u.attrs) {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        self.record(p.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, p);
    }
}

/// Every production reference between two modules of the crate in `src`.
fn references(src: &Path) -> (BTreeSet<ModPath>, Vec<Reference>) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut modules = BTreeSet::new();
    let mut refs = Vec::new();
    let mut per_file = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("parse {}: {e}", file.display()));
        let module = module_of(src, file);
        // A file that is itself a test module (`#[cfg(test)] mod tests;` in its parent).
        let test_file = module.last().is_some_and(|m| m == "tests" || m == "fuzz");
        modules.insert(module.clone());
        let mut c = Collector { current: module, modules: BTreeSet::new(), uses: Vec::new() };
        if !test_file {
            c.visit_file(&ast);
        }
        modules.extend(c.modules);
        per_file.push((file.clone(), c.uses));
    }
    for (file, uses) in per_file {
        for (from, abs) in uses {
            // The module a path names: its longest prefix that is a module.
            let to = (0..=abs.len()).rev().map(|n| abs[..n].to_vec()).find(|p| modules.contains(p));
            if let Some(to) = to {
                refs.push(Reference { from, to, file: file.clone() });
            }
        }
    }
    (modules, refs)
}

/// The edge a reference makes among the children of the two modules' closest common
/// ancestor, or None when one module contains the other.
fn sibling_edge(from: &ModPath, to: &ModPath) -> Option<(ModPath, String, String)> {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common == from.len() || common == to.len() {
        return None;
    }
    Some((from[..common].to_vec(), from[common].clone(), to[common].clone()))
}

/// Cycles among the siblings of each parent: each as the modules in order and the files
/// whose references make its edges.
fn cycles(refs: &[Reference]) -> Vec<String> {
    type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<PathBuf>>>;
    let mut graphs: BTreeMap<ModPath, Graph> = BTreeMap::new();
    for r in refs {
        if let Some((parent, a, b)) = sibling_edge(&r.from, &r.to) {
            graphs.entry(parent).or_default().entry(a).or_default().entry(b).or_default().insert(r.file.clone());
        }
    }
    let mut found = Vec::new();
    for (parent, graph) in &graphs {
        // Depth-first search for a back edge; each cycle reported once by its smallest node.
        let nodes: Vec<&String> = graph.keys().collect();
        for start in nodes {
            let mut stack = vec![(start.clone(), vec![start.clone()])];
            while let Some((node, path)) = stack.pop() {
                for next in graph.get(&node).map(|m| m.keys()).into_iter().flatten() {
                    if next == start {
                        if path.iter().all(|p| p >= start) {
                            let mut steps = Vec::new();
                            for w in path.iter().chain(std::iter::once(start)).collect::<Vec<_>>().windows(2) {
                                let files = &graph[w[0]][w[1]];
                                let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                                steps.push(format!("{} -> {} ({})", w[0], w[1], files.join(", ")));
                            }
                            let place = if parent.is_empty() {
                                "the crate root".to_string()
                            } else {
                                format!("`{}`", parent.join("::"))
                            };
                            found.push(format!("among the modules of {place}: {}", steps.join("; ")));
                        }
                    } else if !path.contains(next) && path.len() < 32 {
                        let mut p = path.clone();
                        p.push(next.clone());
                        stack.push((next.clone(), p));
                    }
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn no_module_cycle_in_any_crate() {
    let mut crates = Vec::new();
    for entry in std::fs::read_dir(crates_dir()).expect("read crates/").flatten() {
        let src = entry.path().join("src");
        if src.is_dir() {
            crates.push(src);
        }
    }
    crates.sort();
    assert!(crates.len() >= 5, "expected the workspace's crates beside this one, found {crates:?}");
    let mut problems = Vec::new();
    for src in &crates {
        let (modules, refs) = references(src);
        assert!(!modules.is_empty());
        for c in cycles(&refs) {
            problems.push(format!("{}: {c}", src.display()));
        }
    }
    assert!(problems.is_empty(), "module cycles (see docs/architecture.md for the layers):\n{}", problems.join("\n"));
}

/// The check itself finds a cycle, resolves `super`, and leaves parent/child uses alone.
#[test]
fn finds_a_cycle_between_siblings() {
    let r = |from: &[&str], to: &[&str]| Reference {
        from: from.iter().map(|s| s.to_string()).collect(),
        to: to.iter().map(|s| s.to_string()).collect(),
        file: PathBuf::from(format!("{}.rs", from.join("/"))),
    };
    let acyclic = [r(&["engine"], &["services"]), r(&["engine", "flows"], &["engine"]), r(&["a", "b"], &["a", "c"])];
    assert!(cycles(&acyclic).is_empty());
    let cyclic = [r(&["engine", "dial"], &["services"]), r(&["services", "proxy"], &["engine"])];
    let found = cycles(&cyclic);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("engine -> services") && found[0].contains("services -> engine"), "{found:?}");
    let deep = [
        r(&["api", "v1"], &["api", "routes"]),
        r(&["api", "routes"], &["api", "gvproxy"]),
        r(&["api", "gvproxy"], &["api", "v1"]),
    ];
    assert_eq!(cycles(&deep).len(), 1);

    let c = Collector { current: vec!["engine".into(), "flows".into()], modules: BTreeSet::new(), uses: Vec::new() };
    let seg = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    assert_eq!(c.resolve(&seg("super::tx::GuestTx")), Some(seg("engine::tx::GuestTx")));
    assert_eq!(c.resolve(&seg("super::super::config")), Some(seg("config")));
    assert_eq!(c.resolve(&seg("crate::wire::tcp")), Some(seg("wire::tcp")));
    assert_eq!(c.resolve(&seg("std::io")), None);
}
