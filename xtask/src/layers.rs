//! `cargo xtask layers`: the host library keeps to the layer order written
//! once in its crate doc (host/src/lib.rs, `# Layers`):
//!
//! ```text
//! //! # Layers
//! //!
//! //! Bottom to top. (prose)
//! //!
//! //! 1. `base`: `error`, `config`
//! //! 7. `surface` (face only): `serve`, `image`
//! ```
//!
//! Every module lib.rs declares is a unit of exactly one layer. A file may
//! name (through `crate::` and `super::` paths) units of its own or lower
//! layers only; a face-only layer names lower layers only through the crate
//! root's public face (its re-exports and `pub mod`s); and no units name
//! each other in a cycle. Paths in lib.rs itself are the face: not checked.
//!
//! The core works on in-memory (path, source) pairs; [`check`] reads them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

/// The library's sources, from the workspace root.
const SRC: &str = "host/src";

/// Checks the library under `root` (the workspace root, or a copy of it)
/// and prints a one-line summary; the error lists every violation.
pub fn check(root: &Path) -> Result<(), String> {
    let mut sources = BTreeMap::new();
    read_sources(&root.join(SRC), SRC, &mut sources)?;
    let summary = check_sources(&sources, &format!("{SRC}/lib.rs"))?;
    println!("{summary}");
    Ok(())
}

/// Every `.rs` file under `dir`, keyed by `shown/relative/path.rs`.
fn read_sources(dir: &Path, shown: &str, out: &mut BTreeMap<String, String>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let key = format!("{shown}/{name}");
        if path.is_dir() {
            read_sources(&path, &key, out)?;
        } else if name.ends_with(".rs") {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            out.insert(key, text);
        }
    }
    Ok(())
}

/// The whole check over `sources` (keyed by the paths shown in messages),
/// the crate rooted at `lib`. Ok is the summary line.
fn check_sources(sources: &BTreeMap<String, String>, lib: &str) -> Result<String, String> {
    let lib_text = sources
        .get(lib)
        .ok_or_else(|| format!("{lib}: no such file"))?;
    let layers = parse_layers(lib_text).map_err(|e| format!("{lib}{e}"))?;
    let files = walk(sources, lib)?;
    let root = Root::new(&files[0].scan.mods, &lex(lib_text));
    check_listing(&layers, &root, lib)?;
    let edges = edges(&files, &root);
    let mut violations = rule_violations(&edges, &layers);
    violations.extend(cycles(&edges).iter().map(|cycle| describe_cycle(cycle)));
    if !violations.is_empty() {
        return Err(format!(
            "{} layer violation(s) in {}:\n{}",
            violations.len(),
            lib.trim_end_matches("lib.rs").trim_end_matches('/'),
            violations.join("\n")
        ));
    }
    let pairs: BTreeSet<_> = edges.iter().map(|e| (&e.from, &e.to)).collect();
    Ok(format!(
        "layers: {} units in {} layers, {} unit edges ({} paths) checked, \
         none upward, none around the face, no cycles",
        layers.iter().map(|l| l.units.len()).sum::<usize>(),
        layers.len(),
        pairs.len(),
        edges.len()
    ))
}

// ---------------------------------------------------------------- the block

#[derive(Debug, PartialEq)]
struct Layer {
    number: usize,
    name: String,
    face_only: bool,
    units: Vec<String>,
}

/// The `# Layers` block of lib.rs's crate doc. Errors start with `:LINE: `
/// (or `: `) for the caller to put the file name before.
fn parse_layers(lib: &str) -> Result<Vec<Layer>, String> {
    let mut lines = lib.lines().enumerate();
    lines
        .by_ref()
        .find(|(_, line)| line.trim() == "//! # Layers")
        .ok_or(": no `//! # Layers` block in the crate doc")?;
    let mut layers: Vec<Layer> = Vec::new();
    for (index, line) in lines {
        let Some(text) = line.trim().strip_prefix("//!").map(str::trim) else {
            break;
        };
        if text.starts_with('#') {
            break;
        }
        match numbered(text) {
            Some((number, item)) => {
                let layer = parse_layer(number, item, layers.len() + 1)
                    .map_err(|e| format!(":{}: {e}", index + 1))?;
                layers.push(layer);
            }
            // Prose before the list and blank lines within it.
            None if text.is_empty() || layers.is_empty() => {}
            None => break,
        }
    }
    if layers.is_empty() {
        return Err(": the `# Layers` block lists no layer".to_owned());
    }
    no_duplicates(&layers)?;
    Ok(layers)
}

/// `N. rest` into (N, rest).
fn numbered(text: &str) -> Option<(usize, &str)> {
    let (digits, rest) = text.split_once(". ")?;
    Some((digits.parse().ok()?, rest))
}

/// `` `layer`[ (face only)]: `unit`, `unit` ``.
fn parse_layer(number: usize, item: &str, expected: usize) -> Result<Layer, String> {
    if number != expected {
        return Err(format!("layer numbered {number}, expected {expected}"));
    }
    let (head, list) = item
        .split_once(':')
        .ok_or_else(|| format!("expected \"`layer`: `module`, ...\", found {item:?}"))?;
    let head = head.trim();
    let (name, face_only) = match head.strip_suffix("(face only)") {
        Some(name) => (name.trim(), true),
        None => (head, false),
    };
    let units = list
        .split(',')
        .map(|unit| ticked(unit.trim()))
        .collect::<Result<_, _>>()?;
    Ok(Layer {
        number,
        name: ticked(name)?,
        face_only,
        units,
    })
}

