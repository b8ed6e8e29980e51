//! A small Rust lexer for the repository rules: enough to tell code from comments and literals.
//!
//! Comments (nested block comments too) are dropped; string, byte-string, C-string and raw-string
//! literals are one token holding their content; char literals and lifetimes are told apart;
//! `::` is one token. Every token keeps its line. It does not parse: the rules look at token
//! sequences. [`strip_test_code`] removes items under `#[cfg(test)]`.

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Ident(String),
    /// A string, byte-string, C-string or raw-string literal: its (unescaped) content.
    Str(String),
    Num(String),
    Char,
    Lifetime,
    /// `::`, or one punctuation character.
    Punct(String),
}

#[derive(Debug, Clone)]
pub struct Token {
    pub tok: Tok,
    pub line: usize,
}

impl Token {
    pub fn ident(&self) -> Option<&str> {
        match &self.tok {
            Tok::Ident(s) => Some(s),
            _ => None,
        }
    }
    pub fn is(&self, p: &str) -> bool {
        matches!(&self.tok, Tok::Punct(s) if s == p)
    }
    pub fn is_ident(&self, name: &str) -> bool {
        self.ident() == Some(name)
    }
    pub fn str(&self) -> Option<&str> {
        match &self.tok {
            Tok::Str(s) => Some(s),
            _ => None,
        }
    }
}

struct Lexer {
    c: Vec<char>,
    i: usize,
    line: usize,
}

