//! Role-based access: roles and their inheritance compiled once into bit masks, so a request's
//! check is one AND. A role "has" itself and every role it inherits, transitively.

use std::collections::HashMap;

/// At most this many roles (one bit each).
pub const MAX_ROLES: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct RoleTable {
    names: Vec<String>,
    index: HashMap<String, usize>,
    /// `closure[i]`: the bits of role i and of every role it inherits
    closure: Vec<u64>,
}

/// What can be wrong with a role graph; the config layer adds the field path and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleError {
    TooMany(usize),
    UnknownInherited { role: String, inherits: String },
    Cycle(Vec<String>),
}

impl RoleTable {
    /// `roles` in file order: (name, inherited names).
    pub fn build(roles: &[(String, Vec<String>)]) -> Result<Self, Vec<RoleError>> {
        let mut errors = Vec::new();
        if roles.len() > MAX_ROLES {
            return Err(vec![RoleError::TooMany(roles.len())]);
        }
        let index: HashMap<String, usize> = roles.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        let mut edges = vec![Vec::new(); roles.len()];
        for (i, (name, inherits)) in roles.iter().enumerate() {
            for parent in inherits {
                match index.get(parent) {
                    Some(&j) => edges[i].push(j),
                    None => errors.push(RoleError::UnknownInherited { role: name.clone(), inherits: parent.clone() }),
                }
            }
        }
        // Depth-first closure with cycle detection (0 = new, 1 = on the stack, 2 = done).
        let mut state = vec![0u8; roles.len()];
        let mut closure = vec![0u64; roles.len()];
        fn visit(
            i: usize,
            edges: &[Vec<usize>],
            state: &mut [u8],
            closure: &mut [u64],
            stack: &mut Vec<usize>,
        ) -> Option<Vec<usize>> {
            state[i] = 1;
            stack.push(i);
            let mut bits = 1u64 << i;
            for &j in &edges[i] {
                match state[j] {
                    1 => {
                        let from = stack.iter().position(|&k| k == j).unwrap_or(0);
                        let mut cycle = stack[from..].to_vec();
                        cycle.push(j);
                        return Some(cycle);
                    }
                    0 => {
                        if let Some(c) = visit(j, edges, state, closure, stack) {
                            return Some(c);
                        }
                    }
                    _ => {}
                }
                bits |= closure[j];
            }
            closure[i] = bits;
            state[i] = 2;
            stack.pop();
            None
        }
        for i in 0..roles.len() {
            if state[i] == 0 {
                let mut stack = Vec::new();
                if let Some(cycle) = visit(i, &edges, &mut state, &mut closure, &mut stack) {
                    errors.push(RoleError::Cycle(cycle.into_iter().map(|k| roles[k].0.clone()).collect()));
                    break;
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(RoleTable { names: roles.iter().map(|(n, _)| n.clone()).collect(), index, closure })
    }

    pub fn id(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The bits of one role alone (for a route's `allow_roles`).
    pub fn bit(&self, name: &str) -> Option<u64> {
        self.id(name).map(|i| 1u64 << i)
    }

    /// The bits a holder of `name` has (the role and all it inherits).
    pub fn granted(&self, name: &str) -> Option<u64> {
        self.id(name).map(|i| self.closure[i])
    }

    /// Every role name, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    pub fn names_of(&self, mask: u64) -> impl Iterator<Item = &str> {
        self.names.iter().enumerate().filter(move |(i, _)| mask & (1u64 << i) != 0).map(|(_, n)| n.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(spec: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        spec.iter().map(|(n, i)| (n.to_string(), i.iter().map(|s| s.to_string()).collect())).collect()
    }

    fn reference() -> RoleTable {
        RoleTable::build(&roles(&[
            ("admin", &["developer"]),
            ("developer", &["user"]),
            ("user", &[]),
            ("service", &[]),
        ]))
        .expect("reference roles")
    }

    #[test]
    fn inheritance_is_transitive() {
        let t = reference();
        let may = |holder: &str, required: &str| t.granted(holder).unwrap_or(0) & t.bit(required).unwrap_or(0) != 0;
        let table = [
            ("admin", "admin", true),
            ("admin", "developer", true),
            ("admin", "user", true),
            ("admin", "service", false),
            ("developer", "user", true),
            ("developer", "admin", false),
            ("user", "developer", false),
            ("service", "user", false),
            ("service", "service", true),
        ];
        for (holder, required, want) in table {
            assert_eq!(may(holder, required), want, "{holder} for a {required} route");
        }
        let names: Vec<&str> = t.names_of(t.granted("admin").unwrap_or(0)).collect();
        assert_eq!(names, ["admin", "developer", "user"]);
    }

    #[test]
    fn cycles_and_unknown_parents_are_refused() {
        let err = RoleTable::build(&roles(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])])).unwrap_err();
        assert_eq!(err, vec![RoleError::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()])]);
        let err = RoleTable::build(&roles(&[("a", &["a"])])).unwrap_err();
        assert_eq!(err, vec![RoleError::Cycle(vec!["a".into(), "a".into()])]);
        let err = RoleTable::build(&roles(&[("a", &["ghost"])])).unwrap_err();
        assert_eq!(err, vec![RoleError::UnknownInherited { role: "a".into(), inherits: "ghost".into() }]);
    }
}
