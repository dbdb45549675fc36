//! A YAML tree with line numbers, built from saphyr-parser's event stream
//! under hard limits.
//!
//! Why not serde: validation must report every problem with its line, not
//! the first one, and must see how a scalar was written (a plain `yes` is a
//! YAML 1.1 boolean in old CoreOS files; a quoted `"yes"` is a string). Why
//! not serde_yaml: archived in March 2024. saphyr-parser is maintained, pure
//! Rust, iterative (no recursion to blow the stack) and gives a span for each
//! event.
//!
//! Hostile input is stopped here: a size cap before parsing, a depth cap, and
//! a node budget that counts alias expansions, so a "billion laughs" document
//! fails after a few hundred thousand nodes rather than after gigabytes.

use saphyr_parser::{Event, Parser, ScalarStyle};

pub const MAX_BYTES: usize = 4 * 1024 * 1024;
pub const MAX_DEPTH: usize = 64;
pub const MAX_NODES: usize = 200_000;
/// Scalar bytes in the tree after alias expansion: a 1.5 MiB scalar
/// aliased 150 000 times is few nodes but 200 GiB.
pub const MAX_EXPANDED_BYTES: usize = 4 * MAX_BYTES;

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `plain` is true for unquoted, non-block scalars.
    Scalar {
        value: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: Kind,
    /// 1-based line where the node starts.
    pub line: usize,
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { value, plain: true } if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar { .. } if self.is_null() => "null",
            Kind::Scalar { .. } => "a scalar",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YamlError {
    #[error("document is {size} bytes, larger than the {MAX_BYTES}-byte limit")]
    TooLarge { size: usize },
    #[error("line {line}: YAML syntax error: {msg}")]
    Syntax { line: usize, msg: String },
    #[error("line {line}: nesting deeper than {MAX_DEPTH} levels")]
    TooDeep { line: usize },
    #[error("line {line}: more than {MAX_NODES} nodes after expanding aliases (alias bomb?)")]
    TooManyNodes { line: usize },
    #[error("line {line}: more than {MAX_EXPANDED_BYTES} bytes of scalars after expanding aliases (alias bomb?)")]
    TooManyBytes { line: usize },
    #[error("line {line}: alias to an unknown anchor")]
    UnknownAnchor { line: usize },
    #[error("more than one YAML document in the file")]
    MultipleDocuments,
}

impl YamlError {
    pub fn line(&self) -> usize {
        match self {
            YamlError::Syntax { line, .. }
            | YamlError::TooDeep { line }
            | YamlError::TooManyNodes { line }
            | YamlError::TooManyBytes { line }
            | YamlError::UnknownAnchor { line } => *line,
            YamlError::TooLarge { .. } | YamlError::MultipleDocuments => 1,
        }
    }
}

/// (nodes, scalar bytes) of a tree.
fn count(n: &Node) -> (usize, usize) {
    let add = |a: (usize, usize), b: (usize, usize)| (a.0 + b.0, a.1 + b.1);
    match &n.kind {
        Kind::Scalar { value, .. } => (1, value.len()),
        Kind::Seq(v) => v.iter().map(count).fold((1, 0), add),
        Kind::Map(v) => v
            .iter()
            .map(|(k, x)| add(count(k), count(x)))
            .fold((1, 0), add),
    }
}

enum Open {
    Seq(Vec<Node>, usize, usize),
    Map(Vec<(Node, Node)>, Option<Node>, usize, usize),
}

/// Parse one document. An empty document is an empty mapping.
pub fn parse(text: &str) -> Result<Node, YamlError> {
    if text.len() > MAX_BYTES {
        return Err(YamlError::TooLarge { size: text.len() });
    }
    let mut stack: Vec<Open> = Vec::new();
    // Anchored nodes by id, with their size, for alias expansion.
    let mut anchors: std::collections::HashMap<usize, (Node, (usize, usize))> = Default::default();
    let mut nodes = 0usize;
    let mut bytes = 0usize;
    let mut root: Option<Node> = None;
    let mut docs = 0;

    for ev in Parser::new_from_str(text) {
        let (ev, span) = ev.map_err(|e| {
            let line = e.marker().line();
            // The parser has its own nesting guard for flow collections.
            if e.info().contains("recursion limit") {
                YamlError::TooDeep { line }
            } else {
                YamlError::Syntax {
                    line,
                    msg: e.info().to_string(),
                }
            }
        })?;
        let line = span.start.line();
        let done: Option<(Node, usize)> = match ev {
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    return Err(YamlError::MultipleDocuments);
                }
                None
            }
            Event::Scalar(value, style, anchor, _tag) => {
                let plain = style == ScalarStyle::Plain;
                bytes += value.len();
                if bytes > MAX_EXPANDED_BYTES {
                    return Err(YamlError::TooManyBytes { line });
                }
                Some((
                    Node {
                        kind: Kind::Scalar {
                            value: value.into_owned(),
                            plain,
                        },
                        line,
                    },
                    anchor,
                ))
            }
            Event::Alias(id) => {
                // Check the budget before cloning: the clone is the cost.
                let (n, (size, size_bytes)) = anchors
                    .get(&id)
                    .map(|(n, c)| (n, *c))
                    .ok_or(YamlError::UnknownAnchor { line })?;
                nodes += size;
                if nodes > MAX_NODES {
                    return Err(YamlError::TooManyNodes { line });
                }
                bytes += size_bytes;
                if bytes > MAX_EXPANDED_BYTES {
                    return Err(YamlError::TooManyBytes { line });
                }
                Some((n.clone(), 0))
            }
            Event::SequenceStart(anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(YamlError::TooDeep { line });
                }
                stack.push(Open::Seq(Vec::new(), anchor, line));
                None
            }
            Event::MappingStart(anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(YamlError::TooDeep { line });
                }
                stack.push(Open::Map(Vec::new(), None, anchor, line));
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Open::Seq(v, anchor, l)) => Some((
                    Node {
                        kind: Kind::Seq(v),
                        line: l,
                    },
                    anchor,
                )),
                _ => {
                    return Err(YamlError::Syntax {
                        line,
                        msg: "unbalanced sequence".into(),
                    })
                }
            },
            Event::MappingEnd => match stack.pop() {
                Some(Open::Map(v, _, anchor, l)) => Some((
                    Node {
                        kind: Kind::Map(v),
                        line: l,
                    },
                    anchor,
                )),
                _ => {
                    return Err(YamlError::Syntax {
                        line,
                        msg: "unbalanced mapping".into(),
                    })
                }
            },
            _ => None,
        };
        let Some((node, anchor)) = done else { continue };
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(YamlError::TooManyNodes { line });
        }
        if anchor != 0 {
            let size = count(&node);
            anchors.insert(anchor, (node.clone(), size));
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Open::Seq(v, ..)) => v.push(node),
            Some(Open::Map(v, pending, ..)) => match pending.take() {
                None => *pending = Some(node),
                Some(k) => v.push((k, node)),
            },
        }
    }
    Ok(root.unwrap_or(Node {
        kind: Kind::Map(Vec::new()),
        line: 1,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_styles() {
        let n = parse("a: yes\nb:\n  - 'yes'\n").unwrap();
        let Kind::Map(m) = n.kind else { panic!() };
        assert_eq!(m[0].0.line, 1);
        assert_eq!(
            m[0].1.kind,
            Kind::Scalar {
                value: "yes".into(),
                plain: true
            }
        );
        let Kind::Seq(s) = &m[1].1.kind else { panic!() };
        assert_eq!(s[0].line, 3);
        assert_eq!(
            s[0].kind,
            Kind::Scalar {
                value: "yes".into(),
                plain: false
            }
        );
    }

    #[test]
    fn billion_laughs_is_stopped() {
        let mut doc = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            doc.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        assert!(matches!(parse(&doc), Err(YamlError::TooManyNodes { .. })));
    }

    #[test]
    fn alias_bytes_are_bounded_not_only_nodes() {
        // Under 2 MiB of text: one 1.5 MiB scalar, aliased many times.
        let big = "x".repeat(3 << 19);
        let mut doc = format!("a: &big {big}\nb: [");
        doc.push_str(&vec!["*big"; 60_000].join(", "));
        doc.push_str("]\n");
        assert!(doc.len() < 2 << 20);
        // Refused by the byte budget after a handful of copies (the node
        // budget alone would let all 60 000 through: 90 GB).
        assert!(matches!(parse(&doc), Err(YamlError::TooManyBytes { .. })));
        // A few aliases of a big scalar are fine.
        let ok = format!("a: &big {}\nb: [*big, *big]\n", "y".repeat(1 << 20));
        parse(&ok).unwrap();
    }

    #[test]
    fn deep_nesting_is_stopped() {
        let flow = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(matches!(parse(&flow), Err(YamlError::TooDeep { .. })));
        let block: String = (0..200)
            .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
            .collect();
        assert!(matches!(parse(&block), Err(YamlError::TooDeep { .. })));
        let fine: String = (0..20)
            .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
            .collect();
        parse(&fine).unwrap();
    }

    #[test]
    fn oversized_is_stopped_before_parsing() {
        let doc = "#".repeat(MAX_BYTES + 1);
        assert!(matches!(parse(&doc), Err(YamlError::TooLarge { .. })));
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = parse("a: 1\nb: [1, 2\n").unwrap_err();
        assert!(matches!(e, YamlError::Syntax { .. }));
        assert!(e.line() >= 2, "{e}");
    }

    #[test]
    fn aliases_expand() {
        let n = parse("x: &k [1, 2]\ny: *k\n").unwrap();
        let Kind::Map(m) = n.kind else { panic!() };
        assert_eq!(m[0].1.kind, m[1].1.kind);
    }
}
