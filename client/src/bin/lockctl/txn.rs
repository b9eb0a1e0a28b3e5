//! Parser for the `lockctl txn` spec language (pure, no I/O).
//!
//! ```text
//! # compares (all must hold), one per line
//! if version /config = 3
//! if exists /lock
//! if !exists /lock
//! if exists /lock = false
//! if value /mode = "on"
//! if create_revision /a > 10
//! if mod_revision /a != 7
//! then
//! put /config "new value"
//! create /x "v"
//! del /old
//! get /config
//! else
//! get /config
//! ```
//!
//! Compares (`if TARGET PATH [OP VALUE]`) come first, then a `then` line and
//! the ops of the success branch, then optionally an `else` line and the ops
//! of the failure branch. Targets: `version`, `create_revision`,
//! `mod_revision` (numbers), `value` (bytes), `exists` (`true`/`false`; a bare
//! `exists PATH` means `= true`, `!exists PATH` means `= false`). Operators:
//! `=`, `!=`, `<`, `>` (`exists` allows only `=` and `!=`). Ops:
//! `put PATH VALUE [--parents]`, `create PATH VALUE [--parents]`,
//! `del PATH [--recursive]`, `get PATH`. A VALUE is a bare word or a
//! double-quoted string with `\"` and `\\` escapes. Blank lines and lines
//! starting with `#` are ignored; `#` starts a comment anywhere outside
//! quotes.

use lockd_client::proto::{self, compare, op};

/// A parse error: 1-based line number and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number (the last line for errors about the whole spec).
    pub line: usize,
    /// What is wrong.
    pub msg: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "txn line {}: {}", self.line, self.msg)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: String,
    quoted: bool,
}

fn tokenize(line: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else { break };
        if c == '#' {
            break;
        }
        if c == '"' {
            chars.next();
            let mut text = String::new();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some('"') => text.push('"'),
                        Some('\\') => text.push('\\'),
                        Some(other) => {
                            return Err(format!(
                                "unknown escape '\\{other}' (only \\\" and \\\\ are allowed)"
                            ))
                        }
                        None => return Err("unterminated string".into()),
                    },
                    c => text.push(c),
                }
            }
            if !closed {
                return Err("unterminated string".into());
            }
            if chars
                .peek()
                .is_some_and(|c| !c.is_whitespace() && *c != '#')
            {
                return Err("expected whitespace after closing quote".into());
            }
            out.push(Token { text, quoted: true });
        } else {
            let mut text = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '"' {
                    return Err(format!("unexpected '\"' inside word '{text}'"));
                }
                text.push(c);
                chars.next();
            }
            out.push(Token {
                text,
                quoted: false,
            });
        }
    }
    Ok(out)
}

fn path(tok: Option<&Token>, what: &str) -> Result<String, String> {
    let Some(t) = tok else {
        return Err(format!("{what}: missing PATH"));
    };
    if !t.text.starts_with('/') {
        return Err(format!(
            "{what}: path must start with '/', got '{}'",
            t.text
        ));
    }
    Ok(t.text.clone())
}

fn cmp_op(tok: Option<&Token>) -> Result<compare::Op, String> {
    match tok {
        Some(t) if !t.quoted => match t.text.as_str() {
            "=" | "==" => Ok(compare::Op::Equal),
            "!=" => Ok(compare::Op::NotEqual),
            "<" => Ok(compare::Op::Less),
            ">" => Ok(compare::Op::Greater),
            other => Err(format!(
                "unknown comparison operator '{other}' (expected =, !=, < or >)"
            )),
        },
        Some(t) => Err(format!("expected comparison operator, got \"{}\"", t.text)),
        None => Err("missing comparison operator (=, !=, < or >)".into()),
    }
}

fn number(tok: Option<&Token>, target: &str) -> Result<u64, String> {
    let Some(t) = tok else {
        return Err(format!("{target}: missing number to compare with"));
    };
    t.text.parse::<u64>().map_err(|_| {
        format!(
            "{target}: expected a non-negative integer, got '{}'",
            t.text
        )
    })
}

fn no_more(toks: &[Token], from: usize) -> Result<(), String> {
    match toks.get(from) {
        Some(t) => Err(format!("unexpected extra argument '{}'", t.text)),
        None => Ok(()),
    }
}

