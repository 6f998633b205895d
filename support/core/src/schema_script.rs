//! pg_dump's plain-text schema scripts, cut into their table-of-contents entries.
//!
//! The receiver applies pre-data in batches of entries (one transaction per batch) instead of
//! one giant transaction, because a transaction that creates ten thousand tables needs ten
//! thousand locks and overflows a default lock table. Post-data is split in two waves: indexes
//! and key constraints (independent of each other, built in parallel), then everything that
//! depends on them (foreign keys, index attachments, triggers, policies), in dump order.

/// One TOC entry of a plain-text dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// pg_dump's `Type:` (TABLE, INDEX, FK CONSTRAINT, ...).
    pub kind: String,
    pub name: String,
    pub schema: String,
    pub sql: String,
    /// pg_dump's `Tablespace:`, for an object stored in one other than the database's default.
    /// pg_dump sets `default_tablespace` only when it changes, in a line before the entry (so
    /// it lands at the end of the entry before): an entry applied out of order, on another
    /// session, sets it itself ([`Entry::sql_in_its_tablespace`]).
    pub tablespace: Option<String>,
}

impl Entry {
    /// The entry's SQL, after setting `default_tablespace` to its own (or the default): what
    /// to run for an index or key applied apart from the entries printed before it.
    pub fn sql_in_its_tablespace(&self) -> String {
        format!(
            "SET default_tablespace = {};\n{}",
            crate::ident::quote_literal(self.tablespace.as_deref().unwrap_or("")),
            self.sql
        )
    }
}

/// A dump split into its session preamble (SET lines run once per connection), the statements
/// that would drop what it creates (`pg_dump --clean --if-exists` puts them, in reverse
/// dependency order, between the preamble and the first entry), and its entries.
#[derive(Debug, Clone, Default)]
pub struct Script {
    pub preamble: String,
    /// One `DROP ... IF EXISTS` (or `ALTER TABLE IF EXISTS ... DROP ...`) per line, in the
    /// order they must run; empty for a dump made without `--clean`.
    pub drops: Vec<String>,
    pub entries: Vec<Entry>,
}

impl Script {
    /// The script without the entries of publication `name`: a --follow job's own
    /// publication exists on the source when pg_dump runs, and must not be made on the target.
    pub fn without_publication(mut self, name: &str) -> Script {
        let prefix = format!("{name} ");
        self.entries.retain(|e| match e.kind.as_str() {
            "PUBLICATION" => e.name != name,
            k if k.starts_with("PUBLICATION ") => !e.name.starts_with(&prefix),
            _ => true,
        });
        self
    }

