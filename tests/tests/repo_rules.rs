//! The repository's mechanical rules, checked by reading the source (no build, no libvirt, no
//! QEMU): every test file is named in `docs/testing.md`; each concern the architecture gives a
//! room (`docs/architecture.md`, "Rooms") appears only there; the modules of `api` import each
//! other without a circle, and nothing but the code that builds the app imports the HTTP room.
//!
//! The scanner is a small Rust lexer (`repo_rules/lex.rs`), not a parser: comments (nested
//! block comments too) are dropped, string, byte-string, raw-string and char literals are
//! single tokens, so a marker in a doc comment or an error message never counts as code, and a
//! path in a string is not an import; the import graph is built in `repo_rules/graph.rs`. Code
//! under `#[cfg(test)]` (unit tests and their fixtures) is left out of every rule: the rooms
//! are about what the product does. Only product code is scanned: `api/src`, `proxy/src`,
//! `catalog/src` without the test tools under `catalog/src/bin`; the harness (`tests/`,
//! `*/tests/`, examples, benches, fuzz) may do anything.
//!
//! Each rule is one `#[test]` whose failure names the rule and every offending `file:line`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

#[path = "repo_rules/graph.rs"]
mod graph;
#[path = "repo_rules/lex.rs"]
mod lex;

use graph::{api_graph, cycles, describe_cycle, imports_of_room};
use lex::{matching, Source, Tok, Token};

// ---------------------------------------------------------------------------------------------
// The rooms. Paths are relative to the workspace root; a path ending in `/` is a directory.

/// The HTTP room of the daemon: the app, its errors, extractors and route handlers.
const HTTP_ROOM: &str = "api/src/daemon/http/";
/// Files outside [`HTTP_ROOM`] that may name it: the one that builds the app, and the module
/// declarations / re-export of `app`.
const HTTP_ROOM_IMPORTERS: &[&str] = &[
    "api/src/daemon/serve.rs",
    "api/src/daemon/mod.rs",
    "api/src/lib.rs",
];
/// The CLI room: it reads the API's answers, so it may look at status codes.
const CLI_ROOM: &str = "api/src/cli/";
/// Hypervisor adapters: libvirt XML, QMP JSON and the `qemu-*` processes live here.
const HYPERVISOR_ROOM: &str = "proxy/src/hypervisor/";
/// NBD bytes on the wire.
const NBD_WIRE_ROOM: &str = "proxy/src/nbd/proto.rs";
/// Environment variables are read only by the `sluice` binary's crate.
const ENV_ROOM: &str = "api/src/";
/// Directories of `api` whose files count as one node of its import graph (a module and its
/// children, which may then name each other). Empty: every file is a node, so a `mod.rs` that
/// mounts its children's items while a child names an item of that `mod.rs` is a circle.
const ONE_NODE_DIRS: &[&str] = &[];
/// The crate whose import graph must have no circle, its source root and its library name
/// (how its binaries reach it).
const API_SRC: &str = "api/src/";
const API_CRATE: &str = "api";

/// Product code: every `.rs` below these directories, except [`TOOLS_IN_PRODUCT`].
const PRODUCT_SRC: &[&str] = &["api/src/", "proxy/src/", "catalog/src/"];
/// Test tools that live inside a product crate's `src/` (harness, not product).
const TOOLS_IN_PRODUCT: &[&str] = &["catalog/src/bin/"];

/// The test document and the fuzz targets it must name beside the crates' `tests/*.rs`.
const TESTING_DOC: &str = "docs/testing.md";
const FUZZ_TARGETS: &str = "fuzz/fuzz_targets/";

// ---------------------------------------------------------------------------------------------
// The markers of each concern.

/// Programs whose spawning belongs to the hypervisor adapters (and the harness).
const QEMU_PROGRAMS: &[&str] = &["qemu-img", "qemu-nbd", "qemu-io", "qemu-storage-daemon"];
/// ... and every program whose name starts with this.
const QEMU_PROGRAM_PREFIX: &str = "qemu-system-";

/// Reading the process environment at run time (`env!` / `option_env!` are compile time).
const ENV_READS: &[&str] = &["var", "var_os", "vars", "vars_os"];
/// Functions that read the environment when called by their bare name (imported, or libc's).
const ENV_READ_FNS: &[&str] = &["var_os", "vars_os", "getenv", "secure_getenv"];

