//! Audience rules: a small PQL-like language over a profile's attribute [`Leaves`].
//!
//! ```text
//! rule      := or
//! or        := and ("or" and)*
//! and       := unary ("and" unary)*
//! unary     := "not" unary | primary
//! primary   := "(" or ")" | "true" | "false" | "exists" PATH
//!            | PATH ("=" | "!=" | "<" | "<=" | ">" | ">=") LITERAL
//!            | PATH "in" "[" LITERAL ("," LITERAL)* "]"
//!            | PATH ("contains" | "startsWith" | "endsWith") STRING
//! LITERAL   := STRING | NUMBER | "true" | "false" | "null"
//! PATH      := SEGMENT ("." SEGMENT)*        SEGMENT := [A-Za-z_][A-Za-z0-9_]*
//! ```
//!
//! Strings and numbers are written as in JSON. `not` binds tighter than `and`, which binds
//! tighter than `or`. Keywords are lower case and reserved: a keyword is never a whole path
//! (though it may be one segment of a dotted path), and `AND` where an operator belongs is an
//! error, not a synonym.
//!
//! Evaluation is total: a comparison (`!=` included) with a missing path, or between values of
//! different types, is false. The exceptions are `null`: `p = null` holds when `p` is null and
//! `p != null` when `p` has any other value, an object included. Strings order by code point,
//! numbers numerically (`1 = 1.0`), booleans support only `=` and `!=`, and arrays and objects
//! equal no literal. `contains`, `startsWith` and `endsWith` are case-sensitive and apply to
//! strings only. `exists p` holds when `p` is a leaf of any value, `false` and `null` included,
//! or an object with leaves below it.
//!
//! Rule text comes from users, so parsing never panics: every problem is a [`RuleError`] naming
//! the 1-based character column of the offending token (one past the last character for a rule
//! that ends too soon).

use std::cmp::Ordering;
use std::collections::BTreeSet;

use crate::leaf::{Leaf, Leaves, Lookup, lookup};

/// How deeply parentheses and `not` may nest; bounds the recursion of parsing and evaluation.
const MAX_DEPTH: usize = 100;

/// A parsed audience rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    expr: Expr,
}

/// Why a rule's text does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct RuleError {
    /// The 1-based character column of the offending token.
    pub column: usize,
    pub message: String,
}

impl Rule {
    /// Parses rule text.
    pub fn parse(src: &str) -> Result<Rule, RuleError> {
        let mut parser = Parser::new(src)?;
        if parser.current.tok == Tok::End {
            return Err(error(1, "the rule is empty"));
        }
        let expr = parser.or()?;
        let rest = &parser.current;
        match rest.tok {
            Tok::End => Ok(Rule { expr }),
            Tok::RParen => Err(error(rest.column, "unmatched ')'")),
            _ => Err(error(
                rest.column,
                format!(
                    "expected 'and', 'or' or the end of the rule, found {}",
                    rest.describe()
                ),
            )),
        }
    }

    /// Whether a profile with these attribute leaves satisfies the rule.
    pub fn eval(&self, leaves: &Leaves) -> bool {
        self.expr.eval(leaves)
    }

    /// Every attribute path the rule reads (for dependency tracking), deduplicated, sorted.
    pub fn paths(&self) -> Vec<String> {
        let mut paths = BTreeSet::new();
        self.expr.collect_paths(&mut paths);
        paths.into_iter().map(str::to_owned).collect()
    }
}