    pub fn parse(text: &str) -> Script {
        let mut script = Script::default();
        let mut current: Option<Entry> = None;
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            // pg_dump >= 15.14 brackets plain scripts with psql-only \restrict meta-commands.
            if line.starts_with("\\restrict ") || line.starts_with("\\unrestrict ") {
                i += 1;
                continue;
            }
            if line == "--" {
                if let Some(header) = lines.get(i + 1).and_then(|l| parse_header(l)) {
                    if let Some(e) = current.take() {
                        script.entries.push(e);
                    }
                    current = Some(header);
                    i += 3; // "--", "-- Name: ...", "--"
                    continue;
                }
            }
            match &mut current {
                Some(e) => {
                    e.sql.push_str(line);
                    e.sql.push('\n');
                }
                None => {
                    if line.starts_with("DROP ") || line.starts_with("ALTER ") {
                        script.drops.push(line.to_string());
                    } else if !line.starts_with("--") && !line.trim().is_empty() {
                        script.preamble.push_str(line);
                        script.preamble.push('\n');
                    }
                }
            }
            i += 1;
        }
        if let Some(e) = current.take() {
            script.entries.push(e);
        }
        for e in &mut script.entries {
            let trimmed = trim_comments(&e.sql);
            e.sql = trimmed;
        }
        script.entries.retain(|e| !e.sql.trim().is_empty());
        script
    }

    /// Post-data wave 1: entries with no dependency on other post-data entries.
    pub fn is_independent_post(e: &Entry) -> bool {
        matches!(e.kind.as_str(), "INDEX" | "CONSTRAINT")
    }

    /// The one table (schema, name) a post-data entry is built on, when it needs nothing but
    /// that table's rows: an index, or a key, unique, exclusion or check constraint, on a
    /// table with rows of its own. Such an entry can be applied as soon as the table is
    /// loaded, while the rest of the job still copies. `None` for anything else: an index on a
    /// partitioned table (`ON ONLY` its parent, attached at the end), foreign keys, triggers,
    /// rules, attachments. (A partitioned parent's key, `ALTER TABLE ONLY parent`, is mapped
    /// to the parent, which is never loaded: only tables with rows of their own are copied.)
    pub fn post_entry_table(e: &Entry) -> Option<(String, String)> {
        let sql = e.sql.trim_start();
        let rest = match e.kind.as_str() {
            "INDEX" => {
                let mut words = Words(sql);
                if !words.keyword("CREATE") {
                    return None;
                }
                words.keyword("UNIQUE");
                if !words.keyword("INDEX") {
                    return None;
                }
                words.name()?;
                if !words.keyword("ON") || words.keyword("ONLY") {
                    return None;
                }
                words
            }
            "CONSTRAINT" => {
                let mut words = Words(sql);
                if !(words.keyword("ALTER") && words.keyword("TABLE") && words.keyword("ONLY")) {
                    return None;
                }
                let mut after = Words(words.0);
                after.name()?;
                if after.keyword(".") {
                    after.name()?;
                }
                if !(after.keyword("ADD") && after.keyword("CONSTRAINT")) {
                    return None;
                }
                words
            }
            _ => return None,
        };
        let mut words = rest;
        let first = words.name()?;
        if words.keyword(".") {
            let second = words.name()?;
            Some((first, second))
        } else {
            None
        }
    }
}

/// A cursor over SQL as pg_dump writes it: keywords and (maybe quoted) identifiers.
struct Words<'a>(&'a str);

impl Words<'_> {
    /// Consume `word` (a keyword, case-insensitively, or the `.` of a qualified name) if it
    /// comes next.
    fn keyword(&mut self, word: &str) -> bool {
        let s = self.0.trim_start();
        if word == "." {
            if let Some(rest) = s.strip_prefix('.') {
                self.0 = rest;
                return true;
            }
            return false;
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        if end > 0 && s[..end].eq_ignore_ascii_case(word) {
            self.0 = &s[end..];
            true
        } else {
            false
        }
    }

    /// Consume an identifier: `"..."` (with `""` for a quote) or a bare word, as written.
    fn name(&mut self) -> Option<String> {
        let s = self.0.trim_start();
        if let Some(quoted) = s.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if matches!(chars.peek(), Some((_, '"'))) {
                        chars.next();
                        out.push('"');
                    } else {
                        self.0 = &quoted[i + 1..];
                        return Some(out);
                    }
                } else {
                    out.push(c);
                }
            }
            None
        } else {
            let end = s
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
                .unwrap_or(s.len());
            if end == 0 {
                return None;
            }
            self.0 = &s[end..];
            Some(s[..end].to_string())
        }
    }
}

fn parse_header(line: &str) -> Option<Entry> {
    let rest = line.strip_prefix("-- Name: ")?;
    let (name, rest) = rest.split_once("; Type: ")?;
    let (kind, rest) = rest.split_once("; Schema: ")?;
    let schema = rest.split_once("; Owner:").map_or(rest, |(s, _)| s);
    let tablespace = rest
        .split_once("; Tablespace: ")
        .map(|(_, t)| t.trim().to_string())
        .filter(|t| !t.is_empty());
    Some(Entry {
        kind: kind.to_string(),
        name: name.to_string(),
        schema: schema.to_string(),
        sql: String::new(),
        tablespace,
    })
}

