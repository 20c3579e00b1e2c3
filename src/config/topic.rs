//! Topic names: the `outbox.topic` template and the rule a topic name follows.
//! A leaf: it depends on nothing else in the crate.

/// One piece of a parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    Column(String),
}

/// Parses `outbox.event.{aggregate_type}` into literal and column parts.
pub fn parse_topic_template(t: &str) -> Result<Vec<TemplatePart>, String> {
    let mut parts = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            None => {
                parts.push(TemplatePart::Literal(rest.to_string()));
                break;
            }
            Some(i) if rest.as_bytes()[i] == b'}' => {
                return Err(format!(
                    "unmatched '}}' at byte {} of {t:?}",
                    t.len() - rest.len() + i
                ));
            }
            Some(i) => {
                if i > 0 {
                    parts.push(TemplatePart::Literal(rest[..i].to_string()));
                }
                let after = &rest[i + 1..];
                let end = after
                    .find('}')
                    .ok_or_else(|| format!("unclosed '{{' in {t:?}"))?;
                let col = &after[..end];
                if col.is_empty() || col.contains('{') {
                    return Err(format!("empty or nested column reference in {t:?}"));
                }
                parts.push(TemplatePart::Column(col.to_string()));
                rest = &after[end + 1..];
            }
        }
    }
    if parts.is_empty() {
        return Err("the topic template is empty".into());
    }
    Ok(parts)
}

/// Kafka's topic name rule: 1 to 249 characters of `[a-zA-Z0-9._-]`, not "." or "..".
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}