fn parse_compare(toks: &[Token]) -> Result<proto::Compare, String> {
    // toks[0] == "if"
    let Some(target) = toks.get(1) else {
        return Err("missing compare target after 'if'".into());
    };
    if target.quoted {
        return Err(format!("expected compare target, got \"{}\"", target.text));
    }
    let (name, negated) = match target.text.strip_prefix('!') {
        Some(rest) => (rest, true),
        None => (target.text.as_str(), false),
    };
    if negated && name != "exists" {
        return Err(format!(
            "'!' is only allowed before 'exists', got '{}'",
            target.text
        ));
    }
    let p = path(toks.get(2), name)?;
    let (op, tgt) = match name {
        "exists" => {
            if toks.len() == 3 {
                (compare::Op::Equal, compare::Target::Exists(!negated))
            } else {
                if negated {
                    return Err("'!exists' takes no operator or value".into());
                }
                let op = cmp_op(toks.get(3))?;
                if !matches!(op, compare::Op::Equal | compare::Op::NotEqual) {
                    return Err("exists: only = and != are allowed".into());
                }
                let b = match toks.get(4).map(|t| t.text.as_str()) {
                    Some("true") => true,
                    Some("false") => false,
                    Some(other) => {
                        return Err(format!("exists: expected true or false, got '{other}'"))
                    }
                    None => return Err("exists: missing true or false".into()),
                };
                no_more(toks, 5)?;
                (op, compare::Target::Exists(b))
            }
        }
        "version" | "create_revision" | "mod_revision" => {
            let op = cmp_op(toks.get(3))?;
            let n = number(toks.get(4), name)?;
            no_more(toks, 5)?;
            let t = match name {
                "version" => compare::Target::Version(n),
                "create_revision" => compare::Target::CreateRevision(n),
                _ => compare::Target::ModRevision(n),
            };
            (op, t)
        }
        "value" => {
            let op = cmp_op(toks.get(3))?;
            let Some(v) = toks.get(4) else {
                return Err("value: missing VALUE to compare with".into());
            };
            no_more(toks, 5)?;
            (op, compare::Target::Value(v.text.clone().into_bytes()))
        }
        other => {
            return Err(format!(
                "unknown compare target '{other}' (expected version, create_revision, mod_revision, value or exists)"
            ))
        }
    };
    Ok(proto::Compare {
        path: p,
        op: op as i32,
        target: Some(tgt),
    })
}

/// Splits trailing `--flag`s (unquoted) from positional arguments.
fn split_flags<'a>(
    toks: &'a [Token],
    allowed: &[&str],
) -> Result<(Vec<&'a Token>, Vec<&'a str>), String> {
    let mut pos = Vec::new();
    let mut flags = Vec::new();
    for t in toks {
        if !t.quoted && t.text.starts_with("--") {
            if !allowed.contains(&t.text.as_str()) {
                return Err(if allowed.is_empty() {
                    format!("unknown flag '{}'", t.text)
                } else {
                    format!(
                        "unknown flag '{}' (allowed: {})",
                        t.text,
                        allowed.join(", ")
                    )
                });
            }
            flags.push(t.text.as_str());
        } else {
            pos.push(t);
        }
    }
    Ok((pos, flags))
}

