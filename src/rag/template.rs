//! The shape of a sectioned answer: headings written by code, each section generated in turn
//! with its own token budget, continuing the text so far. Configurable with
//! `--answer-template FILE` (JSON: `{"sections": [{"heading": "...", "max_tokens": N}, ...]}`).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One section: its heading (written by code) and the most tokens the model writes under it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    pub heading: String,
    pub max_tokens: usize,
}

/// The sections of an answer, in order.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerTemplate {
    pub sections: Vec<Section>,
}

/// How an answer is laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerShape {
    /// One stretch of text, as the model writes it.
    #[default]
    Free,
    /// The template's sections, each under its heading.
    Sections,
}

impl Default for AnswerTemplate {
    /// What it means, how care differs, the options with their evidence, questions for the care
    /// team, the bottom line.
    fn default() -> Self {
        let s = |heading: &str, max_tokens| Section {
            heading: heading.into(),
            max_tokens,
        };
        Self {
            sections: vec![
                s("What it means", 96),
                s("How care differs", 96),
                s("Options and their evidence", 128),
                s("Questions to ask your care team", 64),
                s("Bottom line", 48),
            ],
        }
    }
}

impl AnswerTemplate {
    /// Reads and checks a template file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let raw = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let t: Self = serde_json::from_str(&raw).map_err(|e| format!("{}: {e}", path.display()))?;
        t.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(t)
    }

    fn check(&self) -> Result<(), String> {
        if self.sections.is_empty() || self.sections.len() > 12 {
            return Err("a template has 1 to 12 sections".into());
        }
        for s in &self.sections {
            if s.heading.trim().is_empty() || s.heading.contains('\n') || s.heading.len() > 80 {
                return Err(format!(
                    "heading `{}`: one line of 1 to 80 characters",
                    s.heading
                ));
            }
            if s.max_tokens == 0 {
                return Err(format!(
                    "section `{}`: max_tokens must be positive",
                    s.heading
                ));
            }
        }
        Ok(())
    }

    /// The sections with budgets scaled down, in proportion, to fit `max_tokens` in all (each
    /// keeps at least one token; sections that cannot get one are dropped from the end).
    pub fn fit(&self, max_tokens: usize) -> Vec<Section> {
        let total: usize = self.sections.iter().map(|s| s.max_tokens).sum();
        if total <= max_tokens {
            return self.sections.clone();
        }
        let mut out = Vec::new();
        let mut left = max_tokens;
        for s in self.sections.iter().take(max_tokens) {
            let share = (s.max_tokens * max_tokens / total).max(1).min(left);
            if share == 0 {
                break;
            }
            left -= share;
            out.push(Section {
                heading: s.heading.clone(),
                max_tokens: share,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_fit_the_answer() {
        let t = AnswerTemplate::default();
        assert_eq!(t.fit(1000), t.sections);
        let f = t.fit(100);
        assert_eq!(f.len(), 5);
        assert!(f.iter().map(|s| s.max_tokens).sum::<usize>() <= 100);
        assert!(f.iter().all(|s| s.max_tokens >= 1));
        let tiny = t.fit(2);
        assert_eq!(tiny.len(), 2);
        assert_eq!(tiny.iter().map(|s| s.max_tokens).sum::<usize>(), 2);
    }

    #[test]
    fn bad_templates_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");
        std::fs::write(&p, r#"{"sections": [{"heading": "A", "max_tokens": 0}]}"#).unwrap();
        assert!(AnswerTemplate::load(&p).unwrap_err().contains("max_tokens"));
        std::fs::write(&p, r#"{"sections": []}"#).unwrap();
        assert!(AnswerTemplate::load(&p).unwrap_err().contains("1 to 12"));
        std::fs::write(
            &p,
            r#"{"sections": [{"heading": "A", "max_tokens": 5, "x": 1}]}"#,
        )
        .unwrap();
        assert!(AnswerTemplate::load(&p).is_err());
        std::fs::write(
            &p,
            r#"{"sections": [{"heading": "Bottom line", "max_tokens": 40}]}"#,
        )
        .unwrap();
        assert_eq!(AnswerTemplate::load(&p).unwrap().sections[0].max_tokens, 40);
    }
}