/// Drop trailing comment-only and blank lines of an entry.
fn trim_comments(sql: &str) -> String {
    let mut lines: Vec<&str> = sql.lines().collect();
    while let Some(last) = lines.last() {
        if last.trim().is_empty()
            || last.trim() == "--"
            || last.starts_with("-- PostgreSQL database dump complete")
        {
            lines.pop();
        } else {
            break;
        }
    }
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_applied_apart_sets_its_own_tablespace() {
        // pg_dump sets default_tablespace before an entry's header, only when it changes: the
        // line ends up in the entry printed before.
        let text =
            "--\n-- Name: a_x; Type: INDEX; Schema: public; Owner: u; Tablespace: fast\n--\n\n\
CREATE INDEX a_x ON public.a USING btree (x);\n\n\
SET default_tablespace = '';\n\n\
--\n-- Name: b_y; Type: INDEX; Schema: public; Owner: u\n--\n\n\
CREATE INDEX b_y ON public.b USING btree (y);\n";
        let s = Script::parse(text);
        assert_eq!(s.entries.len(), 2, "{s:?}");
        assert_eq!(s.entries[0].tablespace.as_deref(), Some("fast"));
        assert_eq!(s.entries[1].tablespace, None);
        let first = s.entries[0].sql_in_its_tablespace();
        assert!(
            first.starts_with("SET default_tablespace = 'fast';\n")
                && first.contains("CREATE INDEX a_x"),
            "{first}"
        );
        let second = s.entries[1].sql_in_its_tablespace();
        assert!(
            second.starts_with("SET default_tablespace = '';\n")
                && second.contains("CREATE INDEX b_y"),
            "{second}"
        );
    }

    #[test]
    fn a_post_data_entry_names_the_one_table_it_is_built_on() {
        let e = |kind: &str, sql: &str| Entry {
            kind: kind.into(),
            name: "x".into(),
            schema: "public".into(),
            sql: sql.into(),
            tablespace: None,
        };
        for (kind, sql, schema, table) in [
            (
                "INDEX",
                "CREATE INDEX t1_name ON public.t1 USING btree (name);",
                "public",
                "t1",
            ),
            (
                "INDEX",
                "CREATE UNIQUE INDEX \"Odd \"\"ix\"\"\" ON \"My Schema\".\"Mixed \"\"T\"\"\" USING btree (a);",
                "My Schema",
                "Mixed \"T\"",
            ),
            (
                "CONSTRAINT",
                "ALTER TABLE ONLY public.readings\n    ADD CONSTRAINT readings_pkey PRIMARY KEY (id);",
                "public",
                "readings",
            ),
            (
                "CONSTRAINT",
                "ALTER TABLE ONLY \"s\".\"t\"\n    ADD CONSTRAINT u EXCLUDE USING gist (r WITH &&);",
                "s",
                "t",
            ),
        ] {
            assert_eq!(
                Script::post_entry_table(&e(kind, sql)),
                Some((schema.to_string(), table.to_string())),
                "{sql}"
            );
        }
        // On a partitioned table: attached at the end, with its partitions' indexes.
        assert_eq!(
            Script::post_entry_table(&e(
                "INDEX",
                "CREATE INDEX p_at ON ONLY public.p USING btree (at);"
            )),
            None
        );
        // Anything that needs more than one table's rows, or acts on writes.
        for (kind, sql) in [
            (
                "FK CONSTRAINT",
                "ALTER TABLE ONLY public.a\n    ADD CONSTRAINT a_b FOREIGN KEY (b) REFERENCES public.b(id);",
            ),
            (
                "TRIGGER",
                "CREATE TRIGGER tr BEFORE INSERT ON public.a FOR EACH ROW EXECUTE FUNCTION f();",
            ),
            ("INDEX ATTACH", "ALTER INDEX public.p_at ATTACH PARTITION public.p1_at;"),
            ("CONSTRAINT", "ALTER TABLE public.a CLUSTER ON a_pkey;"),
            ("INDEX", "CREATE INDEX broken ON"),
        ] {
            assert_eq!(Script::post_entry_table(&e(kind, sql)), None, "{sql}");
        }
    }

    #[test]
    fn a_follow_jobs_own_publication_is_left_out() {
        let text = "--\n-- Name: haul_j1; Type: PUBLICATION; Schema: -; Owner: u\n--\n\nCREATE PUBLICATION haul_j1 WITH (publish = 'insert');\n\n\
--\n-- Name: haul_j1 docs; Type: PUBLICATION TABLE; Schema: public; Owner: -\n--\n\nALTER PUBLICATION haul_j1 ADD TABLE ONLY public.docs;\n\n\
--\n-- Name: mine; Type: PUBLICATION; Schema: -; Owner: u\n--\n\nCREATE PUBLICATION mine;\n\n\
--\n-- Name: mine docs; Type: PUBLICATION TABLE; Schema: public; Owner: -\n--\n\nALTER PUBLICATION mine ADD TABLE ONLY public.docs;\n";
        let s = Script::parse(text);
        assert_eq!(s.entries.len(), 4, "{s:?}");
        let kept: Vec<String> = s
            .without_publication("haul_j1")
            .entries
            .iter()
            .map(|e| e.name.clone())
            .collect();
        assert_eq!(kept, ["mine", "mine docs"]);
    }

    const DUMP: &str = "--\n-- PostgreSQL database dump\n--\n\n\\restrict abc123\n\
SET statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\n\n\
--\n-- Name: Sales; Type: SCHEMA; Schema: -; Owner: -\n--\n\nCREATE SCHEMA \"Sales\";\n\n\n\
--\n-- Name: f(); Type: FUNCTION; Schema: public; Owner: -\n--\n\n\
CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS $$\n--\nselect 1;\n$$;\n\n\n\
--\n-- Name: t t_pkey; Type: CONSTRAINT; Schema: public; Owner: -\n--\n\n\
ALTER TABLE ONLY public.t\n    ADD CONSTRAINT t_pkey PRIMARY KEY (id);\n\n\n\
--\n-- Name: t t_fk; Type: FK CONSTRAINT; Schema: public; Owner: -\n--\n\n\
ALTER TABLE ONLY public.t ADD CONSTRAINT t_fk FOREIGN KEY (x) REFERENCES public.u(id);\n\n\n\
--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc123\n";

    #[test]
    fn splits_entries_and_keeps_bodies() {
        let s = Script::parse(DUMP);
        assert_eq!(
            s.preamble,
            "SET statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\n"
        );
        let kinds: Vec<_> = s.entries.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["SCHEMA", "FUNCTION", "CONSTRAINT", "FK CONSTRAINT"]);
        assert_eq!(s.entries[0].name, "Sales");
        // A "--" line inside a function body is not mistaken for a header.
        assert!(s.entries[1].sql.contains("--\nselect 1;"));
        assert!(!s.entries[3].sql.contains("dump complete"));
        assert!(!s.entries[3].sql.contains("unrestrict"));
        assert!(Script::is_independent_post(&s.entries[2]));
        assert!(!Script::is_independent_post(&s.entries[3]));
    }

    #[test]
    fn the_drops_of_a_clean_dump_are_kept_apart_from_the_preamble() {
        let clean =
            "--\n-- PostgreSQL database dump\n--\n\n\\restrict abc\nSET lock_timeout = 0;\n\
ALTER TABLE IF EXISTS public.c ALTER COLUMN id DROP DEFAULT;\nDROP TABLE IF EXISTS public.c;\n\
DROP SCHEMA IF EXISTS s;\n\
--\n-- Name: s; Type: SCHEMA; Schema: -; Owner: -\n--\n\nCREATE SCHEMA s;\n\n\
--\n-- Name: c; Type: TABLE; Schema: public; Owner: -\n--\n\nCREATE TABLE public.c (id int);\n\
ALTER TABLE public.c OWNER TO u;\n";
        let s = Script::parse(clean);
        assert_eq!(s.preamble, "SET lock_timeout = 0;\n");
        assert_eq!(
            s.drops,
            [
                "ALTER TABLE IF EXISTS public.c ALTER COLUMN id DROP DEFAULT;",
                "DROP TABLE IF EXISTS public.c;",
                "DROP SCHEMA IF EXISTS s;"
            ]
        );
        assert_eq!(s.entries.len(), 2);
        // An ALTER inside an entry stays in it.
        assert!(s.entries[1].sql.contains("OWNER TO u"));
        assert!(Script::parse(DUMP).drops.is_empty());
    }
}
