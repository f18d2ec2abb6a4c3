//! The fleet as a page (`GET /` on the operations listener) and as the table of
//! `cis490-receiver fleet`: the same rows, worst first. The page is one self-contained HTML
//! document (inline style, no script, no external asset) that reloads itself; every value
//! from a host is escaped, since host ids, versions and commits are whatever a host sent.

use std::fmt::Write as _;

use super::{FleetView, HostState, HostView};

/// Seconds between the page's reloads.
const REFRESH_S: u32 = 15;

/// Text safe inside HTML element content and attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

fn colour(state: HostState) -> (&'static str, &'static str) {
    // (row background, state cell) per state.
    match state {
        HostState::Stale => ("#fde2e1", "#b42318"),
        HostState::Rejecting => ("#feefc7", "#b54708"),
        HostState::Silent => ("#f2f4f7", "#475467"),
        HostState::Unknown => ("#f9fafb", "#667085"),
        HostState::Ok => ("#ecfdf3", "#067647"),
    }
}

/// The columns both the page and the command show, one string per host.
struct Row {
    pub state: HostState,
    pub cells: [String; 8],
}

pub(crate) const HEADERS: [&str; 8] = [
    "host",
    "state",
    "last seen",
    "shipper",
    "host commit",
    "stored",
    "last rejection",
    "cert expires",
];

fn short(commit: &str) -> String {
    commit.chars().take(12).collect()
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn rows(hosts: &[HostView]) -> Vec<Row> {
    hosts.iter().map(row).collect()
}

fn row(h: &HostView) -> Row {
    let commit = match (&h.host_commit, h.host_commit_valid, h.host_commit_in_window) {
        (None, _, _) => "-".to_string(),
        (Some(c), Some(false), _) => format!("{c} (malformed)"),
        (Some(c), _, Some(true)) => format!("{} (in window)", short(c)),
        (Some(c), _, Some(false)) => format!("{} (OUTSIDE window)", short(c)),
        (Some(c), _, None) => short(c),
    };
    let stored = match &h.last_stored {
        None => format!(
            "{} episodes, {}",
            h.stored_episodes,
            human_bytes(h.stored_bytes)
        ),
        Some(l) => format!(
            "{} episodes, {}; last {} at {}",
            h.stored_episodes,
            human_bytes(h.stored_bytes),
            l.episode_id,
            l.ts
        ),
    };
    let rejection = match &h.last_rejection {
        None => "-".to_string(),
        Some(r) => {
            let total: u64 = h.rejections.values().sum();
            format!(
                "{} {} ({}) at {}; {total} since start",
                r.status, r.error, r.episode_id, r.ts
            )
        }
    };
    Row {
        state: h.state,
        cells: [
            h.host_id.clone(),
            h.state.as_str().to_string(),
            h.last_seen.clone().unwrap_or_else(|| "-".into()),
            h.shipper_version.clone().unwrap_or_else(|| "-".into()),
            commit,
            stored,
            rejection,
            h.cert_not_after.clone().unwrap_or_else(|| "-".into()),
        ],
    }
}

/// The whole page.
pub(crate) fn html(view: &FleetView) -> String {
    let mut out = String::with_capacity(4096 + view.hosts.len() * 512);
    let not_ok = view
        .hosts
        .iter()
        .filter(|h| h.state != HostState::Ok)
        .count();
    let gate = &view.window;
    let gate_line = format!(
        "gate: {} source {}, head {}, {} of {} commits, list age {}",
        if gate.enabled { "on," } else { "OFF," },
        gate.source.unwrap_or("none"),
        gate.head_commit.as_deref().map_or("-".into(), short),
        gate.commits,
        gate.window,
        gate.age_s.map_or("-".into(), |a| format!("{a} s")),
    );
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\
<title>cis490 fleet: {not_ok} of {total} hosts need attention</title>\
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;color:#101828}}\
table{{border-collapse:collapse;width:100%}}th,td{{padding:.35em .6em;text-align:left;\
border-bottom:1px solid #d0d5dd;font-size:.9em;vertical-align:top}}th{{background:#f2f4f7}}\
td.state{{font-weight:bold;color:#fff}}td:nth-child(-n+4){{white-space:nowrap}}p.meta{{color:#475467}}</style></head><body>\n\
<h1>cis490 fleet</h1>\n<p class=\"meta\">{gate}<br>generated {gen}; {not_ok} of {total} hosts \
not ok; reloads every {REFRESH_S} s</p>\n<table>\n<thead><tr>",
        total = view.hosts.len(),
        gate = escape(&gate_line),
        gen = escape(&view.generated_at),
    );
    for h in HEADERS {
        let _ = write!(out, "<th>{h}</th>");
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for r in rows(&view.hosts) {
        let (bg, fg) = colour(r.state);
        let _ = write!(
            out,
            "<tr class=\"{}\" style=\"background:{bg}\">",
            r.state.as_str()
        );
        for (i, cell) in r.cells.iter().enumerate() {
            if i == 1 {
                let _ = write!(
                    out,
                    "<td class=\"state\" style=\"background:{fg}\">{}</td>",
                    escape(cell)
                );
            } else {
                let _ = write!(out, "<td>{}</td>", escape(cell));
            }
        }
        out.push_str("</tr>\n");
    }
    if view.hosts.is_empty() {
        out.push_str("<tr><td colspan=\"8\">no host has connected yet</td></tr>\n");
    }
    out.push_str("</tbody></table>\n</body></html>\n");
    out
}

/// The table `cis490-receiver fleet` prints; `colour` adds ANSI colours to the state column.
pub(crate) fn text(hosts: &[HostView], generated_at: &str, colour: bool) -> String {
    let rows = rows(hosts);
    let mut widths = HEADERS.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(&r.cells) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String], state: Option<HostState>| {
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            let pad = w.saturating_sub(c.chars().count());
            let painted = match (i, state, colour) {
                (1, Some(s), true) => {
                    let code = match s {
                        HostState::Stale => "1;31",
                        HostState::Rejecting => "1;33",
                        HostState::Silent | HostState::Unknown => "2",
                        HostState::Ok => "32",
                    };
                    format!("\x1b[{code}m{c}\x1b[0m")
                }
                _ => c.clone(),
            };
            out.push_str(&painted);
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    };
    line(&mut out, &HEADERS.map(str::to_uppercase), None);
    for r in &rows {
        // A host id is printed as sent: strip control characters so it cannot move the cursor.
        let clean: Vec<String> = r
            .cells
            .iter()
            .map(|c| c.chars().filter(|ch| !ch.is_control()).collect())
            .collect();
        line(&mut out, &clean, Some(r.state));
    }
    let not_ok = rows.iter().filter(|r| r.state != HostState::Ok).count();
    let _ = writeln!(
        out,
        "{} hosts, {not_ok} not ok (generated {generated_at})",
        rows.len(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_shown_as_text() {
        assert_eq!(
            escape("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(escape("a\u{7}b"), "a\u{FFFD}b");
    }

    #[test]
    fn sizes_read_as_people_say_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
