//! Loading envoyproxy/ratelimit configuration files (`ratelimit.files`, globs relative to the
//! policy file) into the core's `RlsConfig`. A file that service would refuse is refused here
//! with the same message, plus the file, the line and the field path.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use decision_core::rls::{Domain, ROOT, RlsConfig, Rule, Unit};

use super::Problem;
use super::lines::LineIndex;
use serde_yaml_ng::{Mapping, Value};

use super::raw::RawRatelimit;

/// Largest ratelimit file read.
pub const MAX_RLS_FILE_BYTES: u64 = 4 << 20;

/// `*` and `?` in a file name (not across `/`).
fn name_matches(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| name_matches(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && name_matches(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && name_matches(rest, &name[1..]),
    }
}

/// The files a pattern names, sorted; wildcards are allowed in the last path component only.
pub fn expand(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let full = base.join(pattern);
    let file = full.file_name().and_then(|f| f.to_str()).ok_or_else(|| format!("invalid file pattern {pattern:?}"))?;
    let dir = full.parent().unwrap_or(Path::new("."));
    if dir.to_string_lossy().contains(['*', '?']) {
        return Err(format!("invalid file pattern {pattern:?}: wildcards are allowed in the file name only"));
    }
    if !file.contains(['*', '?']) {
        return if full.is_file() {
            Ok(vec![full])
        } else {
            Err(format!("no such file {pattern:?} (relative to the policy file)"))
        };
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| name_matches(file.as_bytes(), n.as_bytes()))
        })
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(format!("no file matches {pattern:?} (relative to the policy file)"));
    }
    Ok(out)
}

/// The keys envoyproxy/ratelimit reads in a file (src/config/config_impl.go, `validKeys`), by
/// where they take effect; `algorithm` is ours. That service accepts any of its keys at any level
/// and ignores the misplaced ones; we refuse a misplaced key, since it does nothing there.
const TOP_KEYS: &[&str] = &["domain", "descriptors"];
const DESCRIPTOR_KEYS: &[&str] = &[
    "key",
    "value",
    "rate_limit",
    "descriptors",
    "shadow_mode",
    "quota_mode",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
];
const RATE_LIMIT_KEYS: &[&str] = &["requests_per_unit", "unit", "unlimited", "name", "replaces", "algorithm"];
const REPLACES_KEYS: &[&str] = &["name"];

/// The merge key of YAML 1.1 (`<<`, plain or tagged `!!merge`).
fn is_merge_key(k: &Value) -> bool {
    match k {
        Value::String(s) => s == "<<",
        Value::Tagged(t) => t.tag == "merge" && is_merge_key(&t.value),
        _ => false,
    }
}