/// String literals that start (after leading white space) with one of these are libvirt XML.
const LIBVIRT_XML_STARTS: &[&str] = &["<domain", "<disk", "<devices", "<driver", "<source"];
/// Crates that parse or model libvirt XML / QMP.
const XML_CRATES: &[&str] = &["roxmltree"];
const QMP_CRATES: &[&str] = &["qapi"];
/// String literals equal to one of these are QMP: the JSON key of a command, and the commands.
const QMP_WORDS: &[&str] = &[
    "execute",
    "qmp_capabilities",
    "blockdev-add",
    "blockdev-del",
    "blockdev-backup",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-merge",
    "block-export-add",
    "block-export-del",
    "block-job-cancel",
    "nbd-server-start",
    "nbd-server-stop",
    "nbd-server-add",
    "query-block",
    "query-block-exports",
    "query-block-jobs",
    "query-named-block-nodes",
    "query-status",
    "query-uuid",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-thaw",
    "guest-fsfreeze-status",
];

/// NBD magic numbers (`doc/proto.md`); any integer literal of this value is wire encoding.
const NBD_MAGICS: &[(u64, &str)] = &[
    (0x4e42_444d_4147_4943, "NBDMAGIC"),
    (0x4948_4156_454f_5054, "IHAVEOPT"),
    (0x0003_e889_0455_65a9, "option reply magic"),
    (0x2560_9513, "request magic"),
    (0x6744_6698, "simple reply magic"),
    (0x668e_33ef, "structured reply magic"),
];
/// The same magics spelled as (byte) strings.
const NBD_MAGIC_STRINGS: &[&str] = &["NBDMAGIC", "IHAVEOPT"];
/// NBD is big-endian and nothing else in Sluice is (the repository formats are little-endian),
/// so a big-endian conversion in product code is NBD wire encoding.
const BIG_ENDIAN_CALLS: &[&str] = &["to_be_bytes", "from_be_bytes", "to_be", "from_be"];

/// Types that are HTTP status codes.
const STATUS_CODE_TYPES: &[&str] = &["StatusCode"];

// ---------------------------------------------------------------------------------------------
// The rules.

#[test]
fn docs_testing_names_every_test_file() {
    let root = workspace_root();
    let doc = read(&root.join(TESTING_DOC));
    let mut named: BTreeMap<String, usize> = BTreeMap::new();
    for (line, path) in doc_paths(&doc) {
        named.entry(path).or_insert(line);
    }
    let mut bad = Vec::new();
    for file in test_files(&root) {
        if !named.contains_key(&file) {
            bad.push(format!("{file}: not named in {TESTING_DOC}"));
        }
    }
    for (path, line) in &named {
        if !root.join(path.trim_end_matches('/')).exists() {
            bad.push(format!(
                "{TESTING_DOC}:{line}: names {path}, which does not exist"
            ));
        }
    }
    verdict(
        "docs/testing.md names every test file (crates' tests/*.rs, fuzz targets) by its \
         path, and every path it names exists",
        bad,
    );
}

#[test]
fn qemu_processes_only_in_adapters_and_harness() {
    let bad = scan_product(&[HYPERVISOR_ROOM], qemu_spawns);
    verdict(
        &format!("qemu-* processes are spawned only under {HYPERVISOR_ROOM} and by the harness"),
        bad,
    );
}

#[test]
fn env_vars_only_in_api() {
    let bad = scan_product(&[ENV_ROOM], env_reads);
    verdict(
        &format!("environment variables are read only under {ENV_ROOM} (libraries take *Options)"),
        bad,
    );
}

#[test]
fn libvirt_xml_and_qmp_json_only_in_hypervisor() {
    let bad = scan_product(&[HYPERVISOR_ROOM], hypervisor_formats);
    verdict(
        &format!("libvirt XML and QMP JSON only under {HYPERVISOR_ROOM}"),
        bad,
    );
}

#[test]
fn nbd_bytes_only_in_proto() {
    let bad = scan_product(&[NBD_WIRE_ROOM], nbd_wire);
    verdict(
        &format!("NBD wire encoding (magics, big-endian fields) only in {NBD_WIRE_ROOM}"),
        bad,
    );
}

#[test]
fn http_status_codes_only_in_http_room() {
    let root = workspace_root();
    let mut bad = room_missing(&root, HTTP_ROOM);
    bad.extend(scan_product(&[HTTP_ROOM, CLI_ROOM], status_codes));
    verdict(
        &format!("HTTP status codes only under {HTTP_ROOM} and {CLI_ROOM}"),
        bad,
    );
}