impl Lexer {
    fn at(&self, k: usize) -> char {
        self.c.get(self.i + k).copied().unwrap_or('\0')
    }
    fn bump(&mut self) -> char {
        let ch = self.at(0);
        if ch == '\n' {
            self.line += 1;
        }
        self.i += 1;
        ch
    }
    fn skip_block_comment(&mut self) {
        self.i += 2;
        let mut depth = 1;
        while self.i < self.c.len() && depth > 0 {
            if self.at(0) == '/' && self.at(1) == '*' {
                depth += 1;
                self.i += 2;
            } else if self.at(0) == '*' && self.at(1) == '/' {
                depth -= 1;
                self.i += 2;
            } else {
                self.bump();
            }
        }
    }
    /// `r"…"`, `r#"…"#`, `br…`, `cr…` at the cursor: its content.
    fn raw_string(&mut self) -> Option<String> {
        let mut j = self.i;
        if matches!(self.c.get(j), Some('b' | 'c')) {
            j += 1;
        }
        if self.c.get(j) != Some(&'r') {
            return None;
        }
        j += 1;
        let mut hashes = 0;
        while self.c.get(j) == Some(&'#') {
            hashes += 1;
            j += 1;
        }
        if self.c.get(j) != Some(&'"') {
            return None;
        }
        self.i = j + 1;
        let mut s = String::new();
        while self.i < self.c.len() {
            if self.at(0) == '"' && (1..=hashes).all(|k| self.at(k) == '#') {
                self.i += 1 + hashes;
                return Some(s);
            }
            s.push(self.bump());
        }
        Some(s)
    }
    /// A `"…"` literal with the cursor on the opening quote: its unescaped content.
    fn string(&mut self) -> String {
        self.i += 1;
        let mut s = String::new();
        while self.i < self.c.len() {
            match self.bump() {
                '"' => break,
                '\\' => self.escape(&mut s),
                ch => s.push(ch),
            }
        }
        s
    }
    fn escape(&mut self, s: &mut String) {
        match self.bump() {
            'n' => s.push('\n'),
            't' => s.push('\t'),
            'r' => s.push('\r'),
            '0' => s.push('\0'),
            'x' => {
                let hex: String = [self.bump(), self.bump()].iter().collect();
                s.push(u8::from_str_radix(&hex, 16).map_or('?', char::from));
            }
            'u' => {
                let mut hex = String::new();
                while self.i < self.c.len() && self.at(0) != '}' {
                    let ch = self.bump();
                    if ch != '{' {
                        hex.push(ch);
                    }
                }
                self.bump();
                let ch = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32);
                s.push(ch.unwrap_or('?'));
            }
            '\n' => {
                while self.at(0).is_whitespace() {
                    self.bump();
                }
            }
            ch => s.push(ch),
        }
    }
    /// A char literal or a lifetime, the cursor on `'`.
    fn quote(&mut self) -> Tok {
        if self.at(1) == '\\' {
            self.i += 2;
            self.bump();
            while self.i < self.c.len() && self.at(0) != '\'' {
                self.bump();
            }
            self.i += 1;
            Tok::Char
        } else if self.at(2) == '\'' {
            self.i += 3;
            Tok::Char
        } else {
            self.i += 1;
            while is_ident_char(self.at(0)) {
                self.i += 1;
            }
            Tok::Lifetime
        }
    }
    fn ident(&mut self) -> String {
        if self.at(0) == 'r' && self.at(1) == '#' && is_ident_start(self.at(2)) {
            self.i += 2;
        }
        let start = self.i;
        while is_ident_char(self.at(0)) {
            self.i += 1;
        }
        self.c[start..self.i].iter().collect()
    }
    fn number(&mut self) -> String {
        let start = self.i;
        while is_ident_char(self.at(0)) || (self.at(0) == '.' && self.at(1).is_ascii_digit()) {
            self.i += 1;
        }
        self.c[start..self.i].iter().collect()
    }
    fn next(&mut self) -> Option<Token> {
        loop {
            let ch = self.at(0);
            if self.i >= self.c.len() {
                return None;
            }
            if ch.is_whitespace() {
                self.bump();
            } else if ch == '/' && self.at(1) == '/' {
                while self.i < self.c.len() && self.at(0) != '\n' {
                    self.i += 1;
                }
            } else if ch == '/' && self.at(1) == '*' {
                self.skip_block_comment();
            } else {
                break;
            }
        }
        let line = self.line;
        let ch = self.at(0);
        let tok = if let Some(s) = self.raw_string() {
            Tok::Str(s)
        } else if ch == '"' {
            Tok::Str(self.string())
        } else if matches!(ch, 'b' | 'c') && self.at(1) == '"' {
            self.i += 1;
            Tok::Str(self.string())
        } else if ch == 'b' && self.at(1) == '\'' {
            self.i += 1;
            self.quote()
        } else if is_ident_start(ch) {
            Tok::Ident(self.ident())
        } else if ch.is_ascii_digit() {
            Tok::Num(self.number())
        } else if ch == '\'' {
            self.quote()
        } else if ch == ':' && self.at(1) == ':' {
            self.i += 2;
            Tok::Punct("::".into())
        } else {
            self.i += 1;
            Tok::Punct(ch.to_string())
        };
        Some(Token { tok, line })
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

pub fn lex(src: &str) -> Vec<Token> {
    let mut l = Lexer {
        c: src.chars().collect(),
        i: 0,
        line: 1,
    };
    std::iter::from_fn(|| l.next()).collect()
}

/// The index of the bracket closing the one at `open`.
pub fn matching(t: &[Token], open: usize) -> usize {
    let (o, c) = match &t[open].tok {
        Tok::Punct(p) if p == "(" => ("(", ")"),
        Tok::Punct(p) if p == "[" => ("[", "]"),
        _ => ("{", "}"),
    };
    let mut depth = 0;
    for (k, tok) in t.iter().enumerate().skip(open) {
        if tok.is(o) {
            depth += 1;
        } else if tok.is(c) {
            depth -= 1;
            if depth == 0 {
                return k;
            }
        }
    }
    t.len()
}

/// The tokens without any item under `#[cfg(test)]` (or `cfg(all(test, …))`); nothing at all
/// for a file with `#![cfg(test)]`.
pub fn strip_test_code(t: Vec<Token>) -> Vec<Token> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < t.len() {
        if t[i].is("#") {
            let inner = t.get(i + 1).is_some_and(|x| x.is("!"));
            let open = if inner { i + 2 } else { i + 1 };
            if t.get(open).is_some_and(|x| x.is("[")) {
                let close = matching(&t, open);
                if is_cfg_test(&t[open + 1..close.min(t.len())]) {
                    if inner {
                        return Vec::new();
                    }
                    i = end_of_item(&t, close + 1);
                    continue;
                }
            }
        }
        out.push(t[i].clone());
        i += 1;
    }
    out
}

fn is_cfg_test(attr: &[Token]) -> bool {
    attr.first().is_some_and(|x| x.is_ident("cfg"))
        && attr.iter().any(|x| x.is_ident("test"))
        && !attr.iter().any(|x| x.is_ident("not"))
}

