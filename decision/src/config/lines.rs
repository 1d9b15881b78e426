//! Where each field of a YAML file starts: a map from field paths in serde_yaml's notation
//! (`routes[3].allow_roles[0]`) to 1-based line numbers, so that errors found after
//! deserialization (an unknown role, a bad CIDR) can name the line as well as the path.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Debug, Default)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
}

enum Frame {
    Map { key: Option<String> },
    Seq { index: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

impl Builder {
    fn path(&self) -> String {
        let mut p = String::new();
        for f in &self.stack {
            match f {
                Frame::Map { key: Some(k) } => {
                    if !p.is_empty() {
                        p.push('.');
                    }
                    p.push_str(k);
                }
                Frame::Map { key: None } => {}
                Frame::Seq { index } => {
                    p.push('[');
                    p.push_str(&index.to_string());
                    p.push(']');
                }
            }
        }
        p
    }

    /// Called after a complete value: the parent moves on to its next key or element.
    fn advance(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key }) => *key = None,
            Some(Frame::Seq { index }) => *index += 1,
            None => {}
        }
    }

    fn expecting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None }))
    }

    fn record(&mut self, line: usize) {
        let p = self.path();
        self.lines.entry(p).or_insert(line);
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                if self.expecting_key() {
                    if let Some(Frame::Map { key }) = self.stack.last_mut() {
                        *key = Some(value);
                    }
                    self.record(mark.line());
                } else {
                    self.record(mark.line());
                    self.advance();
                }
            }
            Event::Alias(_) => {
                if self.expecting_key() {
                    if let Some(Frame::Map { key }) = self.stack.last_mut() {
                        *key = Some("*alias".into());
                    }
                } else {
                    self.record(mark.line());
                    self.advance();
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                if self.expecting_key() {
                    // a complex key: give it a placeholder name
                    if let Some(Frame::Map { key }) = self.stack.last_mut() {
                        *key = Some("?".into());
                    }
                }
                self.record(mark.line());
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { key: None }
                } else {
                    Frame::Seq { index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.advance();
            }
            _ => {}
        }
    }
}

impl LineIndex {
    /// Indexes a YAML text; a text that does not parse gives an empty index (the
    /// deserializer reports that error with its own line).
    pub fn build(text: &str) -> LineIndex {
        let mut b = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut b, false).is_err() {
            return LineIndex::default();
        }
        LineIndex { lines: b.lines }
    }

    /// The line of `path`, or of its nearest enclosing field that has one.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_lines_where_fields_start() {
        let text = "a: 1\nroutes:\n  - match: { path: /x }\n    allow_roles: [user, admn]\n  - match:\n      path: /y\nb:\n  c: d\n";
        let idx = LineIndex::build(text);
        assert_eq!(idx.line("a"), Some(1));
        assert_eq!(idx.line("routes"), Some(2));
        assert_eq!(idx.line("routes[0].match.path"), Some(3));
        assert_eq!(idx.line("routes[0].allow_roles"), Some(4));
        assert_eq!(idx.line("routes[0].allow_roles[1]"), Some(4));
        assert_eq!(idx.line("routes[1].match.path"), Some(6));
        assert_eq!(idx.line("b.c"), Some(8));
        assert_eq!(idx.line("routes[1].nothing.here"), Some(5));
        assert_eq!(idx.line("zzz"), None);
    }
}