#[test]
fn api_import_graph_has_no_cycle() {
    let graph = api_graph(&workspace_root());
    let bad: Vec<String> = cycles(&graph.edges)
        .iter()
        .map(|scc| describe_cycle(&graph.edges, scc))
        .collect();
    verdict(
        "the modules (files) of api import each other without a circle (uses, `pub use` \
         re-exports and inline crate::/super::/self:: paths count; `mod x;` does not)",
        bad,
    );
}

#[test]
fn nothing_imports_the_http_room() {
    let root = workspace_root();
    let mut bad = room_missing(&root, HTTP_ROOM);
    let graph = api_graph(&root);
    bad.extend(imports_of_room(&graph, HTTP_ROOM, HTTP_ROOM_IMPORTERS));
    verdict(
        &format!(
            "nothing outside {HTTP_ROOM} names it, except {}",
            HTTP_ROOM_IMPORTERS.join(", ")
        ),
        bad,
    );
}

// ---------------------------------------------------------------------------------------------
// Files.

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests lives one level below the workspace root")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every `.rs` below `dir` (relative to `root`), as sorted `/`-separated relative paths.
fn rs_files(root: &Path, dir: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![root.join(dir)];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).expect("below the root");
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    out
}

/// `.rs` files directly in `dir` (not in its subdirectories such as `common/`).
fn rs_files_flat(root: &Path, dir: &str) -> Vec<String> {
    rs_files(root, dir)
        .into_iter()
        .filter(|f| !f[dir.len()..].contains('/'))
        .collect()
}

/// Every integration test file (`CRATE/tests/*.rs` of each crate at the root) and fuzz target.
fn test_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut crates: Vec<PathBuf> = fs::read_dir(root)
        .expect("workspace root")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    crates.sort();
    for c in crates {
        let name = c
            .file_name()
            .expect("crate dir")
            .to_string_lossy()
            .to_string();
        out.extend(rs_files_flat(root, &format!("{name}/tests/")));
    }
    out.extend(rs_files_flat(root, FUZZ_TARGETS));
    out
}

/// Relative paths (`api/tests/x.rs`, `tests/src/`) a document names, with their line: runs of
/// path characters whose first component is a directory at the workspace root. A run that goes
/// on into a pattern (`tests/tests/*.rs`, `restore/{a,b}`, `dir/<name>`) is not a path.
fn doc_paths(doc: &str) -> Vec<(usize, String)> {
    const TOP: &[&str] = &[
        "api/",
        "catalog/",
        "proxy/",
        "tests/",
        "fuzz/",
        "docs/",
        "scripts/",
        "vm-images/",
    ];
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    let mut out = Vec::new();
    for (n, line) in doc.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            if !is_path_char(chars[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < chars.len() && is_path_char(chars[i]) {
                i += 1;
            }
            let before = start.checked_sub(1).map(|j| chars[j]);
            let after = chars.get(i).copied();
            let run: String = chars[start..i].iter().collect();
            let run = run.trim_end_matches(['.', ',']).to_string();
            let pattern = matches!(after, Some('*' | '{' | '<' | '$'));
            let inside = matches!(before, Some('/' | '$' | '}' | '>' | '*'));
            if !pattern && !inside && TOP.iter().any(|t| run.starts_with(t)) {
                out.push((n + 1, run));
            }
        }
    }
    out
}

fn rel_to<'a>(base: &str, path: &'a str) -> &'a str {
    path.strip_prefix(base)
        .unwrap_or_else(|| panic!("{path} is not below {base}"))
}

fn room_missing(root: &Path, room: &str) -> Vec<String> {
    if root.join(room).is_dir() {
        Vec::new()
    } else {
        vec![format!(
            "{room} does not exist: the room this rule is about is not there (yet), so the \
             rule cannot hold"
        )]
    }
}

/// Product files, lexed, with `#[cfg(test)]` code removed.
fn product_files(root: &Path) -> Vec<Source> {
    PRODUCT_SRC
        .iter()
        .flat_map(|d| rs_files(root, d))
        .filter(|f| !TOOLS_IN_PRODUCT.iter().any(|t| f.starts_with(t)))
        .filter(|f| !is_test_module_file(f))
        .map(|f| Source::new(&f, &read(&root.join(&f))))
        .collect()
}

