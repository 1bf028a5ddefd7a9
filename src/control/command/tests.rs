//! Tests of command parsing and signing.

use super::*;

fn meters() -> HashSet<String> {
    ["m1", "m2"].iter().map(|s| s.to_string()).collect()
}

fn parse_with(payload: &str, key: Option<&[u8]>) -> Result<Request, Rejection> {
    parse_remote(payload, key, None)
}

fn parse_remote(
    payload: &str,
    key: Option<&[u8]>,
    max_config_payload: Option<usize>,
) -> Result<Request, Rejection> {
    let m = meters();
    parse(
        payload.as_bytes(),
        &Rules {
            max_payload: 4096,
            max_config_payload,
            meters: &m,
            key,
            now_s: 1_800_000_000,
            window_s: 300,
            max_backfill: std::time::Duration::from_secs(31 * 86_400),
        },
    )
}

fn reason(payload: &str) -> String {
    parse_with(payload, None).unwrap_err().reason
}

#[test]
fn good_commands_should_parse() {
    let r = parse_with(
        r#"{"request_id":"a","command":"poll","meters":["m1"],"series":["1-0:1.8.0"]}"#,
        None,
    )
    .unwrap();
    assert_eq!(
        r.command,
        Command::Poll {
            meters: Some(vec!["m1".into()]),
            series: Some(vec!["1-0:1.8.0".parse().unwrap()])
        }
    );
    assert_eq!(
        parse_with(r#"{"request_id":"b","command":"poll"}"#, None)
            .unwrap()
            .command,
        Command::Poll {
            meters: None,
            series: None
        }
    );
    assert_eq!(
        parse_with(r#"{"request_id":"c","command":"ping"}"#, None)
            .unwrap()
            .command,
        Command::Ping
    );
    assert_eq!(
        parse_with(r#"{"request_id":"d","command":"inspect"}"#, None)
            .unwrap()
            .command,
        Command::Inspect
    );
    assert_eq!(
        parse_with(
            r#"{"request_id":"e","command":"cancel","target":"a"}"#,
            None
        )
        .unwrap()
        .command,
        Command::Cancel { target: "a".into() }
    );
}

#[test]
fn malformed_commands_should_be_rejected_with_a_reason() {
    let cases = [
        ("not json", "not JSON"),
        ("[1,2]", "expected a JSON object"),
        (r#"{"command":"poll"}"#, "missing field `request_id`"),
        (r#"{"request_id":7,"command":"poll"}"#, "invalid type"),
        (
            r#"{"request_id":"","command":"poll"}"#,
            "request_id must be",
        ),
        (
            r#"{"request_id":"x","command":"reboot"}"#,
            "unknown command `reboot`",
        ),
        (
            r#"{"request_id":"x","command":"poll","meters":["m9"]}"#,
            "unknown meter `m9`",
        ),
        (
            r#"{"request_id":"x","command":"poll","meters":[]}"#,
            "`meters` is empty",
        ),
        (
            r#"{"request_id":"x","command":"poll","meters":"m1"}"#,
            "invalid type",
        ),
        (
            r#"{"request_id":"x","command":"poll","series":["1-0:1.8"]}"#,
            "not an OBIS code",
        ),
        (
            r#"{"request_id":"x","command":"poll","colour":"red"}"#,
            "unknown field `colour`",
        ),
        (
            r#"{"request_id":"x","command":"ping","meters":["m1"]}"#,
            "`meters` does not apply to `ping`",
        ),
        (r#"{"request_id":"x","command":"cancel"}"#, "needs `target`"),
    ];
    for (payload, want) in cases {
        let r = reason(payload);
        assert!(r.contains(want), "{payload}: `{r}` lacks `{want}`");
    }
    // Where the request id could be read, the rejection carries it.
    assert_eq!(
        parse_with(r#"{"request_id":"x","command":"reboot"}"#, None)
            .unwrap_err()
            .request_id
            .as_deref(),
        Some("x")
    );
}

#[test]
fn an_oversized_payload_should_be_rejected_before_parsing() {
    let big = format!(
        r#"{{"request_id":"x","command":"ping","pad":"{}"}}"#,
        "x".repeat(5000)
    );
    assert!(reason(&big).contains("over the limit of 4096 bytes"));
}

#[test]
fn config_commands_should_parse_with_their_bounds() {
    let on = Some(MAX_CONFIG_PAYLOAD);
    let big = "#".repeat(10_000);
    let configure = json_configure(&big, "abc", Some("1m"));
    // Over max_payload: only a configure, and only with remote configuration on.
    assert_eq!(
        parse_remote(&configure, None, on).unwrap().command,
        Command::Configure {
            config: big.clone(),
            base: "abc".into(),
            confirm_within_ms: 60_000
        }
    );
    assert!(
        parse_remote(&configure, None, None)
            .unwrap_err()
            .reason
            .contains("over the limit of 4096")
    );
    // Any other command over max_payload is still refused.
    let many = vec!["m1"; 1000];
    let long_poll = serde_json::json!({"request_id": "x", "command": "poll", "meters": many});
    assert!(
        parse_remote(&long_poll.to_string(), None, on)
            .unwrap_err()
            .reason
            .contains("over the limit of 4096")
    );
    let default = json_configure("x", "abc", None);
    assert!(matches!(
        parse_remote(&default, None, on).unwrap().command,
        Command::Configure {
            confirm_within_ms: 600_000,
            ..
        }
    ));
    for (within, want) in [
        ("1s", "between 5s and 1d"),
        ("2d", "between"),
        ("soon", "not a duration"),
    ] {
        let r = parse_remote(&json_configure("x", "abc", Some(within)), None, on).unwrap_err();
        assert!(r.reason.contains(want), "{within}: {}", r.reason);
    }
    assert!(
        reason(r#"{"request_id":"x","command":"configure","config":"x"}"#)
            .contains("needs `config`")
    );
    assert!(reason(r#"{"request_id":"x","command":"confirm"}"#).contains("needs `target`"));
    assert_eq!(
        parse_with(
            r#"{"request_id":"x","command":"confirm","target":"c1"}"#,
            None
        )
        .unwrap()
        .command,
        Command::Confirm {
            target: "c1".into()
        }
    );
    assert_eq!(
        parse_with(r#"{"request_id":"x","command":"get_config"}"#, None)
            .unwrap()
            .command,
        Command::GetConfig
    );
}

fn json_configure(config: &str, base: &str, within: Option<&str>) -> String {
    let mut v = serde_json::json!({"request_id": "c1", "command": "configure", "config": config, "base": base});
    if let Some(w) = within {
        v["confirm_within"] = w.into();
    }
    v.to_string()
}

#[test]
fn a_signed_configure_should_cover_the_config_base_and_window() {
    let key = b"gateway-secret";
    let ts = 1_800_000_010;
    let sig = sign_configure(key, "c1", ts, "[gateway]", "abc", "1m");
    let mut v = serde_json::json!({"request_id": "c1", "command": "configure",
        "config": "[gateway]", "base": "abc", "confirm_within": "1m", "ts": ts, "sig": sig});
    assert!(parse_with(&v.to_string(), Some(key)).is_ok());
    for (field, other) in [
        ("config", "[gateway]\n"),
        ("base", "abd"),
        ("confirm_within", "2m"),
    ] {
        let mut t = v.clone();
        t[field] = other.into();
        let r = parse_with(&t.to_string(), Some(key)).unwrap_err();
        assert!(r.reason.contains("does not match"), "{field}: {}", r.reason);
    }
    v.as_object_mut().unwrap().remove("sig");
    assert!(
        parse_with(&v.to_string(), Some(key))
            .unwrap_err()
            .reason
            .contains("unsigned")
    );
}

#[test]
fn signed_commands_should_verify_and_everything_else_be_refused() {
    let key = b"gateway-secret";
    let ts = 1_800_000_010;
    let sig = sign(key, "s1", "poll", ts, &["m1"], &[], "");
    let ok = format!(
        r#"{{"request_id":"s1","command":"poll","meters":["m1"],"ts":{ts},"sig":"{sig}"}}"#
    );
    assert!(parse_with(&ok, Some(key)).is_ok());
    let unsigned = r#"{"request_id":"s1","command":"poll","meters":["m1"]}"#;
    assert!(
        parse_with(unsigned, Some(key))
            .unwrap_err()
            .reason
            .contains("unsigned")
    );
    let tampered = ok.replace(r#"["m1"]"#, r#"["m2"]"#);
    assert!(
        parse_with(&tampered, Some(key))
            .unwrap_err()
            .reason
            .contains("does not match")
    );
    let old = format!(
        r#"{{"request_id":"s1","command":"poll","meters":["m1"],"ts":{},"sig":"{}"}}"#,
        ts - 3600,
        sign(key, "s1", "poll", ts - 3600, &["m1"], &[], "")
    );
    assert!(
        parse_with(&old, Some(key))
            .unwrap_err()
            .reason
            .contains("from the gateway's clock")
    );
    assert!(
        parse_with(&ok, Some(b"another key"))
            .unwrap_err()
            .reason
            .contains("does not match")
    );
}

#[test]
fn a_backfill_should_parse_and_bad_ranges_be_rejected_with_the_reason() {
    let ok = parse_with(
        r#"{"request_id": "b1", "command": "backfill", "meters": ["m1"], "profile": "1-0:99.1.0", "from": "2026-11-01T00:00:00+01:00", "to": "2026-11-02T00:00:00+01:00"}"#,
        None,
    )
    .unwrap();
    assert_eq!(
        ok.command,
        Command::Backfill {
            meters: vec!["m1".into()],
            profile: Obis([1, 0, 99, 1, 0, 255]),
            from_ms: "2026-10-31T23:00:00Z"
                .parse::<jiff::Timestamp>()
                .unwrap()
                .as_millisecond(),
            to_ms: "2026-11-01T23:00:00Z"
                .parse::<jiff::Timestamp>()
                .unwrap()
                .as_millisecond(),
        }
    );
    let base = |extra: &str| {
        format!(r#"{{"request_id": "b2", "command": "backfill", "meters": ["m1"], {extra}}}"#)
    };
    for (payload, why) in [
        (base(r#""profile": "1-0:99.1.0", "from": "2026-11-02T00:00:00Z", "to": "2026-11-01T00:00:00Z""#), "`from` must be before `to`"),
        (base(r#""profile": "1-0:99.1.0", "from": "2026-09-01T00:00:00Z", "to": "2026-11-01T00:00:00Z""#), "longer than max_backfill (31d)"),
        (base(r#""profile": "1-0:99.1.0", "from": "yesterday", "to": "2026-11-01T00:00:00Z""#), "`from` is not an RFC 3339 time"),
        (base(r#""profile": "1-0:99.1.0", "to": "2026-11-01T00:00:00Z""#), "needs `from`"),
        (base(r#""profile": "99.1", "from": "2026-10-31T00:00:00Z", "to": "2026-11-01T00:00:00Z""#), "`profile`"),
        (base(r#""from": "2026-10-31T00:00:00Z", "to": "2026-11-01T00:00:00Z""#), "needs `profile`"),
        (r#"{"request_id": "b3", "command": "backfill", "profile": "1-0:99.1.0", "from": "2026-10-31T00:00:00Z", "to": "2026-11-01T00:00:00Z"}"#.to_owned(), "needs `meters`"),
        (r#"{"request_id": "b4", "command": "backfill", "meters": ["nope"], "profile": "1-0:99.1.0", "from": "2026-10-31T00:00:00Z", "to": "2026-11-01T00:00:00Z"}"#.to_owned(), "unknown meter `nope`"),
        (r#"{"request_id": "b5", "command": "poll", "from": "2026-10-31T00:00:00Z"}"#.to_owned(), "`from` does not apply to `poll`"),
    ] {
        let got = reason(&payload);
        assert!(got.contains(why), "{payload}: {got}");
    }
}

#[test]
fn a_signed_backfill_should_cover_its_profile_and_range() {
    let key = b"k";
    let sig = sign_backfill(
        key,
        "b1",
        1_800_000_000,
        &["m1"],
        "1-0:99.1.0",
        "2026-10-31T00:00:00Z",
        "2026-11-01T00:00:00Z",
    );
    let payload = |to: &str| {
        format!(
            r#"{{"request_id": "b1", "command": "backfill", "meters": ["m1"], "profile": "1-0:99.1.0", "from": "2026-10-31T00:00:00Z", "to": "{to}", "ts": 1800000000, "sig": "{sig}"}}"#
        )
    };
    assert!(parse_with(&payload("2026-11-01T00:00:00Z"), Some(key)).is_ok());
    let widened = parse_with(&payload("2026-11-02T00:00:00Z"), Some(key)).unwrap_err();
    assert!(widened.reason.contains("signature"), "{}", widened.reason);
}