fn error(column: usize, message: impl Into<String>) -> RuleError {
    RuleError {
        column,
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The syntax tree and its evaluation.

#[derive(Clone, Debug, PartialEq)]
enum Expr {
    Const(bool),
    Exists(String),
    Compare {
        path: String,
        op: CmpOp,
        value: Literal,
    },
    In {
        path: String,
        values: Vec<Literal>,
    },
    Text {
        path: String,
        op: TextOp,
        needle: String,
    },
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

#[derive(Clone, Debug, PartialEq)]
enum Literal {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextOp {
    Contains,
    StartsWith,
    EndsWith,
}

impl Expr {
    fn eval(&self, leaves: &Leaves) -> bool {
        match self {
            Expr::Const(b) => *b,
            Expr::Exists(path) => lookup(leaves, path).is_some(),
            Expr::Compare { path, op, value } => compare(lookup(leaves, path), *op, value),
            Expr::In { path, values } => {
                let found = lookup(leaves, path);
                values.iter().any(|value| compare(found, CmpOp::Eq, value))
            }
            Expr::Text { path, op, needle } => match lookup(leaves, path) {
                Some(Lookup::Leaf(Leaf::Str(s))) => match op {
                    TextOp::Contains => s.contains(needle.as_str()),
                    TextOp::StartsWith => s.starts_with(needle.as_str()),
                    TextOp::EndsWith => s.ends_with(needle.as_str()),
                },
                _ => false,
            },
            Expr::Not(inner) => !inner.eval(leaves),
            Expr::And(terms) => terms.iter().all(|t| t.eval(leaves)),
            Expr::Or(terms) => terms.iter().any(|t| t.eval(leaves)),
        }
    }

    fn collect_paths<'a>(&'a self, out: &mut BTreeSet<&'a str>) {
        match self {
            Expr::Const(_) => {}
            Expr::Exists(path)
            | Expr::Compare { path, .. }
            | Expr::In { path, .. }
            | Expr::Text { path, .. } => {
                out.insert(path);
            }
            Expr::Not(inner) => inner.collect_paths(out),
            Expr::And(terms) | Expr::Or(terms) => terms.iter().for_each(|t| t.collect_paths(out)),
        }
    }
}

/// `found op value`, false for a missing path or mismatched types (see the module doc on null).
fn compare(found: Option<Lookup<'_>>, op: CmpOp, value: &Literal) -> bool {
    let leaf = match found {
        None => return false,
        Some(Lookup::Object) => return op == CmpOp::Ne && *value == Literal::Null,
        Some(Lookup::Leaf(leaf)) => leaf,
    };
    match (leaf, value) {
        (Leaf::Null, Literal::Null) => op == CmpOp::Eq,
        (_, Literal::Null) => op == CmpOp::Ne,
        (Leaf::Bool(a), Literal::Bool(b)) => match op {
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
            _ => false,
        },
        (Leaf::Num(_), Literal::Num(b)) => leaf
            .as_f64()
            .and_then(|a| a.partial_cmp(b))
            .is_some_and(|ordering| op.holds(ordering)),
        (Leaf::Str(a), Literal::Str(b)) => op.holds((**a).cmp(b.as_str())),
        _ => false,
    }
}

impl CmpOp {
    /// Whether `a op b` holds, given how `a` orders against `b`.
    fn holds(self, ordering: Ordering) -> bool {
        match self {
            CmpOp::Eq => ordering.is_eq(),
            CmpOp::Ne => ordering.is_ne(),
            CmpOp::Lt => ordering.is_lt(),
            CmpOp::Le => ordering.is_le(),
            CmpOp::Gt => ordering.is_gt(),
            CmpOp::Ge => ordering.is_ge(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lexer: characters to tokens, each with its column and source text.

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Keyword(Keyword),
    Path(String),
    Str(String),
    Num(f64),
    Cmp(CmpOp),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keyword {
    And,
    Or,
    Not,
    In,
    Contains,
    StartsWith,
    EndsWith,
    Exists,
    True,
    False,
    Null,
}

const KEYWORDS: [(&str, Keyword); 11] = [
    ("and", Keyword::And),
    ("or", Keyword::Or),
    ("not", Keyword::Not),
    ("in", Keyword::In),
    ("contains", Keyword::Contains),
    ("startsWith", Keyword::StartsWith),
    ("endsWith", Keyword::EndsWith),
    ("exists", Keyword::Exists),
    ("true", Keyword::True),
    ("false", Keyword::False),
    ("null", Keyword::Null),
];

struct Token {
    tok: Tok,
    /// 1-based character column of the token's first character.
    column: usize,
    /// The token as written, for messages.
    text: String,
}

impl Token {
    fn describe(&self) -> String {
        let hint = match &self.tok {
            Tok::Path(word) => KEYWORDS
                .iter()
                .find(|(keyword, _)| keyword.eq_ignore_ascii_case(word))
                .map(|(keyword, _)| format!(" (keywords are written '{keyword}')"))
                .unwrap_or_default(),
            _ => String::new(),
        };
        match self.tok {
            Tok::End => "the end of the rule".to_owned(),
            Tok::Str(_) => format!("the string {}", self.text),
            _ => format!("'{}'{hint}", self.text),
        }
    }
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
}

impl Lexer {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    fn eat(&mut self, c: char) -> bool {
        let matched = self.peek() == Some(c);
        if matched {
            self.pos += 1;
        }
        matched
    }

    /// The column of the next character (one past the end at the end).
    fn column(&self) -> usize {
        self.pos + 1
    }

    fn next_token(&mut self) -> Result<Token, RuleError> {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
        let start = self.pos;
        let column = self.column();
        let Some(c) = self.bump() else {
            return Ok(Token {
                tok: Tok::End,
                column,
                text: String::new(),
            });
        };
        let tok = match c {
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '[' => Tok::LBracket,
            ']' => Tok::RBracket,
            ',' => Tok::Comma,
            '=' => Tok::Cmp(CmpOp::Eq),
            '!' if self.eat('=') => Tok::Cmp(CmpOp::Ne),
            '!' => return Err(error(column, "expected '!=' (negation is written 'not')")),
            '<' if self.eat('=') => Tok::Cmp(CmpOp::Le),
            '<' => Tok::Cmp(CmpOp::Lt),
            '>' if self.eat('=') => Tok::Cmp(CmpOp::Ge),
            '>' => Tok::Cmp(CmpOp::Gt),
            '"' => self.string(column)?,
            '-' | '0'..='9' => self.number(column, c)?,
            c if is_segment_start(c) => self.word()?,
            other => return Err(error(column, format!("unexpected character '{other}'"))),
        };
        let text = self.chars[start..self.pos].iter().collect();
        Ok(Token { tok, column, text })
    }

    /// A path or keyword whose first character has been read.
    fn word(&mut self) -> Result<Tok, RuleError> {
        let start = self.pos - 1;
        let mut dotted = false;
        loop {
            while self.peek().is_some_and(is_segment_char) {
                self.pos += 1;
            }
            if !self.eat('.') {
                break;
            }
            dotted = true;
            let column = self.column();
            if !self.bump().is_some_and(is_segment_start) {
                return Err(error(column, "expected a path segment after '.'"));
            }
        }
        let word: String = self.chars[start..self.pos].iter().collect();
        let keyword = KEYWORDS.iter().find(|(text, _)| !dotted && *text == word);
        Ok(match keyword {
            Some((_, keyword)) => Tok::Keyword(*keyword),
            None => Tok::Path(word),
        })
    }

    /// A JSON number whose first character, `first` (`-` or a digit) at `column`, has been read.
    fn number(&mut self, column: usize, first: char) -> Result<Tok, RuleError> {
        let start = self.pos - 1;
        let first = if first == '-' {
            let digit_column = self.column();
            match self.bump() {
                Some(digit) if digit.is_ascii_digit() => digit,
                _ => return Err(error(digit_column, "expected a digit after '-'")),
            }
        } else {
            first
        };
        if first == '0' {
            if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err(error(self.column(), "numbers do not start with '0'"));
            }
        } else {
            self.digits();
        }
        if self.eat('.') {
            self.expect_digits("expected a digit after '.'")?;
        }
        if self.eat('e') || self.eat('E') {
            if !self.eat('+') {
                self.eat('-');
            }
            self.expect_digits("expected a digit in the exponent")?;
        }
        let text: String = self.chars[start..self.pos].iter().collect();
        match text.parse::<f64>() {
            Ok(value) if value.is_finite() => Ok(Tok::Num(value)),
            _ => Err(error(column, format!("number {text} is out of range"))),
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn expect_digits(&mut self, message: &str) -> Result<(), RuleError> {
        let column = self.column();
        if self.digits() == 0 {
            return Err(error(column, message));
        }
        Ok(())
    }

    /// A JSON string whose opening quote, at `column`, has been read.
    fn string(&mut self, column: usize) -> Result<Tok, RuleError> {
        let unterminated = || error(column, "unterminated string");
        let mut out = String::new();
        loop {
            let escape_column = self.column();
            match self.bump().ok_or_else(unterminated)? {
                '"' => return Ok(Tok::Str(out)),
                '\\' => {
                    let escaped = match self.bump().ok_or_else(unterminated)? {
                        '"' => '"',
                        '\\' => '\\',
                        '/' => '/',
                        'b' => '\u{8}',
                        'f' => '\u{c}',
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        'u' => self.unicode_escape(escape_column)?,
                        other => {
                            return Err(error(
                                escape_column,
                                format!("unknown escape '\\{other}'"),
                            ));
                        }
                    };
                    out.push(escaped);
                }
                c => out.push(c),
            }
        }
    }

    /// The character of a `\uXXXX` escape (or surrogate pair) whose `\u` has been read.
    fn unicode_escape(&mut self, column: usize) -> Result<char, RuleError> {
        let bad = || {
            error(
                column,
                "invalid '\\u' escape: expected four hex digits naming a character",
            )
        };
        let high = self.hex4().ok_or_else(bad)?;
        let code = match high {
            0xD800..=0xDBFF => {
                if !(self.eat('\\') && self.eat('u')) {
                    return Err(bad());
                }
                let low = self
                    .hex4()
                    .filter(|low| (0xDC00..=0xDFFF).contains(low))
                    .ok_or_else(bad)?;
                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
            }
            _ => high,
        };
        char::from_u32(code).ok_or_else(bad)
    }

    fn hex4(&mut self) -> Option<u32> {
        (0..4).try_fold(0, |acc, _| Some(acc * 16 + self.bump()?.to_digit(16)?))
    }
}

fn is_segment_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_segment_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

// ---------------------------------------------------------------------------------------------
// The parser: recursive descent with one token of lookahead, lexing on demand so that the first
// problem in reading order is the one reported.

struct Parser {
    lexer: Lexer,
    current: Token,
    depth: usize,
}

impl Parser {
    fn new(src: &str) -> Result<Parser, RuleError> {
        let mut lexer = Lexer {
            chars: src.chars().collect(),
            pos: 0,
        };
        let current = lexer.next_token()?;
        Ok(Parser {
            lexer,
            current,
            depth: 0,
        })
    }

    /// Moves to the next token, returning the one that was current.
    fn advance(&mut self) -> Result<Token, RuleError> {
        let next = self.lexer.next_token()?;
        Ok(std::mem::replace(&mut self.current, next))
    }

    fn eat_keyword(&mut self, keyword: Keyword) -> Result<bool, RuleError> {
        let matched = self.current.tok == Tok::Keyword(keyword);
        if matched {
            self.advance()?;
        }
        Ok(matched)
    }

    fn or(&mut self) -> Result<Expr, RuleError> {
        let first = self.and()?;
        if self.current.tok != Tok::Keyword(Keyword::Or) {
            return Ok(first);
        }
        let mut terms = vec![first];
        while self.eat_keyword(Keyword::Or)? {
            terms.push(self.and()?);
        }
        Ok(Expr::Or(terms))
    }

    fn and(&mut self) -> Result<Expr, RuleError> {
        let first = self.unary()?;
        if self.current.tok != Tok::Keyword(Keyword::And) {
            return Ok(first);
        }
        let mut terms = vec![first];
        while self.eat_keyword(Keyword::And)? {
            terms.push(self.unary()?);
        }
        Ok(Expr::And(terms))
    }

    fn unary(&mut self) -> Result<Expr, RuleError> {
        if self.current.tok != Tok::Keyword(Keyword::Not) {
            return self.primary();
        }
        let not = self.advance()?;
        let inner = self.nested(not.column, Parser::unary)?;
        Ok(Expr::Not(Box::new(inner)))
    }

    /// Runs `parse` one nesting level deeper, refusing rules nested past [`MAX_DEPTH`].
    fn nested(
        &mut self,
        column: usize,
        parse: fn(&mut Parser) -> Result<Expr, RuleError>,
    ) -> Result<Expr, RuleError> {
        if self.depth == MAX_DEPTH {
            return Err(error(
                column,
                format!("the rule nests more than {MAX_DEPTH} levels deep"),
            ));
        }
        self.depth += 1;
        let result = parse(self);
        self.depth -= 1;
        result
    }

    fn primary(&mut self) -> Result<Expr, RuleError> {
        let token = self.advance()?;
        match token.tok {
            Tok::LParen => {
                let inner = self.nested(token.column, Parser::or)?;
                if self.current.tok != Tok::RParen {
                    return Err(error(
                        self.current.column,
                        format!(
                            "expected ')' to close the '(' at column {}, found {}",
                            token.column,
                            self.current.describe()
                        ),
                    ));
                }
                self.advance()?;
                Ok(inner)
            }
            Tok::Keyword(Keyword::True) => Ok(Expr::Const(true)),
            Tok::Keyword(Keyword::False) => Ok(Expr::Const(false)),
            Tok::Keyword(Keyword::Exists) => {
                let next = self.advance()?;
                match next.tok {
                    Tok::Path(path) => Ok(Expr::Exists(path)),
                    _ => Err(error(
                        next.column,
                        format!("expected a path after 'exists', found {}", next.describe()),
                    )),
                }
            }
            Tok::Path(path) => self.predicate(path),
            _ => Err(error(
                token.column,
                format!("expected a condition, found {}", token.describe()),
            )),
        }
    }

    /// What follows a path: a comparison, `in [...]`, or a string test.
    fn predicate(&mut self, path: String) -> Result<Expr, RuleError> {
        let operator = self.advance()?;
        let text_op = match operator.tok {
            Tok::Cmp(op) => {
                let value = self.literal(&operator.text)?;
                return Ok(Expr::Compare { path, op, value });
            }
            Tok::Keyword(Keyword::In) => {
                let values = self.list()?;
                return Ok(Expr::In { path, values });
            }
            Tok::Keyword(Keyword::Contains) => TextOp::Contains,
            Tok::Keyword(Keyword::StartsWith) => TextOp::StartsWith,
            Tok::Keyword(Keyword::EndsWith) => TextOp::EndsWith,
            _ => {
                return Err(error(
                    operator.column,
                    format!(
                        "expected an operator after '{path}', found {}",
                        operator.describe()
                    ),
                ));
            }
        };
        let next = self.advance()?;
        match next.tok {
            Tok::Str(needle) => Ok(Expr::Text {
                path,
                op: text_op,
                needle,
            }),
            _ => Err(error(
                next.column,
                format!(
                    "expected a string after '{}', found {}",
                    operator.text,
                    next.describe()
                ),
            )),
        }
    }

    /// `[literal, ...]` after `in`.
    fn list(&mut self) -> Result<Vec<Literal>, RuleError> {
        let open = self.advance()?;
        if open.tok != Tok::LBracket {
            return Err(error(
                open.column,
                format!("expected '[' after 'in', found {}", open.describe()),
            ));
        }
        let mut values = vec![self.literal("[")?];
        loop {
            let next = self.advance()?;
            match next.tok {
                Tok::Comma => values.push(self.literal(",")?),
                Tok::RBracket => return Ok(values),
                _ => {
                    return Err(error(
                        next.column,
                        format!("expected ',' or ']' in the list, found {}", next.describe()),
                    ));
                }
            }
        }
    }

    fn literal(&mut self, after: &str) -> Result<Literal, RuleError> {
        let token = self.advance()?;
        match token.tok {
            Tok::Str(s) => Ok(Literal::Str(s)),
            Tok::Num(n) => Ok(Literal::Num(n)),
            Tok::Keyword(Keyword::True) => Ok(Literal::Bool(true)),
            Tok::Keyword(Keyword::False) => Ok(Literal::Bool(false)),
            Tok::Keyword(Keyword::Null) => Ok(Literal::Null),
            _ => Err(error(
                token.column,
                format!(
                    "expected a literal after '{after}', found {}",
                    token.describe()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intern::Name;
    use crate::leaf::flatten;
    use serde_json::json;

    fn profile() -> Leaves {
        let attributes = json!({
            "person": {
                "name": {"firstName": "John", "lastName": "Smith"},
                "age": 42,
                "vip": false,
                "nickname": null,
                "tags": ["a", "b"],
                "email": "John.Smith@Example.com"
            },
            "points": 1.0,
            "score": 1,
            "balance": -20,
            "signup": "2024-03-05T10:00:00Z",
            "loyalty": {"tier": "gold"},
            "city": "Zürich",
            "empty": ""
        });
        let Some(object) = attributes.as_object() else {
            panic!("fixture is an object")
        };
        flatten(object)
            .into_iter()
            .map(|(p, l)| (Name::new(&p), l))
            .collect()
    }

    #[test]
    fn evaluates_rules_against_a_profile() {
        let cases: &[(&str, bool)] = &[
            // = and != on strings, case-sensitively; != with a missing path is false.
            (r#"person.name.firstName = "John""#, true),
            (r#"person.name.firstName = "john""#, false),
            (r#"person.name.firstName != "Jane""#, true),
            (r#"person.name.firstName != "John""#, false),
            (r#"person.missing != "x""#, false),
            (r#"person.missing = "x""#, false),
            (r#"person.name.firstName = "\u004Aohn""#, true),
            (r#"city = "Z\u00fcrich""#, true),
            // Numbers compare numerically: 1 = 1.0.
            ("person.age = 42", true),
            ("person.age = 42.0", true),
            ("points = 1", true),
            ("score = 1.0", true),
            ("score = 10e-1", true),
            ("person.age != 42", false),
            ("person.age > 40", true),
            ("person.age >= 42", true),
            ("person.age < 42", false),
            ("person.age <= 42", true),
            ("person.age > 4.2E1", false),
            ("balance < -10.5", true),
            ("balance >= -20", true),
            // Type mismatches are false, != included.
            (r#"person.age = "42""#, false),
            (r#"person.age != "42""#, false),
            ("person.name.firstName > 1", false),
            ("person.vip = 0", false),
            // Booleans: = and != only.
            ("person.vip = false", true),
            ("person.vip != true", true),
            ("person.vip = true", false),
            ("person.vip < true", false),
            ("person.vip >= false", false),
            // Null.
            ("person.nickname = null", true),
            ("person.nickname != null", false),
            ("person.nickname <= null", false),
            (r#"person.nickname = """#, false),
            (r#"person.nickname != """#, false),
            ("person.age != null", true),
            ("person.vip != null", true),
            ("person.age = null", false),
            ("person.missing = null", false),
            ("person.missing != null", false),
            // Objects and arrays equal no literal, but are not null.
            ("person.name != null", true),
            ("person.name = null", false),
            (r#"person.name = "John""#, false),
            (r#"person.name != "John""#, false),
            (r#"loyalty = "gold""#, false),
            (r#"person.tags = "a""#, false),
            (r#"person.tags != "a""#, false),
            (r#"person.tags contains "a""#, false),
            ("person.tags != null", true),
            // Strings order by code point; ISO dates therefore in time order.
            (r#"signup > "2024-01-31T23:59:59Z""#, true),
            (r#"signup < "2024-03-05T09:59:59Z""#, false),
            (r#"signup >= "2024-03-05T10:00:00Z""#, true),
            (r#"signup <= "2024-03-05T10:00:00Z""#, true),
            (r#"person.name.lastName < "a""#, true),
            (r#"city > "Zz""#, true), // code point order: 'ü' (U+00FC) sorts after 'z'
            // String tests are case-sensitive and for strings only.
            (r#"person.name.firstName contains "oh""#, true),
            (r#"person.name.firstName contains "OH""#, false),
            (r#"person.email startsWith "John.""#, true),
            (r#"person.email startsWith "john.""#, false),
            (r#"person.email endsWith "Example.com""#, true),
            (r#"person.email endsWith "example.com""#, false),
            (r#"person.age contains "4""#, false),
            (r#"person.missing contains """#, false),
            (r#"empty startsWith """#, true),
            (r#"city contains "ü""#, true),
            // exists: any value, false and null included, and objects.
            ("exists person.vip", true),
            ("exists person.nickname", true),
            ("exists person.tags", true),
            ("exists person.name", true),
            ("exists person", true),
            ("exists person.nam", false),
            ("exists missing", false),
            // in lists.
            (r#"person.name.lastName in ["Doe", "Smith"]"#, true),
            (r#"person.name.lastName in ["Doe"]"#, false),
            ("person.age in [41, 42.0]", true),
            (r#"person.age in ["42"]"#, false),
            ("person.vip in [true, false]", true),
            ("person.nickname in [null]", true),
            ("person.missing in [null, 1]", false),
            ("person.name in [null]", false),
            // Constants, not, and, or, precedence and parentheses.
            ("true", true),
            ("false", false),
            ("not false", true),
            ("not not true", true),
            ("not person.vip = true", true),
            ("not exists person.missing", true),
            ("not person.vip = true and score = 2", false),
            ("not (person.vip = true and score = 2)", true),
            ("score = 1 or score = 2 and false", true),
            ("(score = 1 or score = 2) and false", false),
            ("not score = 1 and score = 2 or score = 1", true),
            ("not (score = 1 and score = 2 or score = 1)", false),
            ("score = 1 and points = 1 and person.age = 42", true),
            ("score = 2 or points = 2 or person.age = 42", true),
            ("score = 2 or points = 2 or person.age = 43", false),
            ("((((score = 1))))", true),
            ("\tscore\n=\n1 ", true),
            ("score=1and(points=1)", true),
        ];
        let leaves = profile();
        for &(src, expected) in cases {
            let rule = Rule::parse(src).unwrap_or_else(|e| panic!("{src:?} does not parse: {e}"));
            assert_eq!(rule.eval(&leaves), expected, "{src}");
        }
        assert!(cases.len() >= 40);
    }

    #[test]
    fn reports_the_column_of_the_offending_token() {
        let cases: &[(&str, usize)] = &[
            ("", 1),
            ("   ", 1),
            ("person.name = ", 15),
            ("person.name =", 14),
            (r#"a = "x" AND b = 1"#, 9),
            (r#"a = "é" AND b = 1"#, 9),
            (r#"a = "x" And b = 1"#, 9),
            (r#"a = "unterminated"#, 5),
            (r#"a = "ends in escape\"#, 5),
            ("a ==  1", 4),
            ("(a = 1", 7),
            ("((a = 1)", 9),
            ("a = 1)", 6),
            ("a = 1 b = 2", 7),
            ("a", 2),
            ("a IN [1]", 3),
            (r#"a startswith "x""#, 3),
            ("a in [1, 2", 11),
            ("a in []", 7),
            ("a in [1 2]", 9),
            ("a in [1,]", 9),
            ("a in 1", 6),
            ("a contains 1", 12),
            ("exists", 7),
            ("exists 1", 8),
            ("exists (a)", 8),
            ("a. = 1", 3),
            ("a = 1 and b.", 13),
            ("a.1 = 1", 3),
            (".a = 1", 1),
            ("a = 01", 6),
            ("a = -", 6),
            ("a = -x", 6),
            ("a = 1.", 7),
            ("a = 1.e3", 7),
            ("a = 1e", 7),
            ("a = 1e+", 8),
            ("a = 1e999", 5),
            (r#"a = "\x""#, 6),
            (r#"a = "ab\u12""#, 8),
            (r#"a = "\uD800""#, 6),
            (r#"a = "\uDC00""#, 6),
            ("a ! 1", 3),
            ("a !== 1", 5),
            ("a = 1 and", 10),
            ("a = 1 or or b = 2", 10),
            ("and a = 1", 1),
            ("a = b", 5),
            ("a = 'x'", 5),
            ("not", 4),
            ("a @ 1", 3),
            ("true = 1", 6),
            ("in = 1", 1),
            ("a = 1 )", 7),
            ("()", 2),
        ];
        for &(src, column) in cases {
            match Rule::parse(src) {
                Ok(rule) => panic!("{src:?} parsed as {rule:?}"),
                Err(e) => assert_eq!(e.column, column, "{src:?}: {e}"),
            }
        }
    }

    #[test]
    fn errors_read_well() {
        let message = |src: &str| Rule::parse(src).err().map(|e| e.to_string());
        assert_eq!(
            message("person.name = ").as_deref(),
            Some("column 15: expected a literal after '=', found the end of the rule")
        );
        assert_eq!(
            message(r#"a = "x" AND b = 1"#).as_deref(),
            Some(
                "column 9: expected 'and', 'or' or the end of the rule, found 'AND' \
                 (keywords are written 'and')"
            )
        );
        assert_eq!(
            message(r#"a = "x"#).as_deref(),
            Some("column 5: unterminated string")
        );
        assert_eq!(
            message("(a = 1").as_deref(),
            Some("column 7: expected ')' to close the '(' at column 1, found the end of the rule")
        );
    }

    #[test]
    fn refuses_deep_nesting_instead_of_overflowing() {
        let deep = format!("{}true{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(Rule::parse(&deep).map_err(|e| e.column), Err(MAX_DEPTH + 1));
        let nots = format!("{}true", "not ".repeat(100_000));
        assert!(Rule::parse(&nots).is_err());
        let fine = format!("{}true{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(Rule::parse(&fine).is_ok_and(|rule| rule.eval(&Leaves::new())));
        let long = vec!["a = 1"; 100_000].join(" and ");
        assert!(Rule::parse(&long).is_ok());
    }

    #[test]
    fn never_panics_on_truncated_or_garbled_text() {
        let samples = [
            r#"not (person.name.firstName startsWith "J\u00e9" or x in [1, -2.5e3, null]) and exists y"#,
            r#"a = "\uD83D\uDE00" and b != true or c >= -0.0"#,
            "é = 1 or \u{0} or [ ] , ) ( ! < > <= >=",
        ];
        for sample in samples {
            let chars: Vec<char> = sample.chars().collect();
            for end in 0..=chars.len() {
                let prefix: String = chars[..end].iter().collect();
                let _ = Rule::parse(&prefix);
                let suffix: String = chars[end..].iter().collect();
                let _ = Rule::parse(&suffix);
            }
        }
    }

    #[test]
    fn decodes_json_string_escapes() {
        let leaves: Leaves = [("s".into(), Leaf::Str("\"\\/\u{8}\u{c}\n\r\t😀é".into()))]
            .into_iter()
            .collect();
        let rule = Rule::parse(r#"s = "\"\\\/\b\f\n\r\t\uD83D\uDE00\u00E9""#);
        assert!(rule.is_ok_and(|rule| rule.eval(&leaves)));
    }

    #[test]
    fn keywords_may_be_path_segments_but_not_paths() {
        let leaves: Leaves = [("a.and".into(), Leaf::Num("1".into()))]
            .into_iter()
            .collect();
        assert!(Rule::parse("a.and = 1").is_ok_and(|rule| rule.eval(&leaves)));
        assert!(Rule::parse("and = 1").is_err());
        assert!(Rule::parse("AND = 1").is_ok(), "upper case words are paths");
    }

    #[test]
    fn lists_the_paths_it_reads() {
        let rule = Rule::parse(
            r#"not b.c = 1 and (exists a or b.c in [2]) or z contains "x" or a != null or true"#,
        );
        assert_eq!(
            rule.map(|rule| rule.paths()),
            Ok(vec!["a".to_owned(), "b.c".to_owned(), "z".to_owned()])
        );
        assert_eq!(Rule::parse("true").map(|rule| rule.paths()), Ok(Vec::new()));
    }

    #[test]
    fn rules_are_plain_shareable_data() {
        fn assert_send_sync<T: Send + Sync + Clone + PartialEq>() {}
        assert_send_sync::<Rule>();
        assert_eq!(
            Rule::parse("a = 1 and b = 2"),
            Rule::parse("a=1  and  b=2.0")
        );
        assert_ne!(Rule::parse("a = 1"), Rule::parse("a = 2"));
    }
}