fn parse_op(toks: &[Token]) -> Result<proto::Op, String> {
    let verb = toks[0].text.as_str();
    let args = &toks[1..];
    let o = match verb {
        "put" | "create" => {
            let (pos, flags) = split_flags(args, &["--parents"])?;
            let p = path(pos.first().copied(), verb)?;
            let Some(v) = pos.get(1) else {
                return Err(format!("{verb}: missing VALUE"));
            };
            if let Some(extra) = pos.get(2) {
                return Err(format!("unexpected extra argument '{}'", extra.text));
            }
            let data = v.text.clone().into_bytes();
            let parents = flags.contains(&"--parents");
            if verb == "put" {
                op::Op::Put(proto::PutRequest {
                    path: p,
                    data,
                    expected_version: None,
                    parents,
                })
            } else {
                op::Op::Create(proto::CreateRequest {
                    path: p,
                    data,
                    parents,
                    ..Default::default()
                })
            }
        }
        "del" | "delete" => {
            let (pos, flags) = split_flags(args, &["--recursive"])?;
            let p = path(pos.first().copied(), "del")?;
            if let Some(extra) = pos.get(1) {
                return Err(format!("unexpected extra argument '{}'", extra.text));
            }
            op::Op::Delete(proto::DeleteRequest {
                path: p,
                expected_version: None,
                recursive: flags.contains(&"--recursive"),
            })
        }
        "get" => {
            let (pos, _) = split_flags(args, &[])?;
            let p = path(pos.first().copied(), "get")?;
            if let Some(extra) = pos.get(1) {
                return Err(format!("unexpected extra argument '{}'", extra.text));
            }
            op::Op::Get(proto::GetRequest {
                path: p,
                serializable: false,
                min_revision: 0,
            })
        }
        other => {
            return Err(format!(
                "unknown op '{other}' (expected put, create, del or get)"
            ))
        }
    };
    Ok(proto::Op { op: Some(o) })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Compares,
    Then,
    Else,
}

