//! Chat templates: how an instruction-tuned checkpoint wants a question wrapped.
//!
//! HF checkpoints carry a Jinja template in `tokenizer_config.json` (`chat_template`, a
//! string or a list of named templates) or in `chat_template.jinja`. When the model
//! directory has one, a question is rendered as one user message with the generation
//! prompt, so the model sees the turn markers it was tuned on. The document itself came
//! before, through the gist state, and already began with BOS, so a BOS the template
//! writes first is dropped.

use anyhow::{bail, Context};
use serde_json::Value;
use std::path::Path;

/// A model's chat template and the special-token strings it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template of the model in `dir`, if it has one.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read(&config_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", config_path.display()))?,
            Err(_) => Value::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            Some(
                std::fs::read_to_string(&jinja)
                    .with_context(|| format!("reading {}", jinja.display()))?,
            )
        } else {
            match &config["chat_template"] {
                Value::String(s) => Some(s.clone()),
                // A list of named templates: the one named "default".
                Value::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let t = Self::new(
            source,
            token_string(&config["bos_token"]),
            token_string(&config["eos_token"]),
        )
        .with_context(|| format!("the chat template of {}", dir.display()))?;
        Ok(Some(t))
    }

    /// A template from its source and the BOS/EOS strings it may refer to; checked by
    /// rendering a question (a broken template fails at load, not at the first question).
    pub fn new(source: String, bos_token: String, eos_token: String) -> anyhow::Result<Self> {
        let t = Self {
            source,
            bos_token,
            eos_token,
        };
        t.render_question("test")?;
        Ok(t)
    }

    /// One user message with the generation prompt, rendered.
    fn render(&self, content: &str) -> anyhow::Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, _> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        });
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_template("chat", &self.source)?;
        let ctx = serde_json::json!({
            "messages": [{"role": "user", "content": content}],
            "add_generation_prompt": true,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        });
        Ok(env
            .get_template("chat")?
            .render(minijinja::Value::from(minijinja::value::Serde(&ctx)))?)
    }

    /// The text of `question` as one user turn followed by the assistant prompt.
    pub fn render_question(&self, question: &str) -> anyhow::Result<String> {
        let text = self.render(question)?;
        if text.trim().is_empty() {
            bail!("the chat template renders nothing");
        }
        // A template that writes `bos_token` itself (Llama's) starts with the BOS the
        // document already has; one that spells its turns' markers out (SmolLM2's
        // `<|im_start|>`, which is also its BOS) keeps them.
        let writes_bos = self.source.contains("bos_token");
        Ok(match text.strip_prefix(&self.bos_token) {
            Some(rest) if writes_bos && !self.bos_token.is_empty() => rest.to_string(),
            _ => text,
        })
    }

    /// One user turn split around its content: (the text before the content, the text
    /// after it through the assistant prompt). A document placed between the two sits
    /// *inside* the user turn, where an instruction-tuned model reads what it is asked
    /// about (SmolLM2 ignores a document that comes before the chat's turns). `before`
    /// keeps the template's leading BOS or turn marker; the caller drops it where the
    /// document already begins with BOS.
    pub fn render_turn(&self) -> anyhow::Result<(String, String)> {
        const CONTENT: &str = "\u{1}GISTSTREAM-CONTENT\u{1}";
        let text = self.render(CONTENT)?;
        let Some((before, after)) = text.split_once(CONTENT) else {
            bail!("the chat template does not write the user's message as given");
        };
        Ok((before.to_string(), after.to_string()))
    }

    /// The BOS string the template refers to.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }
}

/// A special token as tokenizer_config.json writes it: a string, or an object with
/// `content`.
fn token_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

/// Today's date (UTC) in the strftime codes chat templates use (%d %m %Y %y %b %B %H %M).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs, fmt)
}

fn format_utc(secs: u64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let (hh, mm) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate {
            source: source.to_string(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        }
    }

    #[test]
    fn renders_a_user_turn_and_the_generation_prompt_without_bos() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
        );
        assert_eq!(
            t.render_question("  Who? ").unwrap(),
            "<|user|>Who?</s><|assistant|>"
        );
    }

    #[test]
    fn a_turn_splits_around_its_content() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        )
        .unwrap();
        let (before, after) = t.render_turn().unwrap();
        assert_eq!(before, "<|im_start|>user\n");
        assert_eq!(after, "<|im_end|>\n<|im_start|>assistant\n");
        // A template that trims or rewrites the message cannot be split.
        let trims = template("{% for m in messages %}{{ m['content'] | lower }}{% endfor %}");
        assert!(trims.render_turn().is_err());
    }

    #[test]
    fn a_template_that_spells_out_its_markers_keeps_them_when_they_are_bos() {
        // SmolLM2: BOS is `<|im_start|>`, which the template writes as a turn marker.
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        )
        .unwrap();
        assert_eq!(
            t.render_question("Who?").unwrap(),
            "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_helpers_work() {
        // Llama-3-style templates call .strip() and strftime_now.
        let t = template(
            "{% set d = strftime_now('%d %b %Y') %}{% for m in messages %}{{ m.content.strip() }}{% endfor %}[{{ d | length }}]",
        );
        assert_eq!(t.render_question(" hi ").unwrap(), "hi[11]");
        let t = template("{{ raise_exception('no system role') }}");
        assert!(t.render_question("x").is_err());
    }

    #[test]
    fn dates_format_like_strftime() {
        // 2024-02-29 13:05 UTC.
        assert_eq!(
            format_utc(1_709_211_900, "%d %b %Y / %Y-%m-%d %H:%M / %B %y"),
            "29 Feb 2024 / 2024-02-29 13:05 / February 24"
        );
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }

    #[test]
    fn templates_are_found_in_tokenizer_config_or_their_own_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_dir(dir.path()).unwrap().is_none());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>"}, "chat_template": [{"name": "default", "template": "{{ bos_token }}Q: {{ messages[0].content }}\nA:"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.render_question("why").unwrap(), "Q: why\nA:");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
        let e = format!("{:#}", ChatTemplate::from_dir(dir.path()).unwrap_err());
        assert!(e.contains("chat template"), "{e}");
    }
}
