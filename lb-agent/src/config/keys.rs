//! The keys the config accepts, read from the structs themselves, and the
//! report on the keys it does not.
//!
//! [`tables`] walks the config's `Deserialize` impls with a probing
//! deserializer: each struct hands it its field names (the same list serde
//! checks keys against), so the list cannot drift from the code. Parsing
//! collects every key serde ignores ([`serde_ignored`]); [`unknown_key`]
//! turns each into a line that says where it is and the nearest valid key.

use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// Stands for the free-form name of a map entry (`[interface.<name>]`).
pub const ANY_NAME: &str = "<name>";

/// One table of the config and the keys it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// Dotted, without indices: `""` (the top level), `service`,
    /// `service.backend`, `interface.<name>`.
    pub path: String,
    pub keys: &'static [&'static str],
}

/// Every table of `T` (for the agent, [`super::Config`]), parents before
/// their children.
pub fn tables<T: DeserializeOwned>() -> Vec<Table> {
    let mut out = Vec::new();
    let mut todo = vec![Vec::<&'static str>::new()];
    while let Some(path) = todo.pop() {
        let Shape::Table(keys) = shape::<T>(&path) else { continue };
        for key in keys.iter().rev() {
            let mut child = path.clone();
            child.push(key);
            match shape::<T>(&child) {
                Shape::Table(_) => todo.push(child),
                Shape::Map => {
                    child.push(ANY_NAME);
                    if matches!(shape::<T>(&child), Shape::Table(_)) {
                        todo.push(child);
                    }
                }
                Shape::Leaf => {}
            }
        }
        out.push(Table { path: path.join("."), keys });
    }
    out
}

/// One step of a path serde_ignored reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// The steps of `path`, from the top.
pub fn steps(path: &serde_ignored::Path<'_>) -> Vec<Step> {
    use serde_ignored::Path;
    let mut out = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. } | Path::Map { parent, .. } => steps(parent),
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            return steps(parent);
        }
    };
    match path {
        Path::Seq { index, .. } => out.push(Step::Index(*index)),
        Path::Map { key, .. } => out.push(Step::Key(key.clone())),
        _ => {}
    }
    out
}

/// The report on one unknown key at `at` (its last step):
/// `` service[0].protcol (line 7): unknown key; did you mean `protocol`? ``
pub fn unknown_key(at: &[Step], tables: &[Table], doc: Option<&toml_edit::ImDocument<&str>>) -> String {
    let (Some(Step::Key(key)), parent) = (at.last(), &at[..at.len().saturating_sub(1)]) else {
        return format!("{}: unknown key", place(at));
    };
    let line = doc.and_then(|d| line_of(d, at)).map(|l| format!(" (line {l})")).unwrap_or_default();
    let table_path = table_path(parent, tables);
    let here = table_path.as_deref().and_then(|p| tables.iter().find(|t| t.path == p));
    let hint = match here.and_then(|t| nearest(key, t.keys)) {
        Some(near) => format!("; did you mean `{near}`?"),
        None => match tables.iter().find(|t| t.keys.contains(&key.as_str())) {
            Some(t) => format!("; `{key}` is a key of [{}]", t.path),
            None => here.map(|t| format!("; keys here: {}", t.keys.join(", "))).unwrap_or_default(),
        },
    };
    format!("{}{line}: unknown key{hint}", place(at))
}

/// `service[0].backend[1].wieght`
pub fn place(at: &[Step]) -> String {
    let mut s = String::new();
    for step in at {
        match step {
            Step::Key(k) if s.is_empty() => s.push_str(k),
            Step::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// The valid key closest to `key`, if any is close enough to be a typo or
/// a shortening (`window` for `stabilization_window`); among equals, the
/// one nearest in length.
fn nearest(key: &str, keys: &[&'static str]) -> Option<&'static str> {
    const CLOSE: f64 = 0.8;
    let part = |k: &str| key.len().min(k.len()) >= 4 && (k.contains(key) || key.contains(k));
    let score = |k: &str| {
        let typo = strsim::jaro_winkler(key, k);
        if part(k) {
            typo.max(CLOSE)
        } else {
            typo
        }
    };
    keys.iter()
        .map(|k| (score(k), k.len().abs_diff(key.len()), *k))
        .filter(|(score, _, _)| *score >= CLOSE)
        .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, _, k)| k)
}

/// The dotted table path of `parent` (indices dropped, map entries as
/// [`ANY_NAME`]), if the config has such a table.
fn table_path(parent: &[Step], tables: &[Table]) -> Option<String> {
    let mut path = String::new();
    for step in parent {
        let Step::Key(k) = step else { continue };
        let join = |k: &str| if path.is_empty() { k.to_owned() } else { format!("{path}.{k}") };
        let (named, any) = (join(k), join(ANY_NAME));
        // A map (`interface`) is no table itself, only its entries are.
        let known =
            |p: &str| tables.iter().any(|t| t.path == p || t.path.strip_prefix(p).is_some_and(|r| r.starts_with('.')));
        path = if known(&named) {
            named
        } else if known(&any) {
            any
        } else {
            return None;
        };
    }
    Some(path)
}

/// The 1-based line of the key `at` names.
fn line_of(doc: &toml_edit::ImDocument<&str>, at: &[Step]) -> Option<usize> {
    let (Step::Key(key), parent) = at.split_last()? else { return None };
    let mut item = doc.as_item();
    for step in parent {
        item = match step {
            Step::Key(k) => item.get(k.as_str())?,
            Step::Index(i) => item.get(*i)?,
        };
    }
    let span = item.as_table_like()?.key(key)?.span()?;
    Some(doc.raw()[..span.start].matches('\n').count() + 1)
}

/// What `T` has at a path.
enum Shape {
    Table(&'static [&'static str]),
    /// A map with free-form keys (`interface`, `env`).
    Map,
    Leaf,
}

fn shape<T: DeserializeOwned>(path: &[&'static str]) -> Shape {
    let mut found = None;
    // The probe always ends in an error: it has seen what it came for.
    let _ = T::deserialize(Probe { path, found: &mut found });
    found.unwrap_or(Shape::Leaf)
}

/// A deserializer that follows `path` into a type, one key at a time, and
/// notes the shape it finds at the end.
struct Probe<'a> {
    path: &'a [&'static str],
    found: &'a mut Option<Shape>,
}

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("probe stopped")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<M: fmt::Display>(_: M) -> Self {
        Stop
    }
}

