//! Merge fields (spool v2): a personalised job's message is a minijinja
//! template (the engine KumoMTA uses), rendered per recipient on the shard,
//! in headers and body alike. A variable that is not given is an error, not
//! an empty string: a newsletter that says "Dear ," is worse than one held
//! back. Nothing is escaped (a message is not HTML as a whole).
//!
//! The variables, later ones over earlier ones: `rcpt`, `rcpt_local`,
//! `rcpt_domain`, `from`, `from_local`, `from_domain` and `id` (the
//! job's); the job's `vars`; the recipient's `vars`.

use minijinja::{Environment, UndefinedBehavior};

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
            .expect("the default delimiters"),
    );
    env
}

/// Whether `source` compiles as a template; the error says where and why.
pub fn check(source: &str) -> Result<(), String> {
    environment().template_from_str(source).map(|_| ()).map_err(describe)
}

/// What a recipient's copy is rendered with.
pub struct Context<'a> {
    pub rcpt: &'a str,
    pub from: &'a str,
    pub id: &'a str,
    /// JSON object texts: the job's and the recipient's variables.
    pub job_vars: Option<&'a str>,
    pub rcpt_vars: Option<&'a str>,
}

/// A template compiled once (per message file per shard), rendered for
/// each recipient.
pub struct Compiled {
    env: Environment<'static>,
}

impl Compiled {
    pub fn new(source: &str) -> Result<Compiled, String> {
        let mut env = environment();
        env.add_template_owned("message", source.to_string())
            .map_err(describe)?;
        Ok(Compiled { env })
    }

    pub fn render(&self, ctx: &Context<'_>) -> Result<String, String> {
        let t = self.env.get_template("message").map_err(describe)?;
        t.render(minijinja::Value::from(minijinja::value::Serde(variables(ctx)?)))
            .map_err(describe)
    }
}

/// Renders `source` for one recipient (compiling it first).
pub fn render(source: &str, ctx: &Context<'_>) -> Result<String, String> {
    environment()
        .render_str(source, minijinja::Value::from(minijinja::value::Serde(variables(ctx)?)))
        .map_err(describe)
}

/// The variables of one recipient's copy.
fn variables(ctx: &Context<'_>) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let mut vars = serde_json::Map::new();
    let (local, domain) = ctx.rcpt.rsplit_once('@').unwrap_or((ctx.rcpt, ""));
    let (from_local, from_domain) = ctx.from.rsplit_once('@').unwrap_or((ctx.from, ""));
    for (k, v) in [
        ("rcpt", ctx.rcpt),
        ("rcpt_local", local),
        ("rcpt_domain", domain),
        ("from", ctx.from),
        ("from_local", from_local),
        ("from_domain", from_domain),
        ("id", ctx.id),
    ] {
        vars.insert(k.to_string(), serde_json::Value::String(v.to_string()));
    }
    for (what, text) in [("vars", ctx.job_vars), ("the recipient's vars", ctx.rcpt_vars)] {
        if let Some(text) = text {
            let object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(text).map_err(|e| format!("{what}: {e}"))?;
            vars.extend(object);
        }
    }
    Ok(vars)
}

fn describe(e: minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        s = format!("{s} (line {line} of the message)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(job: Option<&'a str>, rcpt: Option<&'a str>) -> Context<'a> {
        Context {
            rcpt: "ann@example.org",
            from: "news@x.test",
            id: "n1",
            job_vars: job,
            rcpt_vars: rcpt,
        }
    }

    #[test]
    fn the_recipient_s_vars_come_over_the_job_s_over_the_built_ins() {
        let src = "Subject: Hi {{ name }}\r\n\r\n{{ greeting }} {{ name }} <{{ rcpt_local }} at {{ rcpt_domain }}>, {{ id }} from {{ from_local }} at {{ from_domain }}\r\n";
        let got = render(
            src,
            &ctx(
                Some(r#"{"greeting": "Hello", "name": "all"}"#),
                Some(r#"{"name": "Ann"}"#),
            ),
        )
        .unwrap();
        assert_eq!(
            got,
            "Subject: Hi Ann\r\n\r\nHello Ann <ann at example.org>, n1 from news at x.test\r\n"
        );
    }

    #[test]
    fn a_missing_variable_and_bad_syntax_are_errors_that_say_where() {
        let e = render("Subject: x\r\n\r\nDear {{ name }},\r\n", &ctx(None, None)).unwrap_err();
        assert!(e.contains("undefined") && e.contains("line 3"), "{e}");
        let e = check("Subject: x\r\n\r\n{% if %}\r\n").unwrap_err();
        assert!(e.contains("syntax error") && e.contains("line 3"), "{e}");
        assert!(check("plain text, no fields\n").is_ok());
    }
}
