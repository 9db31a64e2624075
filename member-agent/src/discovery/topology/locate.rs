//! Lines for errors found across items of a topology file (a duplicate, a VIP used twice, an
//! endpoint of an unknown cluster). serde_yaml reports the line of what fails while it
//! deserializes, but keeps no positions in the values it returns; so the text is walked
//! again, with serde, down to the error's field path (`services[1].vips[0]`), and made to
//! fail there: serde_yaml then puts the line of that node on the error. No second YAML
//! reader, and flow style (`{ a: 1, b: 2 }`, `[x, y]`) is handled as block style is.

use std::fmt;

use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer as _;

/// One step of a field path.
#[derive(Debug, Clone, PartialEq)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// `a.b[1].c` → `[Key(a), Key(b), Index(1), Key(c)]`; `None` if it is not such a path.
fn steps(path: &str) -> Option<Vec<Step<'_>>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if key.is_empty() {
            return None;
        }
        out.push(Step::Key(key));
        while !rest.is_empty() {
            let (n, after) = rest.split_once(']')?;
            out.push(Step::Index(n.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
            if !after.is_empty() && !after.starts_with('[') {
                return None;
            }
        }
    }
    Some(out)
}

/// The 1-based line of the node at `path` in the YAML `text`: for a field, the line of its
/// key; for a list item, the item's. A path that goes further than the text gives the line of
/// the deepest node it reaches; `None` when the text does not parse or the path is malformed.
pub(super) fn line_of(text: &str, path: &str) -> Option<usize> {
    let steps = steps(path)?;
    let err = serde_yaml::Deserializer::from_str(text)
        .deserialize_any(Walk(&steps))
        .err()?;
    err.location().map(|l| l.line())
}

/// The marker error of the walk; any error ends it, with serde_yaml's position.
const HERE: &str = "here";

/// Walks down `steps` and always fails at the node it ends on.
struct Walk<'p, 'a>(&'p [Step<'a>]);

impl<'de> DeserializeSeed<'de> for Walk<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_, '_> {
    // every scalar (the node reached) fails through the default `invalid_type`
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the node at the path")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Step::Key(key), rest)) = self.0.split_first() else {
            return Err(A::Error::custom(HERE));
        };
        while let Some(hit) = map.next_key_seed(Key {
            wanted: key,
            fail: rest.is_empty(),
        })? {
            if hit {
                return map.next_value_seed(Walk(rest));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(A::Error::custom(HERE)) // no such key: the map itself
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Step::Index(index), rest)) = self.0.split_first() else {
            return Err(A::Error::custom(HERE));
        };
        for _ in 0..*index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(A::Error::custom(HERE)); // too short: the list itself
            }
        }
        // the item fails on its own line; a list too short fails on the list's
        seq.next_element_seed(Walk(rest))?;
        Err(A::Error::custom(HERE))
    }
}

/// A map key: whether it is the one wanted; fails on it when the walk ends at this key.
struct Key<'a> {
    wanted: &'a str,
    fail: bool,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = bool;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Key<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<bool, E> {
        match (k == self.wanted, self.fail) {
            (true, true) => Err(E::custom(HERE)),
            (hit, _) => Ok(hit),
        }
    }

    // non-string keys (numbers, booleans) are never the one wanted
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
a: 1
list:
  - id: x
    more: [p, q]
  - { id: y, deep: { k: v } }
tail:
  key: value
";

    #[test]
    fn paths_parse() {
        assert_eq!(
            steps("services[1].vips[0]"),
            Some(vec![
                Step::Key("services"),
                Step::Index(1),
                Step::Key("vips"),
                Step::Index(0)
            ])
        );
        assert_eq!(steps("a[1][2]").map(|s| s.len()), Some(3));
        assert_eq!(steps("a[x]"), None);
        assert_eq!(steps(".a"), None);
        assert_eq!(steps("a[1]b"), None);
    }

    #[test]
    fn lines_of_keys_items_and_flow_style() {
        assert_eq!(line_of(TEXT, "a"), Some(1));
        assert_eq!(line_of(TEXT, "list"), Some(2));
        assert_eq!(line_of(TEXT, "list[0].id"), Some(3));
        assert_eq!(line_of(TEXT, "list[0].more[1]"), Some(4));
        assert_eq!(line_of(TEXT, "list[1].id"), Some(5));
        assert_eq!(line_of(TEXT, "list[1].deep.k"), Some(5));
        assert_eq!(line_of(TEXT, "tail.key"), Some(7));
        // beyond the text: the deepest node reached
        assert_eq!(line_of(TEXT, "list[1].missing"), Some(5));
        assert_eq!(line_of(TEXT, "list[7]"), Some(3), "the list itself");
    }
}