/// A `tests.rs` or a file under a `tests/` directory inside `src/` is a unit-test module.
fn is_test_module_file(rel: &str) -> bool {
    rel.ends_with("/tests.rs") || rel.split('/').skip(2).any(|c| c == "tests")
}

/// Runs `check` over every product file outside `rooms`; `file:line: finding` lines.
fn scan_product(rooms: &[&str], check: fn(&Source) -> Vec<(usize, String)>) -> Vec<String> {
    product_files(&workspace_root())
        .iter()
        .filter(|s| !rooms.iter().any(|r| s.rel.starts_with(r)))
        .flat_map(|s| {
            check(s)
                .into_iter()
                .map(|(line, what)| format!("{}:{line}: {what}", s.rel))
        })
        .collect()
}

fn verdict(rule: &str, bad: Vec<String>) {
    if !bad.is_empty() {
        panic!(
            "rule broken: {rule}\n{} finding(s):\n  {}\n",
            bad.len(),
            bad.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The checks of the rooms. Each returns (line, finding) for one file.

fn is_qemu_program(s: &str) -> bool {
    let base = s.rsplit('/').next().unwrap_or(s);
    QEMU_PROGRAMS.contains(&base) || base.starts_with(QEMU_PROGRAM_PREFIX)
}

/// String constants of a file: `const|static NAME: … = "…"` and `let NAME = "…"`.
fn string_consts(t: &[Token]) -> HashMap<String, (String, usize)> {
    let mut out = HashMap::new();
    for (i, x) in t.iter().enumerate() {
        if !(x.is_ident("const") || x.is_ident("static") || x.is_ident("let")) {
            continue;
        }
        let mut j = i + 1;
        if t.get(j).is_some_and(|y| y.is_ident("mut")) {
            j += 1;
        }
        let Some(name) = t.get(j).and_then(Token::ident) else {
            continue;
        };
        let mut k = j + 1;
        while k < t.len() && !t[k].is("=") && !t[k].is(";") {
            k += 1;
        }
        if t.get(k).is_some_and(|y| y.is("=")) {
            if let Some(s) = t.get(k + 1).and_then(Token::str) {
                out.insert(name.to_string(), (s.to_string(), t[k + 1].line));
            }
        }
    }
    out
}

/// `Command::new(…)` of a `qemu-*` program: a literal, a constant of this file, or an argument
/// this file cannot resolve while it names a `qemu-*` program somewhere in its code.
fn qemu_spawns(s: &Source) -> Vec<(usize, String)> {
    let t = &s.toks;
    let consts = string_consts(t);
    let named = t
        .iter()
        .find(|x| x.str().is_some_and(is_qemu_program))
        .map(|x| (x.str().unwrap_or_default().to_string(), x.line));
    let mut out = Vec::new();
    for i in 0..t.len() {
        let call = t[i].is_ident("Command")
            && t.get(i + 1).is_some_and(|x| x.is("::"))
            && t.get(i + 2).is_some_and(|x| x.is_ident("new"))
            && t.get(i + 3).is_some_and(|x| x.is("("));
        if !call {
            continue;
        }
        let close = matching(t, i + 3);
        let args = &t[i + 4..close.min(t.len())];
        let line = t[i].line;
        match args {
            [a] if a.str().is_some() => {
                let p = a.str().unwrap_or_default();
                if is_qemu_program(p) {
                    out.push((line, format!("Command::new({p:?})")));
                }
            }
            [a] if a.ident().is_some_and(|n| consts.contains_key(n)) => {
                let n = a.ident().unwrap_or_default();
                let (p, at) = &consts[n];
                if is_qemu_program(p) {
                    out.push((line, format!("Command::new({n}), {n} = {p:?} (line {at})")));
                }
            }
            _ => {
                if let Some((p, at)) = &named {
                    out.push((
                        line,
                        format!(
                            "Command::new(<not a literal or constant>) in a file that names \
                             {p:?} (line {at})"
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// `env::var(…)` and its siblings, and the bare environment-reading functions.
fn env_reads(s: &Source) -> Vec<(usize, String)> {
    let t = &s.toks;
    let mut out = Vec::new();
    for i in 0..t.len() {
        let x = &t[i];
        if x.is_ident("env")
            && t.get(i + 1).is_some_and(|y| y.is("::"))
            && t.get(i + 2)
                .and_then(Token::ident)
                .is_some_and(|n| ENV_READS.contains(&n))
        {
            let n = t[i + 2].ident().unwrap_or_default();
            out.push((x.line, format!("env::{n}")));
        }
        // A call of the bare name: not a method, not `env::…` (counted above).
        let method = i > 0 && t[i - 1].is(".");
        let via_env = i >= 2 && t[i - 1].is("::") && t[i - 2].is_ident("env");
        if let Some(n) = x.ident() {
            let call = t.get(i + 1).is_some_and(|y| y.is("("));
            if ENV_READ_FNS.contains(&n) && call && !method && !via_env {
                out.push((x.line, format!("{n}(…)")));
            }
        }
    }
    out
}

fn shorten(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 48 {
        format!("{}…", one_line.chars().take(48).collect::<String>())
    } else {
        one_line
    }
}

/// libvirt XML literals, XML crates, QMP crates and QMP command words.
fn hypervisor_formats(s: &Source) -> Vec<(usize, String)> {
    let t = &s.toks;
    let mut out = Vec::new();
    for (i, x) in t.iter().enumerate() {
        let path_start = i == 0 || !t[i - 1].is("::");
        match &x.tok {
            Tok::Ident(n) if path_start && XML_CRATES.contains(&n.as_str()) => {
                out.push((x.line, format!("{n} (XML parser)")));
            }
            Tok::Ident(n)
                if path_start
                    && QMP_CRATES.contains(&n.as_str())
                    && t.get(i + 1).is_some_and(|y| y.is("::")) =>
            {
                out.push((x.line, format!("{n}:: (QMP types)")));
            }
            Tok::Str(v)
                if LIBVIRT_XML_STARTS
                    .iter()
                    .any(|m| v.trim_start().starts_with(m)) =>
            {
                out.push((x.line, format!("libvirt XML literal {:?}", shorten(v))));
            }
            Tok::Str(v) if QMP_WORDS.contains(&v.as_str()) || v.contains("\"execute\"") => {
                out.push((x.line, format!("QMP literal {:?}", shorten(v))));
            }
            _ => {}
        }
    }
    dedup_lines(out)
}

/// The value of an integer literal (`0x2560_9513`, `42u32`), if it is one.
fn int_value(lit: &str) -> Option<u64> {
    let l = lit.replace('_', "").to_ascii_lowercase();
    let (digits, radix) = match l.strip_prefix("0x") {
        Some(h) => (h.to_string(), 16),
        None => (l.clone(), 10),
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    u64::from_str_radix(&digits[..end], radix).ok()
}

/// NBD magics (as numbers or strings) and big-endian conversions.
fn nbd_wire(s: &Source) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for x in &s.toks {
        match &x.tok {
            Tok::Num(n) => {
                if let Some((_, what)) =
                    int_value(n).and_then(|v| NBD_MAGICS.iter().find(|m| m.0 == v))
                {
                    out.push((x.line, format!("NBD {what} {n}")));
                }
            }
            Tok::Str(v) if NBD_MAGIC_STRINGS.contains(&v.as_str()) => {
                out.push((x.line, format!("NBD magic {v:?}")));
            }
            Tok::Ident(n) if BIG_ENDIAN_CALLS.contains(&n.as_str()) => {
                out.push((x.line, format!("{n} (NBD fields are big-endian)")));
            }
            _ => {}
        }
    }
    out
}

fn status_codes(s: &Source) -> Vec<(usize, String)> {
    let out = s
        .toks
        .iter()
        .filter_map(|x| {
            x.ident()
                .filter(|n| STATUS_CODE_TYPES.contains(n))
                .map(|n| (x.line, n.to_string()))
        })
        .collect();
    dedup_lines(out)
}

/// One finding per line (the first).
fn dedup_lines(v: Vec<(usize, String)>) -> Vec<(usize, String)> {
    let mut seen = BTreeSet::new();
    v.into_iter().filter(|(l, _)| seen.insert(*l)).collect()
}

#[cfg(test)]
mod checks {
    use super::*;

    #[test]
    fn markers_in_comments_and_strings_do_not_count() {
        let src = r##"
            // Command::new("qemu-img") in a line comment
            /* outer /* nested Command::new("qemu-img") */ still comment */
            /// doc: std::env::var("X"), 0x25609513, <disk>, roxmltree
            let a = "Command::new(\"qemu-io\") std::env::var(\"X\") roxmltree";
            let b = r#"raw env::var_os("Y") StatusCode to_be_bytes"#;
        "##;
        let s = Source::new("proxy/src/x.rs", src);
        assert!(qemu_spawns(&s).is_empty());
        assert!(env_reads(&s).is_empty());
        assert!(hypervisor_formats(&s).is_empty());
        assert!(nbd_wire(&s).is_empty());
        assert!(status_codes(&s).is_empty());
    }

    #[test]
    fn qemu_spawn_through_a_literal_a_constant_or_an_unresolved_argument() {
        let lit = Source::new(
            "p.rs",
            "fn f() { std::process::Command::new(\"qemu-img\").arg(\"x\"); }",
        );
        assert_eq!(
            qemu_spawns(&lit),
            [(1, "Command::new(\"qemu-img\")".to_string())]
        );
        let via = Source::new(
            "p.rs",
            "const NBD: &str = \"/usr/bin/qemu-nbd\";\nfn f() { Command::new(NBD); }",
        );
        assert_eq!(qemu_spawns(&via).len(), 1);
        assert!(qemu_spawns(&via)[0]
            .1
            .contains("NBD = \"/usr/bin/qemu-nbd\" (line 1)"));
        let sys = Source::new("p.rs", "fn f() { Command::new(\"qemu-system-x86_64\"); }");
        assert_eq!(qemu_spawns(&sys).len(), 1);
        let param = Source::new(
            "p.rs",
            "fn run(p: &str) { Command::new(p); }\nfn g() { run(\"qemu-io\"); }",
        );
        assert_eq!(qemu_spawns(&param).len(), 1);
        let other = Source::new(
            "p.rs",
            "fn f(p: &str) { Command::new(\"virsh\"); Command::new(p); }",
        );
        assert!(qemu_spawns(&other).is_empty());
    }

    #[test]
    fn env_reads_are_found_in_every_spelling() {
        let s = Source::new(
            "c.rs",
            "use std::env::var_os;\nfn f() { std::env::var(\"A\"); env::vars(); var_os(\"B\"); \
             let v = env!(\"CARGO_PKG_VERSION\"); option_env!(\"X\"); x.var_os(); }",
        );
        let found: Vec<String> = env_reads(&s).into_iter().map(|(_, w)| w).collect();
        assert_eq!(found, ["env::var_os", "env::var", "env::vars", "var_os(…)"]);
    }

    #[test]
    fn xml_and_qmp_markers() {
        let s = Source::new(
            "r.rs",
            "use roxmltree::Document;\nlet a = \"  <disk type='file'>\";\n\
             let m = \"saved domain has no <domain> root\";\nlet q = json!({\"execute\": c});\n\
             let r = r#\"{\"execute\":\"guest-ping\"}\"#;\n\
             let t = qapi::qmp::Foo;\nlet n = \"query-block\";",
        );
        let lines: Vec<usize> = hypervisor_formats(&s).into_iter().map(|(l, _)| l).collect();
        assert_eq!(lines, [1, 2, 4, 5, 6, 7]);
    }

    #[test]
    fn nbd_markers() {
        let s = Source::new(
            "n.rs",
            "const A: u32 = 0x2560_9513;\nconst B: u64 = 0x0003_e889_0455_65a9;\n\
             let c = b\"IHAVEOPT\";\nlet d = x.to_be_bytes();\n\
             let e = 0x2560;\nlet f = y.to_le_bytes();",
        );
        let lines: Vec<usize> = nbd_wire(&s).into_iter().map(|(l, _)| l).collect();
        assert_eq!(lines, [1, 2, 3, 4]);
        assert_eq!(int_value("0x668E_33EFu32"), Some(0x668e_33ef));
        assert_eq!(int_value("12_u8"), Some(12));
    }

    #[test]
    fn doc_paths_are_paths_not_patterns() {
        let doc = "| `api/tests/api_jobs.rs` | x |\nsee tests/src/ and `tests/tests/*.rs`,\n\
                   `restore/{file,export}` and proxy/src/restore/{file,onto}.rs; /var/lib/tests/x\n\
                   end with docs/testing.md.";
        let got: Vec<(usize, String)> = doc_paths(doc);
        assert_eq!(
            got,
            [
                (1, "api/tests/api_jobs.rs".to_string()),
                (2, "tests/src/".to_string()),
                (4, "docs/testing.md".to_string())
            ]
        );
    }
}
