//! Text that anyone who can write the board (or a worker) chose, on its way to a terminal or
//! the journal: shown, never obeyed.

/// Task data is written by anyone who can write the board: show control characters
/// (newlines, escape sequences that could repaint the terminal) and the invisible ones that
/// reorder or hide text (bidi overrides, zero-width) as escapes, never raw.
pub fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if hidden(c) {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A character that must not reach a terminal raw.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}'      // zero-width space/joiners, LRM, RLM
            | '\u{2028}'..='\u{202e}'    // line/paragraph separators, bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}'    // word joiner, invisible operators
            | '\u{2066}'..='\u{2069}'    // bidi isolates
            | '\u{061c}' | '\u{feff}' | '\u{180e}')
}

/// Worker output on its way to a terminal: each line as `clean` shows it (tabs kept),
/// invalid UTF-8 replaced, so no escape sequence written by a worker reaches the operator.
pub fn clean_output(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let (body, nl) = match text.strip_suffix('\n') {
        Some(b) => (b, "\n"),
        None => (text.as_ref(), ""),
    };
    let mut out: String = body.split('\t').map(clean).collect::<Vec<_>>().join("\t");
    out.push_str(nl);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_invisible_reordering_are_escaped() {
        assert_eq!(clean("a\nb"), "a\\nb");
        assert_eq!(clean("\u{1b}]0;x\u{7}"), "\\u{1b}]0;x\\u{7}");
        assert_eq!(clean("x\u{202e}y\u{200b}z"), "x\\u{202e}y\\u{200b}z");
        assert_eq!(clean("naïve ✓"), "naïve ✓");
        assert_eq!(clean_output(b"a\tb\x1b[2J\n"), "a\tb\\u{1b}[2J\n");
        assert_eq!(clean_output(b"\xff\n"), "\u{fffd}\n");
    }
}
