//! The gateway's modules form layers: every `crate::` (and `super::`) path in
//! `server/src` points down, never back up, so there is no import cycle.
//! Each file is a module (`broker/memory.rs` is `broker::memory`); a
//! reference names the longest module its path starts with. Test modules
//! (`#[cfg(test)]`, at the end of a file) and plain `//` comments are not
//! read; doc comments are, since their intra-doc links name modules too.
//!
//! When this fails it names the cycle: break it the way the README's "What
//! is here" shows the layers (a lower module takes only what it needs, or
//! defines a trait the upper one implements, like `drain::DrainHost`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name → the source it is read from (test modules cut off).
fn modules() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let relative = path.strip_prefix(&root).expect("under src");
            let mut parts: Vec<String> = relative
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if parts.last().map(String::as_str) == Some("mod") {
                parts.pop();
            }
            let name = parts.join("::");
            if name == "lib" || name == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read module");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let code: Vec<&str> = code
                .lines()
                .filter(|line| {
                    let line = line.trim_start();
                    !line.starts_with("//") || line.starts_with("///") || line.starts_with("//!")
                })
                .collect();
            found.insert(name, code.join("\n"));
        }
    }
    found
}

/// The identifier paths that follow each `prefix` in `code` (`crate::a::b`
/// gives `a::b`; `super::{x, y}` gives `x` and `y`).
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(list) = rest.strip_prefix('{') {
            let end = list.find('}').unwrap_or(list.len());
            for item in list[..end].split(',') {
                let item = item.trim();
                let ident: String = item
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                if !ident.is_empty() {
                    out.push(ident);
                }
            }
            continue;
        }
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        out.push(path.trim_end_matches(':').to_string());
    }
    out
}

/// The longest module `path` starts with.
fn resolve(path: &str, known: &BTreeSet<String>) -> Option<String> {
    let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|candidate| known.contains(candidate))
}

fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (name, code) in &modules {
        let mut deps = BTreeSet::new();
        for path in paths_after(code, "crate::") {
            deps.extend(resolve(&path, &known));
        }
        // `super::` from `a::b` is `a`; from a top-level file, the crate root.
        if let Some((parent, _)) = name.rsplit_once("::") {
            for path in paths_after(code, "super::") {
                let full = format!("{parent}::{path}");
                deps.extend(resolve(&full, &known).or_else(|| Some(parent.to_string())));
            }
        }
        deps.remove(name);
        graph.insert(name.clone(), deps);
    }
    graph
}

/// A cycle in the graph, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

/// Each module's layer: 0 for modules that use none of the others, then one
/// above the highest module it uses.
fn layers(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, usize> {
    let mut layer: BTreeMap<String, usize> = BTreeMap::new();
    while layer.len() < graph.len() {
        for (name, deps) in graph {
            if layer.contains_key(name) || !deps.iter().all(|d| layer.contains_key(d)) {
                continue;
            }
            let level = deps.iter().map(|d| layer[d] + 1).max().unwrap_or(0);
            layer.insert(name.clone(), level);
        }
    }
    layer
}

#[test]
fn the_gateway_modules_form_layers_without_a_cycle() {
    let graph = dependencies();
    assert!(graph.len() >= 20, "read only {} modules", graph.len());
    if let Some(found) = cycle(&graph) {
        panic!("import cycle in server/src: {}", found.join(" -> "));
    }
    let layer = layers(&graph);
    let mut by_layer: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (name, level) in &layer {
        by_layer.entry(*level).or_default().push(name);
    }
    for (level, names) in &by_layer {
        println!("layer {level}: {}", names.join(", "));
    }
    // The shape the README shows: the process entry on top, the shared
    // state below the handshake and the connection, the pure pieces at the
    // bottom.
    assert!(layer["cli"] > layer["server"]);
    assert!(layer["server"] > layer["upgrade"]);
    assert!(layer["upgrade"] > layer["connection"]);
    assert!(layer["connection"] > layer["gateway"]);
    assert!(layer["gateway"] > layer["drain"]);
    assert!(layer["gateway"] > layer["broker"]);
    assert!(layer["drain"] > layer["hub"]);
    assert!(layer["hub"] > layer["outbox"]);
    assert_eq!(layer["outbox"], 0);
}

#[test]
fn the_checker_sees_a_cycle_and_the_paths_it_reads() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.insert("a".into(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".into(), BTreeSet::from(["c".to_string()]));
    graph.insert("c".into(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    graph.insert("c".into(), BTreeSet::new());
    assert_eq!(cycle(&graph), None);
    let code =
        "use crate::hub::{ConnHandle, Hub};\nuse super::{log, Broker};\nlet x = mycrate::no;";
    assert_eq!(paths_after(code, "crate::"), vec!["hub"]);
    assert_eq!(paths_after(code, "super::"), vec!["log", "Broker"]);
    let known = BTreeSet::from(["hub".to_string(), "broker".into(), "broker::log".into()]);
    assert_eq!(resolve("hub", &known), Some("hub".into()));
    assert_eq!(
        resolve("broker::log::Resume", &known),
        Some("broker::log".into())
    );
    assert_eq!(resolve("nothing::here", &known), None);
}