impl<'a> Probe<'a> {
    fn end(self, shape: Shape) -> Stop {
        *self.found = Some(shape);
        Stop
    }

    /// Hands the visitor a map with the one next key of the path.
    fn descend<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        let (key, rest) = self.path.split_first().ok_or(Stop)?;
        visitor.visit_map(OneEntry { key: Some(key), value: Some(Probe { path: rest, found: self.found }) })
    }
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(self.end(Shape::Leaf))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        if self.path.is_empty() {
            return Err(self.end(Shape::Table(fields)));
        }
        self.descend(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        if self.path.is_empty() {
            return Err(self.end(Shape::Map));
        }
        self.descend(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    /// An array of tables is probed through its one element.
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_seq(OneElement(Some(self)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct tuple tuple_struct enum identifier ignored_any
    }
}

struct OneEntry<'a> {
    key: Option<&'static str>,
    value: Option<Probe<'a>>,
}

impl<'de> de::MapAccess<'de> for OneEntry<'_> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Stop> {
        self.key.take().map(|k| seed.deserialize(k.into_deserializer())).transpose()
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Stop> {
        seed.deserialize(self.value.take().ok_or(Stop)?)
    }
}

struct OneElement<'a>(Option<Probe<'a>>);

impl<'de> de::SeqAccess<'de> for OneElement<'_> {
    type Error = Stop;

    fn next_element_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, Stop> {
        self.0.take().map(|p| seed.deserialize(p)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::tables;
    use crate::config::Config;

    fn repo_file(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
    }

    /// The tables each heading of docs/config.md documents (every `[..]` or
    /// `[[..]]` in it), with the text up to the next heading.
    fn doc_sections(doc: &str) -> Vec<(Vec<String>, String)> {
        let mut out: Vec<(Vec<String>, String)> = Vec::new();
        for line in doc.lines() {
            if line.starts_with('#') {
                let tables = line
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .filter_map(|code| code.strip_prefix('[')?.strip_suffix(']'))
                    .map(|t| t.trim_matches(['[', ']']).to_owned())
                    .collect();
                out.push((tables, String::new()));
            } else if let Some((_, text)) = out.last_mut() {
                text.push_str(line);
                text.push('\n');
            }
        }
        out
    }

    /// Every key the structs take has a row in docs/config.md, under its
    /// table's heading, so the reference cannot fall behind the code.
    #[test]
    fn docs_config_md_names_every_key() {
        let doc = std::fs::read_to_string(repo_file("docs/config.md")).expect("docs/config.md");
        let sections = doc_sections(&doc);
        let mut missing = Vec::new();
        // The top level's keys are the tables below it, each with a heading.
        for table in tables::<Config>().into_iter().filter(|t| !t.path.is_empty()) {
            let Some((_, text)) = sections.iter().find(|(tables, _)| tables.contains(&table.path)) else {
                missing.push(format!("[{}] (no heading)", table.path));
                continue;
            };
            let rows = table.keys.iter().filter(|k| !text.contains(&format!("\n| `{k}` |")));
            missing.extend(rows.map(|k| format!("[{}] {k}", table.path)));
        }
        assert!(missing.is_empty(), "docs/config.md lacks: {missing:#?}");
    }

    /// Each example loads, and says at its top what it shows and how to run it.
    #[test]
    fn every_example_loads() {
        let mut examples: Vec<PathBuf> = std::fs::read_dir(repo_file("examples"))
            .expect("examples/")
            .map(|e| e.expect("examples/ entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        examples.sort();
        assert!(examples.len() >= 7, "{examples:?}");
        for path in &examples {
            let text = std::fs::read_to_string(path).expect("example");
            assert!(text.starts_with("# ") && text.contains("lb-agent check --config examples/"), "{path:?} header");
            if let Err(e) = Config::load(path) {
                panic!("{e}");
            }
        }
    }
}