/// Parses a txn spec into a request.
pub fn parse(spec: &str) -> Result<proto::TxnRequest, ParseError> {
    let mut req = proto::TxnRequest::default();
    let mut section = Section::Compares;
    let mut saw_any = false;
    let last_line = spec.lines().count().max(1);
    for (i, line) in spec.lines().enumerate() {
        let n = i + 1;
        let err = |msg: String| ParseError { line: n, msg };
        let toks = tokenize(line).map_err(err)?;
        let Some(first) = toks.first() else { continue };
        saw_any = true;
        let kw = if first.quoted {
            ""
        } else {
            first.text.as_str()
        };
        match kw {
            "if" => {
                if section != Section::Compares {
                    return Err(err(
                        "compare ('if') after 'then'; compares must come first".into()
                    ));
                }
                req.compare.push(parse_compare(&toks).map_err(err)?);
            }
            "then" => {
                no_more(&toks, 1).map_err(err)?;
                match section {
                    Section::Compares => section = Section::Then,
                    Section::Then => return Err(err("duplicate 'then'".into())),
                    Section::Else => return Err(err("'then' after 'else'".into())),
                }
            }
            "else" => {
                no_more(&toks, 1).map_err(err)?;
                match section {
                    Section::Compares => return Err(err("'else' before 'then'".into())),
                    Section::Then => section = Section::Else,
                    Section::Else => return Err(err("duplicate 'else'".into())),
                }
            }
            _ => {
                if section == Section::Compares {
                    return Err(err(format!(
                        "expected 'if' or 'then', got '{}'",
                        first.text
                    )));
                }
                let o = parse_op(&toks).map_err(err)?;
                if section == Section::Then {
                    req.success.push(o);
                } else {
                    req.failure.push(o);
                }
            }
        }
    }
    if !saw_any {
        return Err(ParseError {
            line: last_line,
            msg: "empty spec (expected compares, 'then' and ops)".into(),
        });
    }
    if section == Section::Compares {
        return Err(ParseError {
            line: last_line,
            msg: "missing 'then' line after the compares".into(),
        });
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
# compares (all must hold), one per line
if version /config = 3
if exists /lock
if !exists /lock
if exists /lock = false
if value /mode = "on"
if create_revision /a > 10
if mod_revision /a != 7   # trailing comment
then
put /config "new value"
create /x "v" --parents
del /old --recursive
get /config
else
get /config
"#;

    fn cmp(path: &str, op: compare::Op, t: compare::Target) -> proto::Compare {
        proto::Compare {
            path: path.into(),
            op: op as i32,
            target: Some(t),
        }
    }

    #[test]
    fn parses_example() {
        let r = parse(EXAMPLE).unwrap();
        use compare::{Op::*, Target::*};
        assert_eq!(
            r.compare,
            vec![
                cmp("/config", Equal, Version(3)),
                cmp("/lock", Equal, Exists(true)),
                cmp("/lock", Equal, Exists(false)),
                cmp("/lock", Equal, Exists(false)),
                cmp("/mode", Equal, Value(b"on".to_vec())),
                cmp("/a", Greater, CreateRevision(10)),
                cmp("/a", NotEqual, ModRevision(7)),
            ]
        );
        assert_eq!(r.success.len(), 4);
        assert_eq!(
            r.success[0].op,
            Some(op::Op::Put(proto::PutRequest {
                path: "/config".into(),
                data: b"new value".to_vec(),
                expected_version: None,
                parents: false,
            }))
        );
        assert_eq!(
            r.success[1].op,
            Some(op::Op::Create(proto::CreateRequest {
                path: "/x".into(),
                data: b"v".to_vec(),
                parents: true,
                ..Default::default()
            }))
        );
        assert_eq!(
            r.success[2].op,
            Some(op::Op::Delete(proto::DeleteRequest {
                path: "/old".into(),
                expected_version: None,
                recursive: true,
            }))
        );
        assert_eq!(r.failure.len(), 1);
        assert!(matches!(&r.failure[0].op, Some(op::Op::Get(g)) if g.path == "/config"));
    }

    #[test]
    fn escapes_and_bare_words() {
        let r = parse(
            "then\nput /a \"say \\\"hi\\\" \\\\ # not a comment\"\nput /b bare-word\nput /c \"\"",
        )
        .unwrap();
        let data: Vec<Vec<u8>> = r
            .success
            .iter()
            .map(|o| match &o.op {
                Some(op::Op::Put(p)) => p.data.clone(),
                _ => panic!(),
            })
            .collect();
        assert_eq!(
            data,
            vec![
                b"say \"hi\" \\ # not a comment".to_vec(),
                b"bare-word".to_vec(),
                Vec::new()
            ]
        );
    }

    #[test]
    fn compare_only_with_empty_then() {
        let r = parse("if exists /a\nthen\n").unwrap();
        assert_eq!(r.compare.len(), 1);
        assert!(r.success.is_empty() && r.failure.is_empty());
    }

    fn err(spec: &str) -> ParseError {
        parse(spec).unwrap_err()
    }

    #[test]
    fn errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 1, "empty"),
            ("# only a comment\n\n", 2, "empty"),
            ("if exists /a", 1, "missing 'then'"),
            ("put /a b", 1, "expected 'if' or 'then'"),
            ("then\nif exists /a", 2, "after 'then'"),
            ("else", 1, "'else' before 'then'"),
            ("then\nthen", 2, "duplicate 'then'"),
            ("then\nelse\nelse", 3, "duplicate 'else'"),
            ("then\nelse\nthen", 3, "'then' after 'else'"),
            ("\n\nif version /a = x\nthen", 3, "non-negative integer"),
            ("if version /a ~ 3\nthen", 1, "unknown comparison operator"),
            ("if version /a\nthen", 1, "missing comparison operator"),
            ("if size /a = 3\nthen", 1, "unknown compare target"),
            ("if exists a\nthen", 1, "must start with '/'"),
            ("if exists /a < true\nthen", 1, "only = and !="),
            ("if exists /a = maybe\nthen", 1, "true or false"),
            (
                "if !version /a = 1\nthen",
                1,
                "only allowed before 'exists'",
            ),
            ("if value /a = \"x\nthen", 1, "unterminated string"),
            ("if value /a = \"\\n\"\nthen", 1, "unknown escape"),
            ("if version /a = 1 2\nthen", 1, "extra argument '2'"),
            ("then\nput /a", 2, "missing VALUE"),
            ("then\nput /a b c", 2, "extra argument 'c'"),
            ("then\nput", 2, "missing PATH"),
            ("then\ndel /a --force", 2, "unknown flag '--force'"),
            ("then\nfrob /a", 2, "unknown op 'frob'"),
            ("then\nget /a\"b\"", 2, "unexpected '\"'"),
            ("then extra", 1, "extra argument"),
        ];
        for (spec, line, want) in cases {
            let e = err(spec);
            assert_eq!(e.line, *line, "{spec:?}: {e}");
            assert!(e.msg.contains(want), "{spec:?}: got {e}, want {want}");
        }
        assert_eq!(
            err("then\nfrob /a").to_string(),
            "txn line 2: unknown op 'frob' (expected put, create, del or get)"
        );
    }
}
