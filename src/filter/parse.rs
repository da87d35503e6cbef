//! The text form of filters.
//!
//! ```text
//! filter    := or
//! or        := and (("||" | "or") and)*
//! and       := unary (("&&" | "and") unary)*
//! unary     := ("!" | "not") unary | "(" filter ")" | condition
//! condition := path op value | path "exists"
//!            | path ("in" | "not-in" | "not in") "(" value ("," value)* ")"
//! op        := "=" | "==" | "!=" | ">" | ">=" | "<" | "<=" | "contains" | "starts-with"
//! value     := "string" | 'string' | number | true | false | null | bareword
//! ```
//!
//! A bareword value is a string (`status=published`), which keeps the
//! seeds' query strings valid. A value `$name` is a parameter, bound later
//! with [`Filter::bind`](super::Filter::bind) (authorization rules use them
//! for token claims). Keywords are case-insensitive. Errors name
//! the column (1-based, in characters) and what was expected there.

use super::{Condition, Filter, FilterError, MAX_DEPTH, MAX_TEXT, Op, Operand, Scalar};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// 1-based column, in characters.
    pub column: usize,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at column {}: {}", self.column, self.reason)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    LParen,
    RParen,
    Comma,
    And,
    Or,
    Bang,
    Op(Op),
    Quoted(String),
    Word(String),
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::LParen => "'('".into(),
            Token::RParen => "')'".into(),
            Token::Comma => "','".into(),
            Token::And => "'&&'".into(),
            Token::Or => "'||'".into(),
            Token::Bang => "'!'".into(),
            Token::Op(op) => format!("'{}'", op.as_str()),
            Token::Quoted(s) => format!("string {s:?}"),
            Token::Word(w) => format!("'{w}'"),
        }
    }
}

fn is_word_byte(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '@' | ':' | '/' | '+' | '$')
}

struct Lexer<'a> {
    text: &'a str,
    tokens: Vec<(usize, Token)>,
}

impl Lexer<'_> {
    fn error(&self, offset: usize, reason: impl Into<String>) -> ParseError {
        ParseError {
            column: self.text[..offset].chars().count() + 1,
            reason: reason.into(),
        }
    }

    fn run(mut self) -> Result<Vec<(usize, Token)>, ParseError> {
        let mut chars = self.text.char_indices().peekable();
        while let Some(&(start, c)) = chars.peek() {
            let mut take = |n: usize| {
                for _ in 0..n {
                    chars.next();
                }
            };
            let next = self.text[start..].chars().nth(1);
            let token = match (c, next) {
                (c, _) if c.is_whitespace() => {
                    take(1);
                    continue;
                }
                ('(', _) => (1, Token::LParen),
                (')', _) => (1, Token::RParen),
                (',', _) => (1, Token::Comma),
                ('&', Some('&')) => (2, Token::And),
                ('|', Some('|')) => (2, Token::Or),
                ('!', Some('=')) => (2, Token::Op(Op::Ne)),
                ('!', _) => (1, Token::Bang),
                ('=', Some('=')) => (2, Token::Op(Op::Eq)),
                ('=', _) => (1, Token::Op(Op::Eq)),
                ('<', Some('>')) => (2, Token::Op(Op::Ne)),
                ('<', Some('=')) => (2, Token::Op(Op::Lte)),
                ('<', _) => (1, Token::Op(Op::Lt)),
                ('>', Some('=')) => (2, Token::Op(Op::Gte)),
                ('>', _) => (1, Token::Op(Op::Gt)),
                ('"' | '\'', _) => {
                    chars.next();
                    let value = self.quoted(start, c, &mut chars)?;
                    self.tokens.push((start, Token::Quoted(value)));
                    continue;
                }
                (c, _) if is_word_byte(c) => {
                    let mut end = start;
                    while let Some(&(i, c)) = chars.peek() {
                        if !is_word_byte(c) {
                            break;
                        }
                        end = i + c.len_utf8();
                        chars.next();
                    }
                    let word = &self.text[start..end];
                    let token = match word.to_ascii_lowercase().as_str() {
                        "and" => Token::And,
                        "or" => Token::Or,
                        _ => Token::Word(word.to_owned()),
                    };
                    self.tokens.push((start, token));
                    continue;
                }
                ('&' | '|', _) => {
                    return Err(self.error(start, format!("'{c}' must be doubled: '{c}{c}'")));
                }
                (c, _) => return Err(self.error(start, format!("unexpected character {c:?}"))),
            };
            take(token.0);
            self.tokens.push((start, token.1));
        }
        Ok(self.tokens)
    }

    fn quoted(
        &self,
        start: usize,
        quote: char,
        chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
    ) -> Result<String, ParseError> {
        let mut value = String::new();
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == quote => return Ok(value),
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, 't')) => value.push('\t'),
                    Some((_, c @ ('\\' | '"' | '\''))) => value.push(c),
                    Some((j, c)) => {
                        return Err(self.error(j, format!("unknown escape '\\{c}' in string")));
                    }
                    None => break,
                },
                _ => {
                    let _ = i;
                    value.push(c);
                }
            }
        }
        Err(self.error(start, "string is not closed"))
    }
}

