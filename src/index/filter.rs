//! Metadata filters on a search: which documents may be returned. Reserved keys match the
//! citation metadata (`id`, `source`, `date_from`, `date_to`) or say whether superseded versions
//! may be returned (`include_superseded`, false unless given); every other key matches the
//! document's metadata field of that name (front matter or JSONL fields kept at ingest). A value is
//! a string, number or boolean, or a list of them (any of); a metadata field holding a list matches
//! when any element does. Dates compare as text, so ISO dates (`2024-05-01`, `2024`) order.

use serde_json::{Map, Value};

/// One condition on a document.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// The document id is one of these.
    Id(Vec<String>),
    /// The `source` is one of these.
    Source(Vec<String>),
    /// `date >= from` (documents without a date are excluded).
    DateFrom(String),
    /// `date <= to` (documents without a date are excluded).
    DateTo(String),
    /// The metadata field equals, or contains, one of these values.
    Metadata(String, Vec<Value>),
}

/// All conditions must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub conditions: Vec<Condition>,
    /// Return documents a newer version supersedes (never by default: outdated guidance is not
    /// cited).
    pub include_superseded: bool,
}

/// A rejected filter: the offending key (for an error naming the field) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterError {
    pub key: String,
    pub message: String,
}

impl std::error::Error for FilterError {}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "filter `{}`: {}", self.key, self.message)
    }
}

fn err(key: &str, message: impl Into<String>) -> FilterError {
    FilterError {
        key: key.to_string(),
        message: message.into(),
    }
}

fn scalars(key: &str, v: &Value) -> Result<Vec<Value>, FilterError> {
    let one = |x: &Value| match x {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(x.clone()),
        _ => Err(err(key, "values must be strings, numbers or booleans")),
    };
    let values = match v {
        Value::Array(items) => items.iter().map(one).collect::<Result<Vec<_>, _>>()?,
        other => vec![one(other)?],
    };
    if values.is_empty() {
        return Err(err(key, "an empty list matches nothing"));
    }
    Ok(values)
}

fn strings(key: &str, v: &Value) -> Result<Vec<String>, FilterError> {
    scalars(key, v)?
        .into_iter()
        .map(|x| match x {
            Value::String(s) => Ok(s),
            _ => Err(err(key, "values must be strings")),
        })
        .collect()
}

fn date(key: &str, v: &Value) -> Result<String, FilterError> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(err(
            key,
            "expected a date such as \"2024-05-01\" or \"2024\"",
        )),
    }
}

impl Filter {
    /// No condition on documents (whether superseded versions count is decided apart).
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// From a JSON object such as `{"source": "NCI PDQ", "cancer_type": ["sarcoma"],
    /// "date_from": "2020"}`.
    pub fn from_json(v: &Value) -> Result<Self, FilterError> {
        let map: &Map<String, Value> = match v {
            Value::Object(m) => m,
            Value::Null => return Ok(Self::default()),
            _ => return Err(err("filters", "expected an object of key: value")),
        };
        let mut conditions = Vec::new();
        let mut include_superseded = false;
        for (key, value) in map {
            conditions.push(match key.as_str() {
                "include_superseded" => {
                    include_superseded = match value {
                        Value::Bool(b) => *b,
                        Value::String(s) if s == "true" || s == "false" => s == "true",
                        _ => return Err(err(key, "expected true or false")),
                    };
                    continue;
                }
                "id" => Condition::Id(strings(key, value)?),
                "source" => Condition::Source(strings(key, value)?),
                "date_from" => Condition::DateFrom(date(key, value)?),
                "date_to" => Condition::DateTo(date(key, value)?),
                _ => {
                    if key.is_empty()
                        || key.contains(['"', '\\'])
                        || key.chars().any(char::is_control)
                    {
                        return Err(err(key, "not a usable metadata key"));
                    }
                    Condition::Metadata(key.clone(), scalars(key, value)?)
                }
            });
        }
        Ok(Self {
            conditions,
            include_superseded,
        })
    }

