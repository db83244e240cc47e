//! Stop strings over streamed text: text is released as soon as it can no longer be the start of
//! a stop string; when one appears, the text before it is released and generation ends (the stop
//! string itself is not sent, as in the OpenAI API).

/// Watches generated text for any of a set of stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What a piece of text yields.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop string was found; nothing after it will be released.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Feeds newly generated text.
    pub fn push(&mut self, piece: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: piece.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        // Keep the longest tail that could still grow into a stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let text = self.held[..keep].to_string();
        self.held.replace_range(..keep, "");
        Released {
            text,
            stopped: false,
        }
    }

    /// Releases what is held back at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stops_across_pieces_and_drops_the_stop_string() {
        assert_eq!(
            run(&["END"], &["Surgery first. E", "N", "D and more"]),
            ("Surgery first. ".into(), true)
        );
        assert_eq!(
            run(&["\n\n", "Question:"], &["a\n", "\nb"]),
            ("a".into(), true)
        );
    }

    #[test]
    fn partial_matches_are_released_when_they_fail() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("go ST").text, "go ");
        assert_eq!(m.push("AR").text, "STAR");
        assert_eq!(run(&["STOP"], &["ST", "ST", "OP!"]), ("ST".into(), true));
        assert_eq!(run(&["xyz"], &["é", "x", "y"]), ("éxy".into(), false));
        assert_eq!(run(&[], &["anything"]), ("anything".into(), false));
    }
}