/// Applies YAML 1.1 merge keys (`<<: *base`, `<<: {...}`, `<<: [*a, *b]`) as envoyproxy/
/// ratelimit's parser (gopkg.in/yaml.v2) does: in the order the keys are written, so a key written
/// after `<<` overrides the merged value and one written before it is overwritten; of a list of
/// maps, the earlier ones win.
fn merge_keys(v: Value, path: &str) -> Result<Value, (String, String)> {
    const NOT_A_MAP: &str = "map merge requires map or sequence of maps as the value";
    Ok(match v {
        Value::Mapping(m) => {
            let mut out = Mapping::with_capacity(m.len());
            for (k, val) in m {
                let val = match k.as_str() {
                    Some(name) if name != "<<" => merge_keys(val, &join(path, name))?,
                    _ => merge_keys(val, path)?,
                };
                if !is_merge_key(&k) {
                    out.insert(k, val);
                    continue;
                }
                let sources = match val {
                    Value::Mapping(m) => vec![m],
                    Value::Sequence(list) => list
                        .into_iter()
                        .map(|x| match x {
                            Value::Mapping(m) => Ok(m),
                            _ => Err((path.to_owned(), NOT_A_MAP.to_owned())),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err((path.to_owned(), NOT_A_MAP.to_owned())),
                };
                for src in sources.into_iter().rev() {
                    for (k2, v2) in src {
                        out.insert(k2, v2);
                    }
                }
            }
            Value::Mapping(out)
        }
        Value::Sequence(list) => Value::Sequence(
            list.into_iter()
                .enumerate()
                .map(|(i, v)| merge_keys(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Tagged(mut t) => {
            t.value = merge_keys(t.value, path)?;
            Value::Tagged(t)
        }
        other => other,
    })
}

/// `path.key`, or `key` at the top.
fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

struct FileLoader<'a> {
    file: &'a Path,
    index: LineIndex,
    problems: &'a mut Vec<Problem>,
}

impl FileLoader<'_> {
    /// A problem at `path`, on the line of the closest field the file spells out (a field that a
    /// merge key brought in is reported on the line of the mapping that merged it).
    fn err(&mut self, path: String, message: impl Into<String>) {
        let mut at = path.as_str();
        let line = loop {
            if let Some(l) = self.index.line(at) {
                break Some(l);
            }
            match at.rfind(['.', '[']) {
                Some(i) => at = &at[..i],
                None => break None,
            }
        };
        self.problems.push(Problem { file: Some(self.file.to_owned()), path, line, message: message.into() });
    }

    /// `v` as a mapping whose keys are all in `allowed`; null is an empty mapping.
    fn mapping<'v>(&mut self, v: &'v Value, path: &str, allowed: &[&str]) -> Option<&'v Mapping> {
        let m = match v {
            Value::Null => return None,
            Value::Mapping(m) => m,
            other => {
                self.err(path.to_owned(), format!("invalid type: {}, expected a mapping", type_name(other)));
                return None;
            }
        };
        for k in m.keys() {
            match k.as_str() {
                Some(k) if allowed.contains(&k) => {}
                Some(k) => {
                    let expected = allowed.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", ");
                    let field = join(path, k);
                    // reported at the mapping (as serde does), on the unknown key's own line
                    let line = self.index.line(&field);
                    self.problems.push(Problem {
                        file: Some(self.file.to_owned()),
                        path: path.to_owned(),
                        line,
                        message: format!("unknown field `{k}`, expected one of {expected}"),
                    });
                }
                None => self.err(path.to_owned(), format!("a key is not a string: {k:?}")),
            }
        }
        Some(m)
    }

    /// A string field; envoyproxy/ratelimit stores a scalar's text, so numbers and booleans are
    /// read as they are written. Missing or null: `None`.
    fn string(&mut self, m: &Mapping, key: &str, path: &str) -> Option<String> {
        match m.get(key)? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            // an integer prints as written; a float would not (`2.10` -> "2.1"), and
            // envoyproxy/ratelimit refuses float leaves too ("error checking config")
            Value::Number(n) if !n.is_f64() => Some(n.to_string()),
            Value::Number(n) => {
                self.err(join(path, key), format!("invalid type: floating point `{n}`, expected a string (quote it)"));
                None
            }
            Value::Bool(b) => Some(b.to_string()),
            other => {
                self.err(join(path, key), format!("invalid type: {}, expected a string", type_name(other)));
                None
            }
        }
    }

    /// A boolean field, with YAML 1.1's spellings (`yes`, `on`, ...) as that service's parser
    /// reads them. Missing or null: false.
    fn boolean(&mut self, m: &Mapping, key: &str, path: &str) -> bool {
        match m.get(key) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s))
                if matches!(s.as_str(), "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "True" | "TRUE") =>
            {
                true
            }
            Some(Value::String(s))
                if matches!(s.as_str(), "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "False" | "FALSE") =>
            {
                false
            }
            Some(other) => {
                self.err(join(path, key), format!("invalid type: {}, expected a boolean", type_name(other)));
                false
            }
        }
    }

    /// `requests_per_unit`: envoyproxy/ratelimit's uint32 (missing or null: 0).
    fn requests_per_unit(&mut self, m: &Mapping, path: &str) -> u32 {
        let problem = match m.get("requests_per_unit") {
            None | Some(Value::Null) => return 0,
            Some(Value::Number(n)) => match n.as_u64().and_then(|v| u32::try_from(v).ok()) {
                Some(v) => return v,
                None if n.is_f64() => format!("invalid type: floating point `{n}`, expected u32"),
                None => format!("invalid value: integer `{n}`, expected u32 (0 to {})", u32::MAX),
            },
            Some(other) => format!("invalid type: {}, expected u32", type_name(other)),
        };
        self.err(format!("{path}.requests_per_unit"), problem);
        0
    }

    /// A list of mappings; null or missing is empty.
    fn list<'v>(&mut self, m: &'v Mapping, key: &str, path: &str) -> &'v [Value] {
        match m.get(key) {
            None | Some(Value::Null) => &[],
            Some(Value::Sequence(list)) => list,
            Some(other) => {
                self.err(join(path, key), format!("invalid type: {}, expected a list", type_name(other)));
                &[]
            }
        }
    }

    /// The rule of a `rate_limit` mapping; the descriptor's own flags are set by the caller.
    fn rule(&mut self, rl: &Mapping, lpath: &str, id: &str) -> Option<Rule> {
        let unlimited = self.boolean(rl, "unlimited", lpath);
        let requests_per_unit = self.requests_per_unit(rl, lpath);
        let unit_text = self.string(rl, "unit", lpath);
        let unit = unit_text.as_deref().and_then(Unit::parse);
        let name = self.string(rl, "name", lpath).filter(|n| !n.is_empty());
        let mut replaces = Vec::new();
        for (j, r) in self.list(rl, "replaces", lpath).iter().enumerate() {
            let rpath = format!("{lpath}.replaces[{j}]");
            let Some(r) = self.mapping(r, &rpath, REPLACES_KEYS) else {
                self.err(rpath, "should not have an empty replaces entry");
                continue;
            };
            match self.string(r, "name", &rpath).as_deref() {
                None | Some("") => self.err(rpath, "should not have an empty replaces entry"),
                Some(n) if Some(n) == name.as_deref() => {
                    self.err(rpath, "replaces should not contain name of same descriptor")
                }
                Some(n) => replaces.push(Arc::from(n)),
            }
        }
        let fixed_window = match self.string(rl, "algorithm", lpath).as_deref() {
            None | Some("sliding_window") => false,
            Some("fixed_window") => true,
            Some(other) => {
                self.err(
                    format!("{lpath}.algorithm"),
                    format!("unknown algorithm {other:?} (sliding_window or fixed_window)"),
                );
                false
            }
        };
        if unlimited && unit.is_some() {
            self.err(format!("{lpath}.unit"), "should not specify rate limit unit when unlimited");
            return None;
        }
        if !unlimited && unit.is_none() {
            self.err(format!("{lpath}.unit"), format!("invalid rate limit unit '{}'", unit_text.unwrap_or_default()));
            return None;
        }
        Some(Rule {
            requests_per_unit,
            unit: if unlimited { None } else { unit },
            name: name.map(|n| Arc::from(n.as_str())),
            replaces,
            fixed_window,
            shadow: false,
            detailed_metric: false,
            quota_mode: false,
            id: Arc::from(id),
        })
    }

    fn descriptors(&mut self, domain: &mut Domain, parent: usize, parent_id: &str, list: &[Value], path: &str) {
        for (i, d) in list.iter().enumerate() {
            let path = format!("{path}[{i}]");
            let Some(d) = self.mapping(d, &path, DESCRIPTOR_KEYS) else {
                self.err(format!("{path}.key"), "descriptor has empty key");
                continue;
            };
            let key = self.string(d, "key", &path).unwrap_or_default();
            let value = self.string(d, "value", &path).filter(|v| !v.is_empty());
            // metrics only, as in envoyproxy/ratelimit: read for their type, no effect here
            self.boolean(d, "value_to_metric", &path);
            let share_threshold = self.boolean(d, "share_threshold", &path);
            let shadow = self.boolean(d, "shadow_mode", &path);
            let quota_mode = self.boolean(d, "quota_mode", &path);
            let detailed_metric = self.boolean(d, "detailed_metric", &path);
            if let Some(meta) = d.get("metadata").filter(|m| !m.is_null() && !m.is_mapping()) {
                self.err(format!("{path}.metadata"), format!("invalid type: {}, expected a mapping", type_name(meta)));
            }
            if key.is_empty() {
                self.err(format!("{path}.key"), "descriptor has empty key");
                continue;
            }
            let final_key = value.as_ref().map_or_else(|| key.clone(), |v| format!("{key}_{v}"));
            let id = format!("{parent_id}.{final_key}");
            let rule = match d.get("rate_limit") {
                None | Some(Value::Null) => None,
                Some(rl) => {
                    let lpath = format!("{path}.rate_limit");
                    match self.mapping(rl, &lpath, RATE_LIMIT_KEYS) {
                        Some(rl) => {
                            self.rule(rl, &lpath, &id).map(|r| Rule { shadow, quota_mode, detailed_metric, ..r })
                        }
                        None => None,
                    }
                }
            };
            match domain.add_shared(parent, &key, value.as_deref(), rule, share_threshold) {
                Ok(node) => {
                    let children = self.list(d, "descriptors", &path);
                    self.descriptors(domain, node, &id, children, &format!("{path}.descriptors"))
                }
                Err(e) if e.starts_with("share_threshold") => self.err(format!("{path}.share_threshold"), e),
                Err(e) => self.err(format!("{path}.key"), e),
            }
        }
    }
}