/// The identifier in `` `name` ``.
fn ticked(text: &str) -> Result<String, String> {
    text.strip_prefix('`')
        .and_then(|t| t.strip_suffix('`'))
        .filter(|name| !name.is_empty() && name.chars().all(is_ident_continue))
        .map(str::to_owned)
        .ok_or_else(|| format!("expected a name in backticks, found {text:?}"))
}

fn no_duplicates(layers: &[Layer]) -> Result<(), String> {
    let mut names = BTreeSet::new();
    let mut units = BTreeSet::new();
    for layer in layers {
        if !names.insert(&layer.name) {
            return Err(format!(": layer `{}` is listed twice", layer.name));
        }
        if let Some(unit) = layer.units.iter().find(|u| !units.insert(*u)) {
            return Err(format!(": unit `{unit}` is listed twice"));
        }
    }
    Ok(())
}

fn layer_of<'a>(layers: &'a [Layer], unit: &str) -> Option<&'a Layer> {
    layers.iter().find(|l| l.units.iter().any(|u| u == unit))
}

/// The block lists exactly the modules lib.rs declares.
fn check_listing(layers: &[Layer], root: &Root, lib: &str) -> Result<(), String> {
    let listed: BTreeSet<&String> = layers.iter().flat_map(|l| &l.units).collect();
    let mut errors = Vec::new();
    for module in root.modules.keys().filter(|m| !listed.contains(m)) {
        errors.push(format!(
            "{lib}: `mod {module};` is in no layer of the `# Layers` block"
        ));
    }
    for layer in layers {
        for unit in layer
            .units
            .iter()
            .filter(|u| !root.modules.contains_key(*u))
        {
            errors.push(format!(
                "{lib}: `# Layers` lists `{unit}` (layer {} `{}`), which is not a module lib.rs declares",
                layer.number, layer.name
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

// ---------------------------------------------------------------- the lexer

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
    /// A string, char or number: its text never matters here.
    Literal,
}

#[derive(Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

/// Code tokens only: comments, strings and chars are dropped (a literal
/// leaves a `Literal`), lifetimes and labels vanish.
fn lex(source: &str) -> Vec<Token> {
    let mut lexer = Lexer {
        chars: source.chars().collect(),
        pos: 0,
        line: 1,
        tokens: Vec::new(),
    };
    lexer.run();
    lexer.tokens
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    tokens: Vec<Token>,
}

impl Lexer {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek(0)?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn push(&mut self, tok: Tok, line: usize) {
        self.tokens.push(Token { tok, line });
    }

    fn run(&mut self) {
        while let Some(c) = self.peek(0) {
            let line = self.line;
            match c {
                c if c.is_whitespace() => {
                    self.bump();
                }
                '/' if self.peek(1) == Some('/') => self.line_comment(),
                '/' if self.peek(1) == Some('*') => self.block_comment(),
                '"' => {
                    self.bump();
                    self.quoted('"');
                    self.push(Tok::Literal, line);
                }
                '\'' => self.char_or_lifetime(line),
                ':' if self.peek(1) == Some(':') => {
                    self.pos += 2;
                    self.push(Tok::PathSep, line);
                }
                c if c.is_ascii_digit() => {
                    self.word();
                    self.push(Tok::Literal, line);
                }
                c if c.is_alphabetic() || c == '_' => self.word_or_literal(line),
                c => {
                    self.bump();
                    self.push(Tok::Punct(c), line);
                }
            }
        }
    }

    fn line_comment(&mut self) {
        while self.peek(0).is_some_and(|c| c != '\n') {
            self.bump();
        }
    }

    /// Block comments nest in Rust.
    fn block_comment(&mut self) {
        self.pos += 2;
        let mut depth = 1;
        while depth > 0 && self.peek(0).is_some() {
            match (self.peek(0), self.peek(1)) {
                (Some('/'), Some('*')) => {
                    depth += 1;
                    self.pos += 2;
                }
                (Some('*'), Some('/')) => {
                    depth -= 1;
                    self.pos += 2;
                }
                _ => {
                    self.bump();
                }
            }
        }
    }

    /// The rest of a literal opened by `close`, escapes honoured.
    fn quoted(&mut self, close: char) {
        while let Some(c) = self.bump() {
            if c == '\\' {
                self.bump();
            } else if c == close {
                break;
            }
        }
    }

    /// After `r`/`br`/`cr`: whether `#*"` follows (else `r#name` is a raw
    /// identifier).
    fn at_raw_string(&self) -> bool {
        let hashes = (0..).take_while(|&k| self.peek(k) == Some('#')).count();
        self.peek(hashes) == Some('"')
    }

    fn raw_string(&mut self) {
        let hashes = (0..).take_while(|&k| self.peek(k) == Some('#')).count();
        self.pos += hashes + 1;
        while let Some(c) = self.bump() {
            if c == '"' && (0..hashes).all(|k| self.peek(k) == Some('#')) {
                self.pos += hashes;
                break;
            }
        }
    }

    /// `'x'`, `'\n'`, `'\''`, `'\u{..}'` are chars; `'a` and `'outer:` are
    /// lifetimes and labels, and a lone quote must not open a literal.
    fn char_or_lifetime(&mut self, line: usize) {
        self.bump();
        match (self.peek(0), self.peek(1)) {
            (Some('\\'), _) => {
                self.quoted('\'');
                self.push(Tok::Literal, line);
            }
            (Some(_), Some('\'')) => {
                self.bump();
                self.bump();
                self.push(Tok::Literal, line);
            }
            _ => {
                self.word();
            }
        }
    }

    fn word(&mut self) -> String {
        let start = self.pos;
        while self.peek(0).is_some_and(is_ident_continue) {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    /// An identifier, or a prefixed literal (`b"`, `b'`, `c"`, `r#"`,
    /// `br"`, `cr#"`), or a raw identifier (kept as `r#name`, so that
    /// `r#mod` is no `mod`).
    fn word_or_literal(&mut self, line: usize) {
        let word = self.word();
        let tok = match (word.as_str(), self.peek(0)) {
            ("b" | "c", Some('"')) => {
                self.bump();
                self.quoted('"');
                Tok::Literal
            }
            ("b", Some('\'')) => {
                self.bump();
                self.quoted('\'');
                Tok::Literal
            }
            ("r" | "br" | "cr", Some('"' | '#')) if self.at_raw_string() => {
                self.raw_string();
                Tok::Literal
            }
            ("r", Some('#')) => {
                self.bump();
                Tok::Ident(format!("r#{}", self.word()))
            }
            _ => Tok::Ident(word),
        };
        self.push(tok, line);
    }
}

fn is_ident_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

// ------------------------------------------------------------ paths in code

/// One path a use tree or an expression names.
#[derive(Debug, PartialEq)]
struct Leaf {
    segs: Vec<String>,
    alias: Option<String>,
    glob: bool,
    line: usize,
}

impl Leaf {
    fn written(&self) -> String {
        let path = self.segs.join("::");
        if self.glob {
            format!("{path}::*")
        } else {
            path
        }
    }
}

/// The paths of the use tree (or plain path) starting at `start`, grouped
/// trees expanded; and the index after it.
fn parse_tree(tokens: &[Token], start: usize) -> (Vec<Leaf>, usize) {
    let mut parser = TreeParser {
        tokens,
        pos: start,
        leaves: Vec::new(),
    };
    parser.tree(Vec::new());
    (parser.leaves, parser.pos)
}

struct TreeParser<'a> {
    tokens: &'a [Token],
    pos: usize,
    leaves: Vec<Leaf>,
}

impl TreeParser<'_> {
    fn tok(&self, ahead: usize) -> Option<&Tok> {
        self.tokens.get(self.pos + ahead).map(|t| &t.tok)
    }

    fn tree(&mut self, mut segs: Vec<String>) {
        loop {
            match self.tok(0) {
                Some(Tok::Punct('{')) => return self.group(&segs),
                Some(Tok::Punct('*')) => {
                    self.pos += 1;
                    return self.leaf(segs, true);
                }
                Some(Tok::Ident(name)) => {
                    segs.push(name.clone());
                    self.pos += 1;
                }
                // `::<T>` and the like: the path so far.
                _ => return self.leaf(segs, false),
            }
            if self.tok(0) != Some(&Tok::PathSep) {
                return self.leaf(segs, false);
            }
            self.pos += 1;
        }
    }

    /// `{tree, tree, ...}` after `prefix::`.
    fn group(&mut self, prefix: &[String]) {
        self.pos += 1;
        loop {
            match self.tok(0) {
                None => return,
                Some(Tok::Punct('}')) => {
                    self.pos += 1;
                    return;
                }
                Some(Tok::Ident(_) | Tok::Punct('{' | '*')) => self.tree(prefix.to_vec()),
                Some(_) => self.pos += 1,
            }
        }
    }

    fn leaf(&mut self, mut segs: Vec<String>, glob: bool) {
        let line = self.tokens[self.pos.saturating_sub(1)].line;
        let mut alias = None;
        if let (false, Some(Tok::Ident(as_)), Some(Tok::Ident(name))) =
            (glob, self.tok(0), self.tok(1))
        {
            if as_ == "as" {
                alias = Some(name.clone());
                self.pos += 2;
            }
        }
        // `a::{self}` names `a`.
        if segs.len() > 1 && segs.last().is_some_and(|s| s == "self") {
            segs.pop();
        }
        if !segs.is_empty() {
            self.leaves.push(Leaf {
                segs,
                alias,
                glob,
                line,
            });
        }
    }
}

/// What one file declares and names.
#[derive(Debug, Default)]
struct Scan {
    /// `mod name;`
    mods: Vec<ModDecl>,
    /// Paths starting with `crate::` or `super::`.
    refs: Vec<PathRef>,
}

#[derive(Debug)]
struct ModDecl {
    name: String,
    /// The inline modules (`mod a { ... }`) it is declared in.
    within: Vec<String>,
    line: usize,
    public: bool,
}

#[derive(Debug)]
struct PathRef {
    leaf: Leaf,
    /// The inline modules it is written in: `super` starts from there.
    within: Vec<String>,
}

fn scan(tokens: &[Token]) -> Scan {
    let mut out = Scan::default();
    // Open inline modules, with the brace depth their body opened at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let within = || inline.iter().map(|(name, _)| name.clone()).collect();
        match &tokens[i].tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let Some(Tok::Ident(name)) = tokens.get(i + 1).map(|t| &t.tok) {
                    match tokens.get(i + 2).map(|t| &t.tok) {
                        Some(Tok::Punct(';')) => out.mods.push(ModDecl {
                            name: name.clone(),
                            within: within(),
                            line: tokens[i].line,
                            public: is_pub(tokens, i),
                        }),
                        Some(Tok::Punct('{')) => inline.push((name.clone(), depth)),
                        _ => {}
                    }
                }
            }
            Tok::Ident(_) if starts_path(tokens, i) => {
                let (leaves, next) = parse_tree(tokens, i);
                let within: Vec<String> = within();
                out.refs.extend(leaves.into_iter().map(|leaf| PathRef {
                    leaf,
                    within: within.clone(),
                }));
                i = next;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// `crate::` or `super::` at a path's start; `pub(in crate::x)` is a
/// visibility, not a use.
fn starts_path(tokens: &[Token], i: usize) -> bool {
    let tok = |k: usize| tokens.get(k).map(|t| &t.tok);
    let is = |k: usize, word: &str| matches!(tok(k), Some(Tok::Ident(w)) if w == word);
    let starts = (is(i, "crate") || is(i, "super")) && tok(i + 1) == Some(&Tok::PathSep);
    let continues = i > 0 && tok(i - 1) == Some(&Tok::PathSep);
    let visibility =
        i >= 3 && is(i - 1, "in") && tok(i - 2) == Some(&Tok::Punct('(')) && is(i - 3, "pub");
    starts && !continues && !visibility
}

// ---------------------------------------------------------- the module tree

/// A file of the crate and the module it is.
#[derive(Debug)]
struct FileModule {
    path: String,
    module: Vec<String>,
    scan: Scan,
}

/// Every file reachable from `lib` through `mod name;`: lib, then the
/// others by path.
fn walk(sources: &BTreeMap<String, String>, lib: &str) -> Result<Vec<FileModule>, String> {
    let mut files: Vec<FileModule> = Vec::new();
    let mut queue = VecDeque::from([(lib.to_owned(), Vec::new())]);
    let mut errors = Vec::new();
    while let Some((path, module)) = queue.pop_front() {
        let scan = scan(&lex(&sources[&path]));
        for decl in &scan.mods {
            let mut child = module.clone();
            child.extend(decl.within.iter().cloned());
            child.push(decl.name.clone());
            match module_file(sources, &path, decl) {
                Ok(file) => queue.push_back((file, child)),
                Err(e) => errors.push(format!("{path}:{}: {e}", decl.line)),
            }
        }
        files.push(FileModule { path, module, scan });
    }
    // Reports read in path order; the root stays first.
    files[1..].sort_by(|a, b| a.path.cmp(&b.path));
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(errors.join("\n"))
    }
}

/// Where `mod name;` in `path` lives, as rustc looks for it: beside lib.rs,
/// main.rs and mod.rs; under `foo/` for `foo.rs`; inline modules add a
/// directory each.
fn module_file(
    sources: &BTreeMap<String, String>,
    path: &str,
    decl: &ModDecl,
) -> Result<String, String> {
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    let mut parts: Vec<&str> = vec![dir];
    if !matches!(file, "lib.rs" | "main.rs" | "mod.rs") {
        parts.push(file.trim_end_matches(".rs"));
    }
    parts.extend(decl.within.iter().map(String::as_str));
    parts.push(&decl.name);
    let base = parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    let candidates = [format!("{base}.rs"), format!("{base}/mod.rs")];
    match candidates
        .iter()
        .filter(|c| sources.contains_key(*c))
        .count()
    {
        1 => Ok(candidates
            .into_iter()
            .find(|c| sources.contains_key(c))
            .unwrap()),
        0 => Err(format!(
            "`mod {};` has no file {} or {}",
            decl.name, candidates[0], candidates[1]
        )),
        _ => Err(format!(
            "`mod {};` has two files, {} and {}",
            decl.name, candidates[0], candidates[1]
        )),
    }
}

/// The absolute module path `segs` names from `module`, when it starts
/// with `crate` or `super`.
fn absolute(segs: &[String], module: &[String]) -> Option<Vec<String>> {
    match segs.first()?.as_str() {
        "crate" => Some(segs[1..].to_vec()),
        "super" => {
            let ups = segs.iter().take_while(|s| *s == "super").count();
            let base = module.len().checked_sub(ups)?;
            Some([&module[..base], &segs[ups..]].concat())
        }
        _ => None,
    }
}

// ------------------------------------------------------------- the crate root

/// What the crate root declares: its modules (public or not) and the names
/// its `use` items bring in (re-exports when public), those of its inline
/// modules (`pub mod exec { pub use crate::dataplane::exec::X; }`) too.
#[derive(Debug, Default)]
struct Root {
    modules: BTreeMap<String, bool>,
    /// By their path from the root: `["exec", "X"]`.
    imports: BTreeMap<Vec<String>, Import>,
    /// `use path::*`, by the path of the module it sits in.
    globs: Vec<(Vec<String>, Import)>,
}

#[derive(Debug)]
struct Import {
    /// Absolute, like the paths it resolves.
    source: Vec<String>,
    public: bool,
}

/// The unit a path lands in, and whether it got there through the root's
/// public face.
#[derive(Debug, PartialEq)]
struct Target {
    unit: String,
    via_face: bool,
}

impl Root {
    /// From lib.rs's scan and tokens.
    fn new(mods: &[ModDecl], tokens: &[Token]) -> Root {
        let modules = mods.iter().filter(|d| d.within.is_empty());
        let mut root = Root {
            modules: modules.map(|d| (d.name.clone(), d.public)).collect(),
            ..Root::default()
        };
        // Open braces: an inline module's body (name, pub) or anything else.
        let mut open: Vec<Option<(String, bool)>> = Vec::new();
        for (i, token) in tokens.iter().enumerate() {
            match &token.tok {
                Tok::Punct('{') => open.push(inline_mod_body(tokens, i)),
                Tok::Punct('}') => {
                    open.pop();
                }
                // `use` in a function body imports for that body only.
                Tok::Ident(kw) if kw == "use" && open.iter().all(Option::is_some) => {
                    let module: Vec<String> = open.iter().flatten().map(|m| m.0.clone()).collect();
                    let public = is_pub(tokens, i) && open.iter().flatten().all(|m| m.1);
                    root.add_use(&module, parse_tree(tokens, i + 1).0, public);
                }
                _ => {}
            }
        }
        root
    }

    fn add_use(&mut self, module: &[String], leaves: Vec<Leaf>, public: bool) {
        for leaf in leaves {
            let Some(source) = import_source(&leaf.segs, module) else {
                continue;
            };
            let import = Import { source, public };
            if leaf.glob {
                self.globs.push((module.to_vec(), import));
                continue;
            }
            let name = leaf.alias.or_else(|| leaf.segs.last().cloned());
            if let Some(name) = name.filter(|n| n != "_") {
                let key = [module, &[name]].concat();
                self.imports.insert(key, import);
            }
        }
    }

    /// `path` is absolute (`crate::` stripped); None for the root's own
    /// items and for other crates.
    fn target(&self, path: &[String]) -> Option<Target> {
        self.target_within(path, 0)
    }

    fn target_within(&self, path: &[String], hops: usize) -> Option<Target> {
        let first = path.first()?;
        if let Some(&public) = self.modules.get(first) {
            // A `pub mod` is the face as much as a re-export is: an outside
            // crate names it the same way.
            return Some(Target {
                unit: first.clone(),
                via_face: public,
            });
        }
        // Imports can chain (`pub use exec::X` with `exec` imported).
        if hops >= 8 {
            return None;
        }
        let follow = |import: &Import, rest: &[String]| {
            let target = self.target_within(&[&import.source[..], rest].concat(), hops + 1)?;
            Some(Target {
                via_face: target.via_face || import.public,
                ..target
            })
        };
        if let Some(k) = (1..=path.len()).find(|&k| self.imports.contains_key(&path[..k])) {
            return follow(&self.imports[&path[..k]], &path[k..]);
        }
        // Named items first, as rustc does; then what a glob may bring.
        self.globs
            .iter()
            .filter(|(at, _)| path.len() > at.len() && path.starts_with(at))
            .find_map(|(at, import)| follow(import, &path[at.len()..]))
    }
}

/// `Some((name, pub))` when the `{` at `i` opens `[pub] mod name {`.
fn inline_mod_body(tokens: &[Token], i: usize) -> Option<(String, bool)> {
    let Some(Tok::Ident(name)) = i.checked_sub(1).map(|k| &tokens[k].tok) else {
        return None;
    };
    let is_mod = i >= 2 && tokens[i - 2].tok == Tok::Ident("mod".into());
    is_mod.then(|| (name.clone(), is_pub(tokens, i - 2)))
}

/// Whether the item keyword at `i` is plain `pub` (not `pub(crate)`).
fn is_pub(tokens: &[Token], i: usize) -> bool {
    i > 0 && tokens[i - 1].tok == Tok::Ident("pub".into())
}

/// A `use` path in `module` of the root file, made absolute: `crate::`,
/// `self::` and `super::` as usual, anything else relative to `module`
/// (another crate's name then resolves to nothing).
fn import_source(segs: &[String], module: &[String]) -> Option<Vec<String>> {
    match segs.first()?.as_str() {
        "crate" | "super" => absolute(segs, module),
        "self" => Some([module, &segs[1..]].concat()),
        _ => Some([module, segs].concat()),
    }
}

// ------------------------------------------------------------------ the rules

/// A path in one unit naming another.
#[derive(Debug)]
struct Edge {
    file: String,
    line: usize,
    written: String,
    from: String,
    to: String,
    via_face: bool,
}

impl Edge {
    fn at(&self) -> String {
        format!("{}:{}: `{}`", self.file, self.line, self.written)
    }
}

/// Every path from a unit's file into another unit; the root's own files
/// (lib.rs) are the face and name what they like.
fn edges(files: &[FileModule], root: &Root) -> Vec<Edge> {
    let mut edges = Vec::new();
    for file in files.iter().filter(|f| !f.module.is_empty()) {
        let from = &file.module[0];
        for reference in &file.scan.refs {
            let module = [&file.module[..], &reference.within[..]].concat();
            let Some(target) = absolute(&reference.leaf.segs, &module)
                .and_then(|path| root.target(&path))
                .filter(|t| t.unit != *from)
            else {
                continue;
            };
            edges.push(Edge {
                file: file.path.clone(),
                line: reference.leaf.line,
                written: reference.leaf.written(),
                from: from.clone(),
                to: target.unit,
                via_face: target.via_face,
            });
        }
    }
    edges
}

/// Rules 1 (no upward edge) and 2 (face-only layers name lower ones
/// through the face), one line per offending path.
fn rule_violations(edges: &[Edge], layers: &[Layer]) -> Vec<String> {
    let mut out = Vec::new();
    for edge in edges {
        let (Some(from), Some(to)) = (layer_of(layers, &edge.from), layer_of(layers, &edge.to))
        else {
            continue;
        };
        let units = format!(
            "{} ({}) names {} ({})",
            edge.from,
            describe(from),
            edge.to,
            describe(to)
        );
        if to.number > from.number {
            out.push(format!("{}: upward: {units}", edge.at()));
        } else if from.face_only && to.number != from.number && !edge.via_face {
            out.push(format!(
                "{}: around the face: {units} directly, not through what the crate root publishes",
                edge.at()
            ));
        }
    }
    out
}

fn describe(layer: &Layer) -> String {
    let face = if layer.face_only { ", face only" } else { "" };
    format!("layer {} `{}`{face}", layer.number, layer.name)
}

/// Rule 3: the shortest cycle through each unit that is on one, each
/// reported once, as its edges (the first path found for each).
fn cycles(edges: &[Edge]) -> Vec<Vec<&Edge>> {
    let mut graph: BTreeMap<&str, BTreeMap<&str, &Edge>> = BTreeMap::new();
    for edge in edges {
        graph
            .entry(&edge.from)
            .or_default()
            .entry(&edge.to)
            .or_insert(edge);
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for &unit in graph.keys() {
        let Some(cycle) = shortest_cycle(&graph, unit) else {
            continue;
        };
        // The same cycle from each of its units: keep it once.
        let start = (0..cycle.len()).min_by_key(|&k| &cycle[k]).unwrap_or(0);
        let canonical: Vec<&str> = cycle[start..]
            .iter()
            .chain(&cycle[..start])
            .copied()
            .collect();
        if seen.insert(canonical.clone()) {
            let next = |k: usize| canonical[(k + 1) % canonical.len()];
            out.push(
                (0..canonical.len())
                    .map(|k| graph[canonical[k]][next(k)])
                    .collect(),
            );
        }
    }
    out
}

/// The units of a shortest cycle through `start` (breadth first), without
/// repeating `start` at the end.
fn shortest_cycle<'a>(
    graph: &BTreeMap<&'a str, BTreeMap<&'a str, &Edge>>,
    start: &'a str,
) -> Option<Vec<&'a str>> {
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(unit) = queue.pop_front() {
        for &next in graph.get(unit).into_iter().flat_map(BTreeMap::keys) {
            if next == start {
                let mut cycle = vec![unit];
                while let Some(&up) = parent.get(cycle[cycle.len() - 1]) {
                    cycle.push(up);
                }
                cycle.reverse();
                return Some(cycle);
            }
            if !parent.contains_key(next) {
                parent.insert(next, unit);
                queue.push_back(next);
            }
        }
    }
    None
}

fn describe_cycle(cycle: &[&Edge]) -> String {
    let units: Vec<&str> = cycle
        .iter()
        .map(|e| e.from.as_str())
        .chain(cycle.first().map(|e| e.from.as_str()))
        .collect();
    let at: Vec<String> = cycle
        .iter()
        .map(|e| format!("{} -> {} at {}", e.from, e.to, e.at()))
        .collect();
    format!("cycle: {} ({})", units.join(" -> "), at.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// The paths a source names, as written, with their lines.
    fn paths(source: &str) -> Vec<(String, usize)> {
        let refs = scan(&lex(source)).refs;
        refs.iter()
            .map(|r| (r.leaf.written(), r.leaf.line))
            .collect()
    }

    fn written(source: &str) -> Vec<String> {
        paths(source).into_iter().map(|(path, _)| path).collect()
    }

    fn sources(files: &[(&str, &str)]) -> BTreeMap<String, String> {
        files
            .iter()
            .map(|(path, text)| ((*path).to_owned(), (*text).to_owned()))
            .collect()
    }

    #[test]
    fn lexer_skips_comments_and_strings() {
        let source = r####"
            // crate::line
            /// crate::doc
            //! crate::inner_doc
            /* crate::block /* crate::nested */ crate::still_comment */
            /** crate::block_doc */
            let a = "crate::string \" crate::escaped";
            let b = r"crate::raw";
            let c = r#"crate::raw_hash " crate::inside"#;
            let d = br##"crate::raw_bytes "# crate::inside"##;
            let e = b"crate::bytes";
            let f = c"crate::c_string";
            let g = b'"'; let h = '"'; let i = "multi
                line crate::string";
            use crate::real;
        "####;
        assert_eq!(paths(source), vec![("crate::real".to_owned(), 15)]);
    }

    #[test]
    fn lexer_tells_chars_from_lifetimes() {
        let source = r#"
            fn f<'a>(x: &'a str) -> &'static str {
                let _ = ['\'', '\\', '\n', '\u{1F600}', 'x', '{', 'é'];
                'outer: loop { break 'outer; }
                crate::after(x)
            }
        "#;
        assert_eq!(paths(source), vec![("crate::after".to_owned(), 5)]);
        let idents: Vec<Tok> = lex("'a b 'c' r#mod").into_iter().map(|t| t.tok).collect();
        assert_eq!(
            idents,
            vec![
                Tok::Ident("b".into()),
                Tok::Literal,
                Tok::Ident("r#mod".into())
            ]
        );
    }

    #[test]
    fn use_trees_expand() {
        let source = "
            use crate::{a::b, c};
            use crate::a::{b, c::{d, self}, e as f};
            use super::{x, y};
            use super::super::z;
            use super::*;
            let v = crate::m::f::<T>(super::super::K);
            pub(crate) fn g() {}
            pub(in crate::hidden) fn h() {}
        ";
        assert_eq!(
            written(source),
            strings(&[
                "crate::a::b",
                "crate::c",
                "crate::a::b",
                "crate::a::c::d",
                "crate::a::c",
                "crate::a::e",
                "super::x",
                "super::y",
                "super::super::z",
                "super::*",
                "crate::m::f",
                "super::super::K",
            ])
        );
    }

    #[test]
    fn super_starts_from_the_inline_module() {
        let files = sources(&[
            ("lib.rs", "mod engine;"),
            ("engine/mod.rs", "mod usage;"),
            (
                "engine/usage.rs",
                "use super::x;\n#[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::y;\n}\nuse super::z;",
            ),
        ]);
        let files = walk(&files, "lib.rs").unwrap();
        let usage = files.iter().find(|f| f.path == "engine/usage.rs").unwrap();
        assert_eq!(usage.module, strings(&["engine", "usage"]));
        let resolved: Vec<Vec<String>> = usage
            .scan
            .refs
            .iter()
            .map(|r| absolute(&r.leaf.segs, &[&usage.module[..], &r.within[..]].concat()).unwrap())
            .collect();
        let expected = [
            &["engine", "x"][..],
            &["engine", "usage"],
            &["engine", "y"],
            &["engine", "z"],
        ];
        assert_eq!(resolved, expected.map(strings));
    }

    #[test]
    fn module_files_follow_rustc() {
        let files = sources(&[
            ("src/lib.rs", "mod a; mod b;"),
            ("src/a.rs", "mod c; mod inline { mod d; }"),
            ("src/a/c.rs", ""),
            ("src/a/inline/d.rs", ""),
            ("src/b/mod.rs", "mod e;"),
            ("src/b/e.rs", ""),
        ]);
        let walked = walk(&files, "src/lib.rs").unwrap();
        let modules: Vec<(String, String)> = walked
            .iter()
            .map(|f| (f.path.clone(), f.module.join("::")))
            .collect();
        assert!(modules.contains(&("src/a/inline/d.rs".into(), "a::inline::d".into())));
        assert!(modules.contains(&("src/b/e.rs".into(), "b::e".into())));
        assert_eq!(modules.len(), 6);

        let missing = sources(&[("lib.rs", "\nmod gone;")]);
        let err = walk(&missing, "lib.rs").unwrap_err();
        assert!(
            err.contains("lib.rs:2: `mod gone;` has no file gone.rs or gone/mod.rs"),
            "{err}"
        );
    }

    const ROOT: &str = "
        mod engine;
        mod dataplane;
        mod policy;
        pub mod config;
        pub use engine::{now_ms, Engine as TheEngine};
        pub use config::Config;
        pub use policy::embedded as policies;
        pub use dataplane::{exec, files::{self, Upload}};
        pub use exec::ExecOptions;
        pub use sandbox_contract::{BackendId, Status};
        use engine::Private;
        pub mod wire { pub use crate::dataplane::run::*; }
        fn helper() { use engine::NotAnImport; }
    ";

    fn target(root: &Root, path: &str) -> Option<(String, bool)> {
        let path = strings(&path.split("::").collect::<Vec<_>>());
        root.target(&path).map(|t| (t.unit, t.via_face))
    }

    #[test]
    fn root_reexports_resolve_to_their_module() {
        let tokens = lex(ROOT);
        let root = Root::new(&scan(&tokens).mods, &tokens);
        let face = |unit: &str| Some((unit.to_owned(), true));
        assert_eq!(target(&root, "now_ms"), face("engine"));
        assert_eq!(target(&root, "TheEngine::new"), face("engine"));
        assert_eq!(target(&root, "policies::PER_USER"), face("policy"));
        assert_eq!(target(&root, "exec::ExecOptions"), face("dataplane"));
        assert_eq!(target(&root, "ExecOptions"), face("dataplane"));
        assert_eq!(target(&root, "files::FileError"), face("dataplane"));
        assert_eq!(target(&root, "Upload"), face("dataplane"));
        assert_eq!(target(&root, "wire::Runner"), face("dataplane"));
        assert_eq!(target(&root, "config::Config"), face("config"));
        assert_eq!(target(&root, "Private"), Some(("engine".to_owned(), false)));
        assert_eq!(
            target(&root, "engine::Engine"),
            Some(("engine".to_owned(), false))
        );
        assert_eq!(target(&root, "BackendId"), None);
        assert_eq!(target(&root, "helper"), None);
        assert_eq!(target(&root, "NotAnImport"), None);
    }

    const BLOCK: &str = "//! The crate.
//!
//! # Layers
//!
//! Bottom to top. Free prose,
//! over two lines.
//!
//! 1. `base`: `error`, `config`, `clock`
//! 2. `wire`: `dataplane`
//! 3. `provider`: `provider`
//! 4. `engine`: `engine`
//! 5. `policy`: `policy`
//! 6. `facade`: `sandbox`, `view`
//! 7. `surface` (face only): `serve`, `image`
//!
//! Prose after the list ends it.
//! 8. `not`: `a_layer`
";

    #[test]
    fn block_parses() {
        let layers = parse_layers(BLOCK).unwrap();
        assert_eq!(layers.len(), 7);
        assert_eq!(
            layers[0],
            Layer {
                number: 1,
                name: "base".into(),
                face_only: false,
                units: strings(&["error", "config", "clock"]),
            }
        );
        assert_eq!(layers[6].name, "surface");
        assert!(layers[6].face_only);
        assert_eq!(layers[6].units, strings(&["serve", "image"]));
        assert!(layers[..6].iter().all(|l| !l.face_only));
        // A heading ends the block too.
        let headed = "//! # Layers\n//! 1. `a`: `x`\n//! # Next\n//! 2. `b`: `y`\n";
        assert_eq!(parse_layers(headed).unwrap().len(), 1);
    }

    #[test]
    fn block_errors() {
        let err = |lib: &str| parse_layers(lib).unwrap_err();
        assert!(err("//! Nothing here.\n").contains("no `//! # Layers` block"));
        assert!(err("//! # Layers\n//!\n//! Prose only.\n").contains("lists no layer"));
        let untick = err("//! # Layers\n//! 1. `a`: x\n");
        assert!(
            untick.starts_with(":2: expected a name in backticks"),
            "{untick}"
        );
        let colon = err("//! # Layers\n//! 1. `a` `x`\n");
        assert!(colon.starts_with(":2: expected \"`layer`:"), "{colon}");
        let numbered = err("//! # Layers\n//! 1. `a`: `x`\n//! 3. `b`: `y`\n");
        assert!(
            numbered.starts_with(":3: layer numbered 3, expected 2"),
            "{numbered}"
        );
        assert!(
            err("//! # Layers\n//! 1. `a`: `x`\n//! 2. `b`: `x`\n").contains("`x` is listed twice")
        );
    }

    /// A small crate: `base` (error) < `engine` (engine, lifecycle) <
    /// `surface` (serve, face only); `extra` goes into lib.rs.
    fn small_crate(files: &[(&str, &str)], extra: &str) -> Result<String, String> {
        let lib = format!(
            "//! # Layers\n//!\n//! 1. `base`: `error`\n//! 2. `engine`: `engine`, `lifecycle`\n\
             //! 3. `surface` (face only): `serve`\n\n\
             mod error;\nmod engine;\nmod lifecycle;\npub mod serve;\n\
             pub use engine::now_ms;\npub use error::Error;\n{extra}"
        );
        let mut all = sources(files);
        for unit in ["error", "engine", "lifecycle", "serve"] {
            all.entry(format!("src/{unit}.rs")).or_default();
        }
        all.insert("src/lib.rs".into(), lib);
        check_sources(&all, "src/lib.rs")
    }

    #[test]
    fn a_clean_crate_passes() {
        let summary = small_crate(
            &[
                (
                    "src/engine.rs",
                    "use crate::error::Error;\npub fn now_ms() {}",
                ),
                ("src/lifecycle.rs", "use crate::engine::now_ms;"),
                (
                    "src/serve.rs",
                    "use crate::{now_ms, Error};\nfn f() { crate::helper() }",
                ),
            ],
            "fn helper() {}",
        )
        .unwrap();
        assert_eq!(
            summary,
            "layers: 4 units in 3 layers, 4 unit edges (4 paths) checked, \
             none upward, none around the face, no cycles"
        );
    }

    #[test]
    fn rule_1_no_upward_edge() {
        let err = small_crate(
            &[(
                "src/error.rs",
                "\n#[cfg(test)]\nmod tests {\n    use super::super::engine::Clock;\n}",
            )],
            "",
        )
        .unwrap_err();
        assert!(
            err.contains(
                "src/error.rs:4: `super::super::engine::Clock`: upward: error (layer 1 `base`) \
                 names engine (layer 2 `engine`)"
            ),
            "{err}"
        );
    }

    #[test]
    fn rule_2_face_only_goes_through_the_root() {
        let err = small_crate(
            &[(
                "src/serve.rs",
                "use crate::now_ms;\nfn f() { crate::engine::now_ms() }",
            )],
            "",
        )
        .unwrap_err();
        assert!(err.starts_with("1 layer violation(s) in src:\n"), "{err}");
        assert!(
            err.contains(
                "src/serve.rs:2: `crate::engine::now_ms`: around the face: serve (layer 3 `surface`, \
                 face only) names engine (layer 2 `engine`) directly"
            ),
            "{err}"
        );
    }

    #[test]
    fn rule_3_no_cycles() {
        let err = small_crate(
            &[
                ("src/engine.rs", "use crate::lifecycle::gc;"),
                ("src/lifecycle.rs", "\n\nfn f() -> crate::engine::Engine {}"),
            ],
            "",
        )
        .unwrap_err();
        assert!(
            err.contains(
                "cycle: engine -> lifecycle -> engine \
                 (engine -> lifecycle at src/engine.rs:1: `crate::lifecycle::gc`; \
                 lifecycle -> engine at src/lifecycle.rs:3: `crate::engine::Engine`)"
            ),
            "{err}"
        );
        assert_eq!(err.matches("\ncycle: ").count(), 1, "{err}");
    }

    #[test]
    fn the_block_lists_exactly_the_modules() {
        let err = small_crate(&[("src/view.rs", "")], "mod view;").unwrap_err();
        assert!(
            err.contains("src/lib.rs: `mod view;` is in no layer"),
            "{err}"
        );
        let lib = "//! # Layers\n//! 1. `base`: `error`, `clock`\nmod error;\n";
        let all = sources(&[("lib.rs", lib), ("error.rs", "")]);
        let err = check_sources(&all, "lib.rs").unwrap_err();
        assert!(
            err.contains("lists `clock` (layer 1 `base`), which is not a module"),
            "{err}"
        );
    }
}