/// Where the item starting at `i` (after its attributes) ends: past its `;` or its body's `}`,
/// past the `,` ending a field, or before the `}` / `)` that closes what holds it.
fn end_of_item(t: &[Token], mut i: usize) -> usize {
    while i < t.len() && t[i].is("#") && t.get(i + 1).is_some_and(|x| x.is("[")) {
        i = matching(t, i + 1) + 1;
    }
    let mut depth = 0i32;
    while i < t.len() {
        let x = &t[i];
        if x.is("(") || x.is("[") {
            depth += 1;
        } else if x.is(")") || x.is("]") || x.is("}") {
            if depth == 0 {
                return i;
            }
            depth -= 1;
        } else if depth == 0 && (x.is(";") || x.is(",")) {
            return i + 1;
        } else if depth == 0 && x.is("{") {
            let close = matching(t, i);
            // `struct S { … }`, `mod m { … }`, `fn f() { … }` end here; a `{` inside an
            // expression (`const X: T = T { … };`) is followed by more of the item.
            if t.get(close + 1).is_some_and(|n| n.is(";")) {
                return close + 2;
            }
            return close + 1;
        }
        i += 1;
    }
    t.len()
}

/// A lexed file (relative path from the workspace root), `#[cfg(test)]` code removed.
pub struct Source {
    pub rel: String,
    pub toks: Vec<Token>,
}

impl Source {
    pub fn new(rel: &str, src: &str) -> Source {
        Source {
            rel: rel.to_string(),
            toks: strip_test_code(lex(src)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idents(src: &str) -> Vec<String> {
        lex(src)
            .into_iter()
            .filter_map(|t| t.ident().map(str::to_string))
            .collect()
    }

    fn strs(src: &str) -> Vec<String> {
        lex(src)
            .into_iter()
            .filter_map(|t| t.str().map(str::to_string))
            .collect()
    }

    #[test]
    fn comments_are_not_code_and_strings_are_one_token() {
        let src = r##"
            // Command::new("qemu-img") in a line comment
            /* outer /* nested Command::new("qemu-img") */ still comment */
            /// doc: std::env::var("X")
            let a = "a // not a comment, /* nor this */";
            let b = r#"raw "quoted" crate::jobs::Jobs"#;
            let c = b"bytes"; let d = '"'; let e = '\''; let f: &'static str = "x\"y";
            fn g<'a>(x: &'a u8) {}
        "##;
        assert_eq!(
            idents(src),
            [
                "let", "a", "let", "b", "let", "c", "let", "d", "let", "e", "let", "f", "str",
                "fn", "g", "x", "u8"
            ]
        );
        assert_eq!(
            strs(src),
            [
                "a // not a comment, /* nor this */",
                "raw \"quoted\" crate::jobs::Jobs",
                "bytes",
                "x\"y"
            ]
        );
    }

    #[test]
    fn line_numbers_count_lines_inside_comments_and_strings() {
        let t = lex("a\n/* x\ny */ b \"p\nq\" c");
        let lines: Vec<usize> = t.iter().map(|t| t.line).collect();
        assert_eq!(lines, [1, 3, 3, 4]);
    }

    #[test]
    fn cfg_test_items_are_left_out() {
        let src = "fn live() { a(); }\n#[cfg(test)]\n\
                   mod tests { fn t() { Command::new(\"qemu-img\"); } }\n\
                   #[cfg(all(test, unix))] fn helper() { std::env::var(\"X\"); }\n\
                   #[cfg(not(test))] fn real() { b(); }\n\
                   struct S { a: u8, #[cfg(test)] probe: u8, c: u8 }\nfn after() {}";
        let s = Source::new("proxy/src/x.rs", src);
        let ids: Vec<&str> = s.toks.iter().filter_map(Token::ident).collect();
        assert_eq!(
            ids,
            [
                "fn", "live", "a", "cfg", "not", "test", "fn", "real", "b", "struct", "S", "a",
                "u8", "c", "u8", "fn", "after"
            ]
        );
        assert!(Source::new("x.rs", "#![cfg(test)]\nfn f() {}")
            .toks
            .is_empty());
    }
}