/// Loads every file `raw.files` names; problems are appended (with their own file).
pub fn load(
    raw: Option<&RawRatelimit>,
    base: &Path,
    policy_path: &str,
    problems: &mut Vec<Problem>,
    index: &LineIndex,
) -> RlsConfig {
    let mut config =
        RlsConfig { x_ratelimit_headers: raw.is_some_and(|r| r.x_ratelimit_headers), ..Default::default() };
    let Some(raw) = raw else { return config };
    let mut domain_files: Vec<(String, PathBuf)> = Vec::new();
    for (i, pattern) in raw.files.iter().enumerate() {
        let fpath = format!("{policy_path}.files[{i}]");
        let files = match expand(base, pattern) {
            Ok(f) => f,
            Err(message) => {
                problems.push(Problem { file: None, line: index.line(&fpath), path: fpath, message });
                continue;
            }
        };
        for file in files {
            let fail = |message: String, line: Option<usize>, path: String| Problem {
                file: Some(file.clone()),
                path,
                line,
                message,
            };
            match std::fs::metadata(&file) {
                Ok(m) if m.len() > MAX_RLS_FILE_BYTES => {
                    problems.push(fail(
                        format!("{} bytes, more than the {MAX_RLS_FILE_BYTES} allowed", m.len()),
                        None,
                        String::new(),
                    ));
                    continue;
                }
                Err(e) => {
                    problems.push(fail(format!("cannot read: {e}"), None, String::new()));
                    continue;
                }
                Ok(_) => {}
            }
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => {
                    super::read_source(&file, t.as_bytes());
                    t
                }
                Err(e) => {
                    problems.push(fail(format!("cannot read: {e}"), None, String::new()));
                    continue;
                }
            };
            let parsed = match serde_yaml_ng::from_str::<Value>(&text) {
                Ok(v) => v,
                Err(e) => {
                    let mut p = super::structural(&e);
                    p.file = Some(file.clone());
                    problems.push(p);
                    continue;
                }
            };
            let mut loader = FileLoader { file: &file, index: LineIndex::build(&text), problems };
            let parsed = match merge_keys(parsed, "") {
                Ok(v) => v,
                Err((path, e)) => {
                    loader.err(path, e);
                    continue;
                }
            };
            let empty = Mapping::new();
            let top = loader.mapping(&parsed, "", TOP_KEYS).unwrap_or(&empty);
            let Some(name) = loader.string(top, "domain", "").filter(|d| !d.is_empty()) else {
                loader.err("domain".into(), "config file cannot have empty domain");
                continue;
            };
            if let Some((_, first)) = domain_files.iter().find(|(d, _)| *d == name) {
                loader.err(
                    "domain".into(),
                    format!("duplicate domain '{name}' in config file (first in {})", first.display()),
                );
                continue;
            }
            let mut domain = Domain::new(&name);
            let list = loader.list(top, "descriptors", "");
            loader.descriptors(&mut domain, ROOT, &name, list, "descriptors");
            domain_files.push((name.clone(), file.clone()));
            config.domains.insert(name, domain);
        }
    }
    config
}

#[cfg(test)]
mod tests;
