//! Loading envoyproxy/ratelimit configuration files (`ratelimit.files`, globs relative to the
//! policy file) into the core's `RlsConfig`. A file that service would refuse is refused here
//! with the same message, plus the file, the line and the field path.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use decision_core::rls::{Domain, ROOT, RlsConfig, Rule, Unit};

use super::Problem;
use super::lines::LineIndex;
use super::raw::{RawRatelimit, RawRlsDescriptor, RawRlsFile};

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

struct FileLoader<'a> {
    file: &'a Path,
    index: LineIndex,
    problems: &'a mut Vec<Problem>,
}

impl FileLoader<'_> {
    fn err(&mut self, path: String, message: impl Into<String>) {
        let line = self.index.line(&path);
        self.problems.push(Problem { file: Some(self.file.to_owned()), path, line, message: message.into() });
    }

    fn descriptors(
        &mut self,
        domain: &mut Domain,
        parent: usize,
        parent_id: &str,
        list: &[RawRlsDescriptor],
        path: &str,
    ) {
        for (i, d) in list.iter().enumerate() {
            let path = format!("{path}[{i}]");
            let key = d.key.as_deref().unwrap_or("");
            if key.is_empty() {
                self.err(format!("{path}.key"), "descriptor has empty key");
                continue;
            }
            let value = d.value.as_deref().filter(|v| !v.is_empty());
            let final_key = value.map_or(key.to_owned(), |v| format!("{key}_{v}"));
            let id = format!("{parent_id}.{final_key}");
            let rule = d.rate_limit.as_ref().and_then(|rl| {
                let lpath = format!("{path}.rate_limit");
                let unit = rl.unit.as_deref().and_then(Unit::parse);
                if rl.unlimited && unit.is_some() {
                    self.err(format!("{lpath}.unit"), "should not specify rate limit unit when unlimited");
                    return None;
                }
                if !rl.unlimited && unit.is_none() {
                    self.err(
                        format!("{lpath}.unit"),
                        format!("invalid rate limit unit '{}'", rl.unit.as_deref().unwrap_or("")),
                    );
                    return None;
                }
                let mut replaces = Vec::new();
                for (j, r) in rl.replaces.iter().enumerate() {
                    match r.name.as_deref() {
                        None | Some("") => {
                            self.err(format!("{lpath}.replaces[{j}]"), "should not have an empty replaces entry")
                        }
                        Some(n) if Some(n) == rl.name.as_deref() => self.err(
                            format!("{lpath}.replaces[{j}]"),
                            "replaces should not contain name of same descriptor",
                        ),
                        Some(n) => replaces.push(Arc::from(n)),
                    }
                }
                let fixed_window = match rl.algorithm.as_deref() {
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
                Some(Rule {
                    requests_per_unit: rl.requests_per_unit,
                    unit,
                    shadow: d.shadow_mode,
                    name: rl.name.as_deref().filter(|n| !n.is_empty()).map(Arc::from),
                    replaces,
                    fixed_window,
                    detailed_metric: d.detailed_metric,
                    id: Arc::from(id.as_str()),
                })
            });
            match domain.add(parent, key, value, rule) {
                Ok(node) => self.descriptors(domain, node, &id, &d.descriptors, &format!("{path}.descriptors")),
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
                Ok(t) => t,
                Err(e) => {
                    problems.push(fail(format!("cannot read: {e}"), None, String::new()));
                    continue;
                }
            };
            let parsed: RawRlsFile = match serde_yaml_ng::from_str::<Option<RawRlsFile>>(&text) {
                Ok(r) => r.unwrap_or_default(),
                Err(e) => {
                    let mut p = super::structural(&e);
                    p.file = Some(file.clone());
                    problems.push(p);
                    continue;
                }
            };
            let mut loader = FileLoader { file: &file, index: LineIndex::build(&text), problems };
            let Some(name) = parsed.domain.filter(|d| !d.is_empty()) else {
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
            loader.descriptors(&mut domain, ROOT, &name, &parsed.descriptors, "descriptors");
            domain_files.push((name.clone(), file.clone()));
            config.domains.insert(name, domain);
        }
    }
    config
}

#[cfg(test)]
mod tests;
