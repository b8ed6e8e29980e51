//! The file-level import graph of a crate, from its tokens.
//!
//! Each file is a node (`lib.rs` the crate root, `a/mod.rs` module `a`, `a/b.rs` `a::b`;
//! `main.rs` and `bin/*` are binaries that reach the library by its name). An edge is a
//! reference to a path of the library: every leaf of a `use` tree (grouped, `self`, globs,
//! `pub use` re-exports), every inline path starting with `crate::`, `super::`, `self::` or the
//! name of a child module (also inside attributes such as `#[utoipa::path(…)]`), resolved against
//! the module it is written in (inline `mod m { … }` included) and then to the longest prefix
//! that is a module file. A reference into its own file and `mod x;` declarations are not
//! edges. It does not see through `use` aliases of other crates, macros that build paths from
//! strings, or `#[path]` attributes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;

use super::lex::{Source, Token};
use super::{product_files, rel_to, API_CRATE, API_SRC, ONE_NODE_DIRS};

/// node → node → (file, line, path) of the first reference; no self edges. A node is a file,
/// or a directory listed as one node.
pub type Edges = BTreeMap<String, BTreeMap<String, (String, usize, String)>>;

/// Where a file sits in its crate's module tree.
#[derive(Debug, Clone, PartialEq)]
pub struct ModPath {
    /// Module path inside the library (`[]` is `lib.rs`); for a binary, its own root.
    pub path: Vec<String>,
    /// A separate crate root (`main.rs`, `bin/*`): it reaches the library as [`API_CRATE`].
    pub bin: bool,
}

/// `lib.rs` → crate root, `a/mod.rs` → `a`, `a/b.rs` → `a::b`; `main.rs` and `bin/…` are
/// binaries; `src`-relative path, `.rs` optional (a directory names its module).
pub fn module_of(rel: &str) -> ModPath {
    if rel == "main.rs" || rel.starts_with("bin/") {
        return ModPath {
            path: Vec::new(),
            bin: true,
        };
    }
    let stem = rel.strip_suffix(".rs").unwrap_or(rel);
    let stem = stem.strip_suffix("/mod").unwrap_or(stem);
    let path = if stem == "lib" {
        Vec::new()
    } else {
        stem.split('/').map(str::to_string).collect()
    };
    ModPath { path, bin: false }
}

/// One reference from a file to a path of the library.
#[derive(Debug, Clone)]
pub struct Ref {
    pub line: usize,
    /// The absolute path referred to (`["jobs", "Jobs", "new"]`).
    pub path: Vec<String>,
    /// The file of the longest prefix of `path` that is a module file.
    pub target: String,
    /// Part of a `pub use`: re-exported under `current module :: name`.
    pub reexport_as: Option<Vec<String>>,
}

pub struct Graph {
    /// file → every reference it makes.
    pub refs: BTreeMap<String, Vec<Ref>>,
    pub edges: Edges,
}

/// A path of a `use` tree: its segments and the name it binds (`None` for a glob).
#[derive(Debug, PartialEq)]
struct UsePath {
    segs: Vec<String>,
    name: Option<String>,
}

/// Parses the use tree at `t[*i]` (after `use`) under `prefix`, pushing every leaf path.
fn use_tree(t: &[Token], i: &mut usize, mut prefix: Vec<String>, out: &mut Vec<UsePath>) {
    loop {
        let Some(x) = t.get(*i) else {
            return;
        };
        if x.is("{") {
            *i += 1;
            while let Some(y) = t.get(*i) {
                if y.is("}") {
                    *i += 1;
                    return;
                }
                if y.is(",") {
                    *i += 1;
                    continue;
                }
                let before = *i;
                use_tree(t, i, prefix.clone(), out);
                if *i == before {
                    *i += 1;
                }
            }
            return;
        }
        if x.is("*") {
            *i += 1;
            out.push(UsePath {
                segs: prefix,
                name: None,
            });
            return;
        }
        if x.is("::") {
            // `use ::std::…`: an extern crate.
            *i += 1;
            prefix.push("::".into());
            continue;
        }
        let Some(name) = x.ident() else {
            return;
        };
        *i += 1;
        // `self` inside a group names the prefix itself.
        if name != "self" || prefix.is_empty() {
            prefix.push(name.to_string());
        }
        if t.get(*i).is_some_and(|y| y.is("::")) {
            *i += 1;
            continue;
        }
        let mut bound = prefix.last().cloned();
        if t.get(*i).is_some_and(|y| y.is_ident("as")) {
            bound = t.get(*i + 1).and_then(Token::ident).map(str::to_string);
            *i += 2;
        }
        out.push(UsePath {
            segs: prefix,
            name: bound,
        });
        return;
    }
}

