//! The man pages as packaged (`cwreap generate`, what `make install` and the .deb install):
//! they render with groff without a warning and without Markdown left in them, and
//! cwreap(8) names every metric the daemon serves and every JSON field `scan` prints.

use std::collections::BTreeSet;
use std::process::Command;

use crate::support::*;

fn generated(test: &str) -> (Scratch, String, String) {
    let dir = Scratch::new(test, 0o755);
    let out = cwreap(&[
        "generate",
        "--out-dir",
        &dir.path("assets").to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let read = |name: &str| {
        std::fs::read_to_string(dir.path("assets").join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let (eight, five) = (read("cwreap.8"), read("cwreap.yaml.5"));
    (dir, eight, five)
}

#[test]
fn the_man_pages_render_without_warnings_or_markdown() {
    let (dir, _, _) = generated("manual-groff");
    if Command::new("groff").arg("--version").output().is_err() {
        skip_or_fail(
            "the_man_pages_render_without_warnings_or_markdown",
            "groff is not installed (apt-get install groff-base)",
        );
        return;
    }
    for name in ["cwreap.8", "cwreap.yaml.5"] {
        let path = dir.path("assets").join(name);
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-P-c"])
            .arg(&path)
            .output()
            .expect("groff");
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            warnings.trim().is_empty(),
            "{name}: groff warns:\n{warnings}"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.lines().count() > 100, "{name} rendered: {text}");
        for artefact in ["`", "**", "\\fB", "\\fR", "](#"] {
            let line = text.lines().find(|l| l.contains(artefact));
            assert!(line.is_none(), "{name} shows {artefact:?}: {line:?}");
        }
    }
}

#[test]
fn cwreap_8_names_every_metric_and_every_scan_json_field() {
    let (_dir, page, _) = generated("manual-metrics");
    // Every metric the daemon registers: the names in its registry's source (a family with
    // no sample yet is not rendered), checked against what it renders.
    let source = std::fs::read_to_string(repo().join("src/daemon/metrics.rs")).expect("metrics.rs");
    let metrics: BTreeSet<&str> = source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|l| {
            l.starts_with("cwreap_") && l.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .collect();
    assert!(metrics.len() > 15, "{metrics:?}");
    let rendered = cwreap::daemon::metrics::Metrics::new().render();
    for family in rendered.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split_whitespace().next().unwrap_or_default();
        assert!(
            metrics.contains(name),
            "{name} is rendered but not found in the source"
        );
    }
    let missing: Vec<&&str> = metrics.iter().filter(|m| !page.contains(**m)).collect();
    assert!(
        missing.is_empty(),
        "cwreap(8) lacks the metrics {missing:?}"
    );

    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let _client = fx.close_wait(0);
    let objects = cwreap_json(&["scan", "--json", "--pid", &fx.pid().to_string()]);
    let fields: BTreeSet<String> = objects
        .iter()
        .filter_map(|o| o.as_object())
        .flat_map(|o| o.keys().cloned())
        .collect();
    assert!(fields.len() > 15, "{objects:?}");
    let json = page
        .split("\n.SH \"JSON OUTPUT\"\n")
        .nth(1)
        .and_then(|s| s.split("\n.SH ").next())
        .expect("a JSON OUTPUT section");
    let missing: Vec<&String> = fields
        .iter()
        .filter(|f| !json.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "cwreap(8) JSON OUTPUT lacks {missing:?}"
    );
}