    /// From command-line `KEY=VALUE` pairs; a key given twice matches any of its values.
    pub fn from_pairs(pairs: &[String]) -> Result<Self, FilterError> {
        let mut map = Map::new();
        for pair in pairs {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| err(pair, "expected KEY=VALUE"))?;
            let v = Value::String(v.to_string());
            match map.get_mut(k) {
                Some(Value::Array(items)) => items.push(v),
                Some(_) if k == "date_from" || k == "date_to" => {
                    return Err(err(k, "given more than once"))
                }
                Some(existing) => *existing = Value::Array(vec![existing.clone(), v]),
                None => {
                    map.insert(k.to_string(), v);
                }
            }
        }
        Self::from_json(&Value::Object(map))
    }

    /// The SQL condition on `documents d` and its parameters.
    pub(crate) fn to_sql(&self) -> (String, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value as Sql;
        let to_sql = |v: &Value| match v {
            Value::String(s) => Sql::Text(s.clone()),
            Value::Bool(b) => Sql::Integer(*b as i64),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Sql::Integer(i),
                None => Sql::Real(n.as_f64().unwrap_or(f64::NAN)),
            },
            _ => Sql::Null,
        };
        let mut parts = Vec::new();
        let mut params = Vec::new();
        let placeholders = |n: usize| vec!["?"; n].join(", ");
        for c in &self.conditions {
            match c {
                Condition::Id(ids) => {
                    parts.push(format!("d.id IN ({})", placeholders(ids.len())));
                    params.extend(ids.iter().map(|s| Sql::Text(s.clone())));
                }
                Condition::Source(sources) => {
                    parts.push(format!("d.source IN ({})", placeholders(sources.len())));
                    params.extend(sources.iter().map(|s| Sql::Text(s.clone())));
                }
                Condition::DateFrom(from) => {
                    parts.push("(d.date <> '' AND d.date >= ?)".into());
                    params.push(Sql::Text(from.clone()));
                }
                Condition::DateTo(to) => {
                    // "2024" must admit "2024-05-01": compare against the bound's prefix length.
                    parts.push("(d.date <> '' AND substr(d.date, 1, length(?)) <= ?)".into());
                    params.push(Sql::Text(to.clone()));
                    params.push(Sql::Text(to.clone()));
                }
                Condition::Metadata(key, values) => {
                    parts.push(format!(
                        "EXISTS (SELECT 1 FROM json_each(d.metadata, ?) WHERE json_each.value IN ({}))",
                        placeholders(values.len())
                    ));
                    params.push(Sql::Text(format!("$.\"{key}\"")));
                    params.extend(values.iter().map(to_sql));
                }
            }
        }
        if !self.include_superseded {
            parts.push("d.superseded_by IS NULL".into());
        }
        if parts.is_empty() {
            ("1".into(), params)
        } else {
            (parts.join(" AND "), params)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_reserved_and_metadata_keys() {
        let f = Filter::from_json(&json!({
            "source": "NCI PDQ", "cancer_type": ["sarcoma", "gist"], "date_from": "2020"
        }))
        .unwrap();
        assert_eq!(f.conditions.len(), 3);
        assert!(f
            .conditions
            .contains(&Condition::Source(vec!["NCI PDQ".into()])));
        assert!(f.conditions.contains(&Condition::DateFrom("2020".into())));
    }

    #[test]
    fn names_the_bad_key() {
        let e = Filter::from_json(&json!({"source": {"x": 1}})).unwrap_err();
        assert_eq!(e.key, "source");
        let e = Filter::from_json(&json!({"date_to": true})).unwrap_err();
        assert_eq!(e.key, "date_to");
        let e = Filter::from_json(&json!({"tag": []})).unwrap_err();
        assert_eq!(e.key, "tag");
        assert!(Filter::from_json(&json!(["source"])).is_err());
        assert!(Filter::from_json(&json!({"a\"b": "x"})).is_err());
        let e = Filter::from_json(&json!({"include_superseded": 1})).unwrap_err();
        assert_eq!(e.key, "include_superseded");
    }

    #[test]
    fn superseded_versions_only_when_asked() {
        let f = Filter::from_json(&json!({"source": "x"})).unwrap();
        assert!(!f.include_superseded);
        assert!(f.to_sql().0.contains("superseded_by IS NULL"));
        let f = Filter::from_json(&json!({"include_superseded": true})).unwrap();
        assert!(f.include_superseded && f.is_empty());
        assert!(!f.to_sql().0.contains("superseded_by"));
        let f = Filter::from_pairs(&["include_superseded=true".into()]).unwrap();
        assert!(f.include_superseded);
    }

    #[test]
    fn pairs_repeat_into_any_of() {
        let f = Filter::from_pairs(&["tag=a".into(), "tag=b".into(), "source=x".into()]).unwrap();
        assert!(f.conditions.contains(&Condition::Metadata(
            "tag".into(),
            vec![json!("a"), json!("b")]
        )));
        assert!(Filter::from_pairs(&["novalue".into()]).is_err());
    }
}