struct Parser<'a> {
    text: &'a str,
    tokens: Vec<(usize, Token)>,
    at: usize,
    depth: usize,
}

pub(super) fn parse(text: &str) -> Result<Filter, ParseError> {
    if text.len() > MAX_TEXT {
        return Err(ParseError {
            column: 1,
            reason: format!("filter is longer than {MAX_TEXT} bytes"),
        });
    }
    let tokens = Lexer {
        text,
        tokens: Vec::new(),
    }
    .run()?;
    let mut parser = Parser {
        text,
        tokens,
        at: 0,
        depth: 0,
    };
    if parser.tokens.is_empty() {
        return Err(parser.error_here("the filter is empty"));
    }
    let filter = parser.or()?;
    if let Some((_, token)) = parser.peek() {
        let reason = format!("expected '&&', '||' or the end, found {}", token.describe());
        return Err(parser.error_here(reason));
    }
    filter
        .check_limits()
        .map_err(|e| parser.error_at(0, limit_reason(e)))?;
    Ok(filter)
}

fn limit_reason(error: FilterError) -> String {
    match error {
        FilterError::Invalid(reason) => reason,
        FilterError::Parse(e) => e.reason,
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<&(usize, Token)> {
        self.tokens.get(self.at)
    }

    fn offset_here(&self) -> usize {
        self.peek().map_or(self.text.len(), |(offset, _)| *offset)
    }

    fn error_at(&self, offset: usize, reason: impl Into<String>) -> ParseError {
        ParseError {
            column: self.text[..offset].chars().count() + 1,
            reason: reason.into(),
        }
    }

    fn error_here(&self, reason: impl Into<String>) -> ParseError {
        self.error_at(self.offset_here(), reason)
    }

    fn found(&self) -> String {
        self.peek()
            .map_or("the end".to_owned(), |(_, token)| token.describe())
    }

    fn eat(&mut self, token: &Token) -> bool {
        if self.peek().is_some_and(|(_, t)| t == token) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn eat_word(&mut self, keyword: &str) -> bool {
        if matches!(self.peek(), Some((_, Token::Word(w))) if w.eq_ignore_ascii_case(keyword)) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn nested<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, ParseError>,
    ) -> Result<T, ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_here(format!("filter nests deeper than {MAX_DEPTH} levels")));
        }
        let result = f(self);
        self.depth -= 1;
        result
    }

    fn or(&mut self) -> Result<Filter, ParseError> {
        let mut children = vec![self.and()?];
        while self.eat(&Token::Or) {
            children.push(self.and()?);
        }
        Ok(if children.len() == 1 {
            children.pop().expect("one child")
        } else {
            Filter::Any(children)
        })
    }

    fn and(&mut self) -> Result<Filter, ParseError> {
        let mut children = vec![self.unary()?];
        while self.eat(&Token::And) {
            children.push(self.unary()?);
        }
        Ok(if children.len() == 1 {
            children.pop().expect("one child")
        } else {
            Filter::All(children)
        })
    }

    fn unary(&mut self) -> Result<Filter, ParseError> {
        if self.eat(&Token::Bang) || self.eat_word("not") {
            return self.nested(|p| Ok(Filter::Not(Box::new(p.unary()?))));
        }
        if self.eat(&Token::LParen) {
            let inner = self.nested(|p| p.or())?;
            if !self.eat(&Token::RParen) {
                let reason = format!("expected ')' or an operator, found {}", self.found());
                return Err(self.error_here(reason));
            }
            return Ok(inner);
        }
        self.condition().map(Filter::Condition)
    }

    fn condition(&mut self) -> Result<Condition, ParseError> {
        let start = self.offset_here();
        let path = match self.peek() {
            Some((_, Token::Word(w))) if super::FieldPath::parse(w).is_some() => w.clone(),
            _ => {
                let reason = format!("expected a field name, found {}", self.found());
                return Err(self.error_here(reason));
            }
        };
        self.at += 1;
        let op_offset = self.offset_here();
        let op = match self.peek() {
            Some((_, Token::Op(op))) => Some(*op),
            Some((_, Token::Word(w))) => match w.to_ascii_lowercase().as_str() {
                "contains" => Some(Op::Contains),
                "starts-with" => Some(Op::StartsWith),
                "exists" => Some(Op::Exists),
                "in" => Some(Op::In),
                "not-in" => Some(Op::NotIn),
                "not" => {
                    self.at += 1;
                    if !matches!(self.peek(), Some((_, Token::Word(w))) if w.eq_ignore_ascii_case("in"))
                    {
                        let reason = format!("expected 'in' after 'not', found {}", self.found());
                        return Err(self.error_here(reason));
                    }
                    Some(Op::NotIn)
                }
                _ => None,
            },
            _ => None,
        };
        let Some(op) = op else {
            let reason = format!(
                "expected an operator (= != > >= < <= in not-in contains starts-with exists) after '{path}', found {}",
                self.found()
            );
            return Err(self.error_here(reason));
        };
        self.at += 1;
        let operand = match op {
            Op::Exists => Operand::None,
            Op::In | Op::NotIn => Operand::List(self.list()?),
            _ => Operand::Scalar(self.value(op)?),
        };
        Condition::new(&path, op, operand).map_err(|e| {
            let offset = if matches!(e, FilterError::Invalid(ref r) if r.contains("path")) {
                start
            } else {
                op_offset
            };
            self.error_at(offset, limit_reason(e))
        })
    }

    fn list(&mut self) -> Result<Vec<Scalar>, ParseError> {
        if !self.eat(&Token::LParen) {
            let reason = format!("expected '(' to start the list, found {}", self.found());
            return Err(self.error_here(reason));
        }
        let mut items = vec![self.value(Op::In)?];
        while self.eat(&Token::Comma) {
            items.push(self.value(Op::In)?);
        }
        if !self.eat(&Token::RParen) {
            let reason = format!("expected ',' or ')' in the list, found {}", self.found());
            return Err(self.error_here(reason));
        }
        Ok(items)
    }

    fn value(&mut self, after: Op) -> Result<Scalar, ParseError> {
        let scalar = match self.peek() {
            Some((_, Token::Quoted(s))) => Scalar::String(s.as_str().into()),
            Some((_, Token::Word(w))) => match w.as_str() {
                "true" => Scalar::Bool(true),
                "false" => Scalar::Bool(false),
                "null" => Scalar::Null,
                w => match w.parse::<f64>() {
                    Ok(n) if n.is_finite() && !w.starts_with('+') => Scalar::Number(n),
                    _ => Scalar::String(w.into()),
                },
            },
            _ => {
                let reason = format!(
                    "expected a value after '{}', found {}",
                    after.as_str(),
                    self.found()
                );
                return Err(self.error_here(reason));
            }
        };
        self.at += 1;
        Ok(scalar)
    }
}