/// Resolves `segs` as written in module `cur` to an absolute path of the library, or `None`
/// when it leaves the library (another crate, a binary's own items, a local name).
fn absolute(
    segs: &[String],
    cur: &[String],
    bin: bool,
    modules: &BTreeMap<Vec<String>, String>,
) -> Option<Vec<String>> {
    let first = segs.first()?.as_str();
    let (mut base, rest) = match first {
        "crate" if !bin => (Vec::new(), &segs[1..]),
        f if bin && f == API_CRATE => (Vec::new(), &segs[1..]),
        "self" if !bin => (cur.to_vec(), &segs[1..]),
        "super" if !bin => {
            let mut b = cur.to_vec();
            let mut k = 0;
            while segs.get(k).is_some_and(|s| s == "super") {
                b.pop()?;
                k += 1;
            }
            (b, &segs[k..])
        }
        _ if bin => return None,
        f => {
            // A bare name: a child module of the current module (2018 paths), else not ours.
            let mut cand = cur.to_vec();
            cand.push(f.to_string());
            if !modules.contains_key(&cand) {
                return None;
            }
            (cur.to_vec(), segs)
        }
    };
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The file of the longest prefix of `path` that is a module file.
fn module_file(path: &[String], modules: &BTreeMap<Vec<String>, String>) -> Option<String> {
    (0..=path.len())
        .rev()
        .find_map(|n| modules.get(&path[..n]).cloned())
}

/// Every reference `src` (module `m`) makes into the library whose modules are `modules`.
fn references(src: &Source, m: &ModPath, modules: &BTreeMap<Vec<String>, String>) -> Vec<Ref> {
    let t = &src.toks;
    let mut out = Vec::new();
    // Inline modules (`mod m { … }`) open at brace depth `d`.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let cur = |inline: &[(String, usize)]| -> Vec<String> {
        let mut c = m.path.clone();
        c.extend(inline.iter().map(|(n, _)| n.clone()));
        c
    };
    let mut push = |line: usize, segs: &[String], cur: &[String], re: Option<Vec<String>>| {
        if let Some(abs) = absolute(segs, cur, m.bin, modules) {
            if let Some(target) = module_file(&abs, modules) {
                out.push(Ref {
                    line,
                    path: abs,
                    target,
                    reexport_as: re,
                });
            }
        }
    };
    while i < t.len() {
        let x = &t[i];
        if x.is("{") {
            depth += 1;
        } else if x.is("}") {
            depth = depth.saturating_sub(1);
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
        } else if x.is_ident("mod")
            && t.get(i + 1).and_then(Token::ident).is_some()
            && t.get(i + 2).is_some_and(|y| y.is("{"))
        {
            let name = t[i + 1].ident().unwrap_or_default().to_string();
            inline.push((name, depth));
            depth += 1;
            i += 3;
            continue;
        } else if x.is_ident("use") {
            let public = i > 0 && (t[i - 1].is_ident("pub") || t[i - 1].is(")"));
            let line = x.line;
            let mut paths = Vec::new();
            i += 1;
            use_tree(t, &mut i, Vec::new(), &mut paths);
            let c = cur(&inline);
            for p in paths {
                let re = match (&p.name, public) {
                    (Some(n), true) => {
                        let mut r = c.clone();
                        r.push(n.clone());
                        Some(r)
                    }
                    _ => None,
                };
                push(line, &p.segs, &c, re);
            }
            continue;
        } else if let Some(name) = x.ident() {
            let starts = i == 0 || !(t[i - 1].is("::") || t[i - 1].is("."));
            if starts && t.get(i + 1).is_some_and(|y| y.is("::")) {
                let mut segs = vec![name.to_string()];
                let mut j = i + 1;
                while t.get(j).is_some_and(|y| y.is("::")) {
                    match t.get(j + 1).and_then(Token::ident) {
                        Some(n) => segs.push(n.to_string()),
                        None => break,
                    }
                    j += 2;
                }
                push(x.line, &segs, &cur(&inline), None);
                i = j;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// The file-level import graph of `api` (library and binaries).
pub fn api_graph(root: &Path) -> Graph {
    let files: Vec<(String, ModPath, Source)> = product_files(root)
        .into_iter()
        .filter(|s| s.rel.starts_with(API_SRC))
        .map(|s| (s.rel.clone(), module_of(rel_to(API_SRC, &s.rel)), s))
        .collect();
    graph_of(&files, ONE_NODE_DIRS)
}

/// The graph of `files`; the files under a directory of `one_node` are one node.
fn graph_of(files: &[(String, ModPath, Source)], one_node: &[&str]) -> Graph {
    let node = |file: &str| {
        one_node
            .iter()
            .find(|d| file.starts_with(*d))
            .map_or_else(|| file.to_string(), |d| d.to_string())
    };
    let modules: BTreeMap<Vec<String>, String> = files
        .iter()
        .filter(|(_, m, _)| !m.bin)
        .map(|(rel, m, _)| (m.path.clone(), rel.clone()))
        .collect();
    let mut refs = BTreeMap::new();
    let mut edges: Edges = BTreeMap::new();
    for (rel, m, src) in files {
        let rs = references(src, m, &modules);
        let from = node(rel);
        let e = edges.entry(from.clone()).or_default();
        for r in &rs {
            let to = node(&r.target);
            if to != from {
                e.entry(to).or_insert_with(|| {
                    (rel.clone(), r.line, format!("crate::{}", r.path.join("::")))
                });
            }
        }
        refs.insert(rel.clone(), rs);
    }
    Graph { refs, edges }
}

/// The strongly connected components with more than one file (Tarjan).
pub fn cycles(edges: &Edges) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a Edges,
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut T<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on.insert(v);
        let edges: &'a Edges = s.edges;
        for w in edges.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                s.out.push(scc);
            }
        }
    }
    let mut s = T {
        edges,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out.sort();
    s.out
}

/// A shortest circle through the first file of `scc`, inside `scc`.
fn one_cycle(edges: &Edges, scc: &[String]) -> Vec<String> {
    let start = &scc[0];
    let inside: BTreeSet<&String> = scc.iter().collect();
    let mut prev: BTreeMap<&String, &String> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in edges.get(v).into_iter().flat_map(|e| e.keys()) {
            if w == start {
                let mut mids = Vec::new();
                let mut at = v;
                while at != start {
                    mids.push(at.clone());
                    at = prev[at];
                }
                mids.reverse();
                let mut path = vec![start.clone()];
                path.extend(mids);
                path.push(start.clone());
                return path;
            }
            if inside.contains(w) && !prev.contains_key(w) {
                prev.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    Vec::new()
}

pub fn describe_cycle(edges: &Edges, scc: &[String]) -> String {
    let cycle = one_cycle(edges, scc);
    let steps: Vec<String> = cycle
        .windows(2)
        .map(|w| {
            let (file, line, path) = &edges[&w[0]][&w[1]];
            format!("{file}:{line} names {path}")
        })
        .collect();
    format!(
        "circle of {} modules: {}\n    shortest circle through the first: {}\n      {}",
        scc.len(),
        scc.join(", "),
        cycle.join(" → "),
        steps.join("\n      ")
    )
}

/// References from outside `room_dir` to its module (or to a name a `pub use` re-exports from
/// it), except from `importers`.
pub fn imports_of_room(g: &Graph, room_dir: &str, importers: &[&str]) -> Vec<String> {
    let room = &module_of(rel_to(API_SRC, room_dir).trim_end_matches('/')).path[..];
    let in_room = |p: &[String], aliases: &[Vec<String>]| {
        p.starts_with(room) || aliases.iter().any(|a| p.starts_with(a))
    };
    // Names re-exported from the room, followed through re-exports of re-exports.
    let mut aliases: Vec<Vec<String>> = Vec::new();
    loop {
        let found: Vec<Vec<String>> = g
            .refs
            .values()
            .flatten()
            .filter(|r| in_room(&r.path, &aliases))
            .filter_map(|r| r.reexport_as.clone())
            .filter(|a| !a.starts_with(room) && !aliases.contains(a))
            .collect();
        if found.is_empty() {
            break;
        }
        aliases.extend(found);
    }
    let mut out = Vec::new();
    for (file, refs) in &g.refs {
        if file.starts_with(room_dir) || importers.contains(&file.as_str()) {
            continue;
        }
        for r in refs.iter().filter(|r| in_room(&r.path, &aliases)) {
            out.push(format!("{file}:{}: crate::{}", r.line, r.path.join("::")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lex::lex;

    fn uses(src: &str) -> Vec<(Vec<String>, Option<String>)> {
        let t = lex(src);
        let mut i = 1;
        let mut out = Vec::new();
        use_tree(&t, &mut i, Vec::new(), &mut out);
        out.into_iter().map(|u| (u.segs, u.name)).collect()
    }

    fn p(s: &str) -> Vec<String> {
        s.split("::")
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn grouped_use_trees() {
        let got = uses("use crate::{a, b::c as d, e::{self, f::*}, g::{h::{i}}};");
        let want = [
            (p("crate::a"), Some("a".to_string())),
            (p("crate::b::c"), Some("d".to_string())),
            (p("crate::e"), Some("e".to_string())),
            (p("crate::e::f"), None),
            (p("crate::g::h::i"), Some("i".to_string())),
        ];
        assert_eq!(got, want);
        assert_eq!(
            uses("use super::super::x;"),
            [(p("super::super::x"), Some("x".into()))]
        );
    }

    fn modules(list: &[&str]) -> BTreeMap<Vec<String>, String> {
        list.iter().map(|m| (p(m), format!("{m}.rs"))).collect()
    }

    #[test]
    fn relative_paths_resolve_against_the_module() {
        let mods = modules(&["", "daemon", "daemon::http", "daemon::http::routes", "jobs"]);
        let cur = p("daemon::http::routes");
        let abs = |s: &str| absolute(&p(s), &cur, false, &mods);
        assert_eq!(abs("super::Error"), Some(p("daemon::http::Error")));
        assert_eq!(abs("super::super::serve"), Some(p("daemon::serve")));
        assert_eq!(abs("self::x"), Some(p("daemon::http::routes::x")));
        assert_eq!(abs("crate::jobs::Jobs::new"), Some(p("jobs::Jobs::new")));
        assert_eq!(abs("serde::Serialize"), None);
        assert_eq!(
            absolute(&p("http::app"), &p("daemon"), false, &mods),
            Some(p("daemon::http::app"))
        );
        assert_eq!(
            absolute(&p("api::jobs::Jobs"), &[], true, &mods),
            Some(p("jobs::Jobs"))
        );
        assert_eq!(absolute(&p("crate::Cli"), &[], true, &mods), None);
        assert_eq!(
            module_file(&p("daemon::http::routes::x::Y"), &mods),
            Some("daemon::http::routes.rs".into())
        );
        assert_eq!(module_file(&p("now"), &mods), Some(".rs".into()));
    }

    #[test]
    fn module_paths_of_files() {
        let m = |f: &str| {
            let m = module_of(f);
            (m.path.join("::"), m.bin)
        };
        assert_eq!(m("lib.rs"), (String::new(), false));
        assert_eq!(m("main.rs"), (String::new(), true));
        assert_eq!(m("bin/tool.rs"), (String::new(), true));
        assert_eq!(m("daemon/mod.rs"), ("daemon".into(), false));
        assert_eq!(
            m("daemon/http/routes.rs"),
            ("daemon::http::routes".into(), false)
        );
        assert_eq!(m("daemon/http"), ("daemon::http".into(), false));
    }

    fn graph(files: &[(&str, &str)]) -> Graph {
        graph_grouped(files, &[])
    }

    fn graph_grouped(files: &[(&str, &str)], one_node: &[&str]) -> Graph {
        let f: Vec<(String, ModPath, Source)> = files
            .iter()
            .map(|(rel, src)| {
                let file = format!("{API_SRC}{rel}");
                (file.clone(), module_of(rel), Source::new(&file, src))
            })
            .collect();
        graph_of(&f, one_node)
    }

    #[test]
    fn a_three_file_circle_is_found_and_printed() {
        let g = graph(&[
            ("lib.rs", "pub mod a; pub mod b; pub mod c; pub mod d;"),
            (
                "a.rs",
                "use crate::b::B;\n// use crate::d::D; (a comment)\nfn f() {}",
            ),
            (
                "b.rs",
                "fn f() { crate::c::C::new(); let s = \"crate::a::A\"; }",
            ),
            (
                "c.rs",
                "use super::{a::{self}, d};\n#[cfg(test)] mod tests { use crate::d::*; }",
            ),
            ("d.rs", "use crate::a::A;\nfn f() { Self::g(); self::h(); }"),
        ]);
        assert_eq!(
            cycles(&g.edges),
            [vec![
                "api/src/a.rs",
                "api/src/b.rs",
                "api/src/c.rs",
                "api/src/d.rs"
            ]]
        );
        let text = describe_cycle(&g.edges, &cycles(&g.edges)[0]);
        let want = "api/src/a.rs → api/src/b.rs → api/src/c.rs → api/src/a.rs\n      \
                    api/src/a.rs:1 names crate::b::B\n      \
                    api/src/b.rs:1 names crate::c::C::new\n      \
                    api/src/c.rs:1 names crate::a";
        assert!(text.contains(want), "{text}");
        let dag = graph(&[
            ("lib.rs", "pub mod a; pub mod b; pub use a::A;"),
            (
                "a.rs",
                "use crate::b::B;\nmod inner { use super::super::a::X; }",
            ),
            ("b.rs", "pub struct B;"),
        ]);
        assert!(cycles(&dag.edges).is_empty());
        assert!(dag.edges["api/src/lib.rs"].contains_key("api/src/a.rs"));
    }

    #[test]
    fn the_http_room_is_named_only_by_its_builders() {
        let g = graph(&[
            (
                "lib.rs",
                "pub mod daemon; pub mod cli; pub use daemon::http::app;",
            ),
            (
                "daemon/mod.rs",
                "pub mod http; pub mod serve; pub mod ops; pub use http::app;",
            ),
            ("daemon/http/mod.rs", "pub fn app() {}"),
            ("daemon/serve.rs", "use super::http::app;"),
            (
                "daemon/ops/mod.rs",
                "fn f() { super::http::app(); }\nuse crate::daemon::http;",
            ),
            ("cli/mod.rs", "fn f() { crate::app(); }"),
            (
                "main.rs",
                "fn main() { api::daemon::app(); api::cli::run(); }",
            ),
        ]);
        let importers = [
            "api/src/daemon/serve.rs",
            "api/src/daemon/mod.rs",
            "api/src/lib.rs",
        ];
        let found = imports_of_room(&g, "api/src/daemon/http/", &importers);
        assert_eq!(
            found,
            [
                "api/src/cli/mod.rs:1: crate::app",
                "api/src/daemon/ops/mod.rs:1: crate::daemon::http::app",
                "api/src/daemon/ops/mod.rs:2: crate::daemon::http",
                "api/src/main.rs:1: crate::daemon::app",
            ]
        );
    }

    #[test]
    fn a_directory_listed_as_one_node_has_no_inner_circle() {
        let files = [
            ("lib.rs", "pub mod http; pub mod ops;"),
            (
                "http/mod.rs",
                "pub const LIMIT: u32 = 1; fn app() { vms::list(); }",
            ),
            ("http/vms.rs", "use super::LIMIT; use crate::ops::backup;"),
            ("ops.rs", "pub fn backup() {}"),
        ];
        let strict = graph(&files);
        assert_eq!(
            cycles(&strict.edges),
            [vec!["api/src/http/mod.rs", "api/src/http/vms.rs"]]
        );
        let grouped = graph_grouped(&files, &["api/src/http/"]);
        assert!(cycles(&grouped.edges).is_empty());
        let (file, line, path) = &grouped.edges["api/src/http/"]["api/src/ops.rs"];
        assert_eq!(
            (file.as_str(), *line, path.as_str()),
            ("api/src/http/vms.rs", 1, "crate::ops::backup")
        );
    }
}
