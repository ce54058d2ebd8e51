use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const ALL: &[&str] = rules::DETECTORS;
const USER_PATTERN: &str = "secret-[0-9a-f]{32}";

fn compile(detectors: &[&str], patterns: &[&str]) -> Arc<MaskRules> {
    MaskRules::compile(&MaskConfig {
        detectors: detectors.iter().map(|s| s.to_string()).collect(),
        patterns: patterns.iter().map(|s| s.to_string()).collect(),
    })
    .expect("rules compile")
}

fn all_rules() -> Arc<MaskRules> {
    compile(ALL, &[USER_PATTERN])
}

fn add_hits(total: &mut BTreeMap<String, u32>, m: &Masked) {
    for (name, n) in &m.hits {
        *total.entry(name.clone()).or_default() += n;
    }
}

/// One push (the relay read it all at once), then the end of the stream.
fn mask_whole(rules: &Arc<MaskRules>, input: &[u8]) -> (Vec<u8>, BTreeMap<String, u32>) {
    let mut m = Masker::new(Arc::clone(rules));
    let now = Instant::now();
    let mut hits = BTreeMap::new();
    let a = m.push(input, now, false);
    add_hits(&mut hits, &a);
    let b = m.finish();
    add_hits(&mut hits, &b);
    ([a.out, b.out].concat(), hits)
}

fn mask(detectors: &[&str], input: &str) -> String {
    let (out, _) = mask_whole(&compile(detectors, &[]), input.as_bytes());
    String::from_utf8(out).expect("utf-8 out")
}

fn stars(n: usize) -> String {
    "*".repeat(n)
}

/// The text a terminal would show (escape sequences removed).
fn text_of(bytes: &[u8]) -> String {
    let mut v = text::TextView::new();
    v.append(bytes);
    v.finish();
    String::from_utf8_lossy(&v.text).into_owned()
}

fn display_width(bytes: &[u8]) -> usize {
    text_of(bytes)
        .chars()
        .map(|c| {
            if c.is_control() {
                0
            } else {
                c.width().unwrap_or(0)
            }
        })
        .sum()
}

const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";

fn azure_key() -> String {
    format!("{}==", &"Ab1+/".repeat(18)[..86])
}

// ---------- detectors ----------

#[test]
fn credit_cards_with_luhn() {
    for card in [
        "4111111111111111",
        "4111 1111 1111 1111",
        "5500-0000-0000-0004",
        "378282246310005",
        "3782 822463 10005",
    ] {
        let out = mask(&["credit_card"], &format!("pay {card} now"));
        assert_eq!(out, format!("pay {} now", stars(card.len())), "{card}");
    }
    // Luhn-invalid, too long, glued to a word: left alone.
    for text in [
        "pay 4111 1111 1111 1112 now",
        "id 41111111111111111111111",
        "x4111111111111111",
        "call 0123 4567 89",
    ] {
        assert_eq!(mask(&["credit_card"], text), text);
    }
    // An expiry date after the number does not hide it.
    assert_eq!(
        mask(&["credit_card"], "4111 1111 1111 1111 12/25"),
        format!("{} 12/25", stars(19))
    );
}

#[test]
fn aws_keys() {
    assert_eq!(
        mask(&["aws_access_key"], "key AKIAIOSFODNN7EXAMPLE."),
        format!("key {}.", stars(20))
    );
    assert_eq!(mask(&["aws_access_key"], "ASIAY34FZKBOKMUTVV7A"), stars(20));
    // AKIA + 15 or + 17, or glued to a word: not a key.
    for text in [
        "AKIAIOSFODNN7EXAMPL",
        "AKIAIOSFODNN7EXAMPLEX",
        "xAKIAIOSFODNN7EXAMPLE",
    ] {
        assert_eq!(mask(&["aws_access_key"], text), text);
    }
    let line = "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    assert_eq!(
        mask(&["aws_secret_key"], line),
        format!("aws_secret_access_key = {}", stars(40))
    );
    assert_eq!(
        mask(
            &["aws_secret_key"],
            "secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        ),
        "secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    );
}

#[test]
fn cloud_and_service_tokens() {
    let gcp = format!("AIza{}", &"SyD9tSrke72Pou-QMnMXa7eZSW0jkFMBWY_abc"[..35]);
    assert_eq!(
        mask(&["gcp_api_key"], &format!("k={gcp}")),
        format!("k={}", stars(39))
    );
    assert_eq!(mask(&["gcp_api_key"], "AIzaShort"), "AIzaShort");

    let conn = format!(
        "DefaultEndpointsProtocol=https;AccountName=x;AccountKey={};",
        azure_key()
    );
    assert_eq!(
        mask(&["azure_key"], &conn),
        format!(
            "DefaultEndpointsProtocol=https;AccountName=x;AccountKey={};",
            stars(88)
        )
    );
    assert_eq!(
        mask(&["azure"], "AccountKey=tooShort=="),
        "AccountKey=tooShort=="
    );

    let ghp = format!("ghp_{}", "aB3".repeat(12));
    assert_eq!(
        mask(&["github_token"], &format!("{ghp} ok")),
        format!("{} ok", stars(40))
    );
    let pat = format!("github_pat_{}_{}", "A1".repeat(11), &"b2c".repeat(20)[..59]);
    assert_eq!(mask(&["github_token"], &pat), stars(pat.len()));
    assert_eq!(mask(&["github_token"], "ghp_short"), "ghp_short");

    let slack = "xoxb-123456789012-abcdefABCDEF";
    assert_eq!(
        mask(&["slack_token"], &format!("t {slack}\n")),
        format!("t {}\n", stars(slack.len()))
    );
    assert_eq!(
        mask(&["slack_token"], "xoxq-123456789012-abc"),
        "xoxq-123456789012-abc"
    );
}

#[test]
fn a_label_inside_a_token_is_still_searched() {
    let (out, hits) = mask_whole(
        &all_rules(),
        b"Bearer aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("Bearer {}\n", stars(62))
    );
    assert_eq!(hits.get("bearer_token"), Some(&1));
    assert_eq!(hits.get("aws_secret_key"), Some(&1));
}

#[test]
fn jwt_and_bearer() {
    assert_eq!(
        mask(&["jwt"], &format!("t={JWT};")),
        format!("t={};", stars(JWT.len()))
    );
    // A header without "alg" is not a JWT.
    let not_jwt = "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiIxIn0.abcdefghijk";
    assert_eq!(mask(&["jwt"], not_jwt), not_jwt);

    let token = "abcdefghijklmnopqrstuvwxyz0123456789";
    assert_eq!(
        mask(
            &["bearer_token"],
            &format!("Authorization: Bearer {token}\r\n")
        ),
        format!("Authorization: Bearer {}\r\n", stars(token.len()))
    );
    assert_eq!(
        mask(&["bearer_token"], "the bearer of bad news"),
        "the bearer of bad news"
    );
}

#[test]
fn email_and_iban() {
    assert_eq!(
        mask(&["email"], "mail bob.smith@example.com."),
        format!("mail {}.", stars("bob.smith@example.com".len()))
    );
    assert_eq!(mask(&["email"], "not@mail"), "not@mail");
    for iban in ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432"] {
        assert_eq!(
            mask(&["iban"], &format!("to {iban}.")),
            format!("to {}.", stars(iban.len()))
        );
    }
    // A wrong check digit: left alone.
    for text in ["to DE88 3704 0044 0532 0130 00", "GB83WEST12345698765432"] {
        assert_eq!(mask(&["iban"], text), text);
    }
}

#[test]
fn user_patterns_and_config_errors() {
    let secret = format!("secret-{}", "0123456789abcdef".repeat(2));
    let (out, hits) = mask_whole(
        &compile(&[], &[USER_PATTERN]),
        format!("[{secret}]").as_bytes(),
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("[{}]", stars(secret.len()))
    );
    assert_eq!(hits.get(&format!("pattern:{USER_PATTERN}")), Some(&1));

    let config = |d: &[&str], p: &[&str]| MaskConfig {
        detectors: d.iter().map(|s| s.to_string()).collect(),
        patterns: p.iter().map(|s| s.to_string()).collect(),
    };
    assert!(matches!(
        MaskRules::compile(&config(&["credit_kard"], &[])),
        Err(MaskConfigError::UnknownDetector(n, _)) if n == "credit_kard"
    ));
    assert!(matches!(
        MaskRules::compile(&config(&[], &["(unclosed"])),
        Err(MaskConfigError::BadPattern(..))
    ));
    assert!(matches!(
        MaskRules::compile(&config(&[], &["x?"])),
        Err(MaskConfigError::EmptyMatch(..))
    ));
    assert!(MaskRules::compile(&config(&[], &[])).unwrap().is_empty());
    assert!(!all_rules().is_empty());
}

#[test]
fn private_key_block_streams_without_holding_it() {
    let body: Vec<String> = (0..40)
        .map(|i| format!("MIIEpAIBAAKCAQEA{i:04}xyzABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij+/"))
        .collect();
    let input = format!(
        "$ cat id\n-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n$ ",
        body.join("\n")
    );
    let rules = compile(&["private_key", "email"], &[]);
    let mut m = Masker::new(Arc::clone(&rules));
    let mut now = Instant::now();
    let mut out = Vec::new();
    let mut hits = BTreeMap::new();
    for chunk in input.as_bytes().chunks(7) {
        let r = m.push(chunk, now, true);
        add_hits(&mut hits, &r);
        out.extend(r.out);
        now += Duration::from_millis(30);
        let r = m.release(now);
        out.extend(r.out);
    }
    out.extend(m.finish().out);
    let out = String::from_utf8(out).unwrap();
    for line in &body {
        assert!(!out.contains(line.as_str()));
        assert!(out.contains(&stars(line.len())));
    }
    assert!(out.starts_with("$ cat id\n-----BEGIN OPENSSH PRIVATE KEY-----\n"));
    assert!(out.ends_with("\n-----END OPENSSH PRIVATE KEY-----\n$ "));
    assert_eq!(out.len(), input.len());
    assert_eq!(hits.get("private_key"), Some(&1));

    // Streaming: once the block started, a line goes out as soon as it is read.
    let mut m = Masker::new(rules);
    let now = Instant::now();
    m.push(b"-----BEGIN PRIVATE KEY-----\n", now, true);
    let r = m.push(b"MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", now, true);
    assert_eq!(r.out, stars(32).as_bytes());
    assert!(m.deadline().is_none());
}

// ---------- streaming ----------

#[test]
fn colour_codes_inside_a_card_number() {
    let input = "card \x1b[31m4111\x1b[0m 1111 \x1b[1;32m1111\x1b[0m 1111\n";
    let out = mask(&["credit_card"], input);
    assert_eq!(
        out,
        "card \x1b[31m****\x1b[0m******\x1b[1;32m****\x1b[0m*****\n"
    );
    // Byte by byte too.
    let rules = compile(&["credit_card"], &[]);
    let mut m = Masker::new(rules);
    let now = Instant::now();
    let mut got = Vec::new();
    for b in input.as_bytes() {
        got.extend(m.push(&[*b], now, false).out);
    }
    got.extend(m.finish().out);
    assert_eq!(String::from_utf8(got).unwrap(), out);
}

#[test]
fn a_character_cut_between_reads_is_completed_first() {
    let rules = compile(&[], &["pw:[^ ]+"]);
    let input = "é pw:日本x ok".as_bytes();
    let (whole, _) = mask_whole(&rules, input);
    assert_eq!(String::from_utf8(whole.clone()).unwrap(), "é ******** ok");
    for cut in 1..input.len() {
        let mut m = Masker::new(Arc::clone(&rules));
        let now = Instant::now();
        let mut out = m.push(&input[..cut], now, true).out;
        out.extend(m.release(now + HOLD).out);
        out.extend(m.push(&input[cut..], now + HOLD, true).out);
        out.extend(m.finish().out);
        assert!(std::str::from_utf8(&out).is_ok(), "cut at {cut}: {out:?}");
        assert_eq!(display_width(&out), display_width(input), "cut at {cut}");
    }
}

#[test]
fn wide_characters_keep_their_width() {
    let rules = compile(&[], &["秘密[0-9]{4}"]);
    let (out, _) = mask_whole(&rules, "a 秘密1234 b".as_bytes());
    assert_eq!(String::from_utf8(out).unwrap(), format!("a {} b", stars(8)));
    let rules = compile(&["email"], &[]);
    let (out, _) = mask_whole(&rules, "\x1b[1mjosé@exämple.com\x1b[0m x@y.io".as_bytes());
    // Non-ASCII is outside the built-in e-mail expression: only ASCII addresses match.
    assert_eq!(text_of(&out), "josé@exämple.com ******");
}

#[test]
fn a_writer_pausing_mid_secret() {
    let rules = all_rules();
    let mut m = Masker::new(rules);
    let t0 = Instant::now();
    let first = m.push(b"AKIA", t0, true);
    assert!(first.out.is_empty(), "evidence is held");
    let deadline = m.deadline().expect("a deadline");
    assert_eq!(deadline, t0 + HOLD);
    assert!(m.release(t0 + HOLD / 2).out.is_empty());
    let released = m.release(deadline);
    assert_eq!(released.out, b"AKIA");
    assert!(m.deadline().is_none());
    let rest = m.push(
        b"IOSFODNN7EXAMPLE\n",
        deadline + Duration::from_millis(200),
        true,
    );
    let end = m.finish();
    let out = [released.out, rest.out, end.out].concat();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("AKIA{}\n", stars(16))
    );
    assert_eq!(rest.hits, vec![("aws_access_key".to_string(), 1)]);
}

#[test]
fn keystrokes_without_evidence_echo_at_once() {
    let mut m = Masker::new(all_rules());
    let now = Instant::now();
    for (typed, echo) in [
        ("l", "l"),
        ("s", "s"),
        (" ", " "),
        ("4", "4"),
        ("1", "1"),
        ("\r\n", "\r\n"),
    ] {
        assert_eq!(m.push(typed.as_bytes(), now, true).out, echo.as_bytes());
        assert!(m.deadline().is_none());
    }
    // Six digits are evidence of a card number: held.
    assert!(m.push(b"411111", now, true).out.is_empty());
    assert!(m.deadline().is_some());
}

#[test]
fn full_screen_is_said_once() {
    let mut m = Masker::new(all_rules());
    let now = Instant::now();
    assert!(
        !m.push(b"plain\x1b[31mred\x1b[0m\x1b[H\x1b[2J", now, true)
            .full_screen
    );
    assert!(m.push(b"\x1b[?10", now, true).out.len() < 10);
    assert!(m.push(b"49h\x1b[1;1Hvim", now, true).full_screen);
    assert!(!m.push(b"\x1b[?1049h\x1b[5;5H", now, true).full_screen);
    // Without any rule too (the relay may still want to know).
    let mut m = Masker::new(compile(&[], &[]));
    assert!(m.push(b"\x1b[3;4f", now, true).full_screen);
}

#[test]
fn hold_is_bounded_in_bytes() {
    let mut m = Masker::new(all_rules());
    let now = Instant::now();
    // One endless "word" keeps an e-mail candidate alive: at most HOLD_BYTES stay held.
    let r = m.push(&vec![b'a'; 10_000], now, false);
    assert!(r.out.len() >= 10_000 - HOLD_BYTES);
    assert_eq!(r.out, vec![b'a'; r.out.len()]);
}

#[test]
fn secrets_inside_large_reads_and_across_slices() {
    let line = "2026-12-03 INFO naïve \x1b[32mok\x1b[0m path=/x/42 took=12ms\n";
    let mut input = String::new();
    let mut planted = 0;
    let mut lines = 0;
    while input.len() < 3 * SLICE {
        input.push_str(line);
        lines += 1;
        // Lands on many offsets around the slice boundaries.
        if lines % 37 == 0 {
            input.push_str("key AKIAIOSFODNN7EXAMPLE card 4111 1111 1111 1111 mail a@b.io\n");
            planted += 1;
        }
    }
    let (out, hits) = mask_whole(&all_rules(), input.as_bytes());
    let out = String::from_utf8(out).unwrap();
    assert!(planted > 10);
    for raw in ["AKIA", "4111", "a@b.io"] {
        if let Some(at) = out.find(raw) {
            panic!("{raw} at {at}: {:?}", &out[at.saturating_sub(80)..at + 60]);
        }
    }
    assert_eq!(hits.get("aws_access_key"), Some(&planted));
    assert_eq!(hits.get("credit_card"), Some(&planted));
    assert_eq!(hits.get("email"), Some(&planted));
    assert_eq!(
        display_width(out.as_bytes()),
        display_width(input.as_bytes())
    );
}

#[test]
fn hits_name_the_rule_never_the_value() {
    let input = format!("AKIAIOSFODNN7EXAMPLE bob@example.com AKIAIOSFODNN7EXAMPLE {JWT}\n");
    let (out, hits) = mask_whole(&all_rules(), input.as_bytes());
    assert!(!String::from_utf8(out).unwrap().contains("AKIA"));
    assert_eq!(hits.get("aws_access_key"), Some(&2));
    assert_eq!(hits.get("email"), Some(&1));
    assert_eq!(hits.get("jwt"), Some(&1));
    assert_eq!(hits.len(), 3);
}

// ---------- properties ----------

/// A secret as it is written, and the parts of it that must never be shown.
fn secrets() -> Vec<(String, Vec<String>)> {
    let key_lines = [
        "MIIEpAIBAAKCAQEA0000secretline",
        "abcdEFGH5678secretlinetwo",
    ];
    let token = "abcdefghijklmnopqrstuvwxyz0123456789";
    let aws_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    let gcp = format!("AIza{}", &"SyD9tSrke72Pou-QMnMXa7eZSW0jkFMBWY_abc"[..35]);
    let ghp = format!("ghp_{}", "aB3".repeat(12));
    let azure = azure_key();
    let user = format!("secret-{}", "0123456789abcdef".repeat(2));
    let whole = |s: &str| (s.to_string(), vec![s.to_string()]);
    vec![
        whole("4111111111111111"),
        whole("4111 1111 1111 1111"),
        whole("5500-0000-0000-0004"),
        whole("378282246310005"),
        whole("AKIAIOSFODNN7EXAMPLE"),
        whole("ASIAY34FZKBOKMUTVV7A"),
        (
            format!("aws_secret_access_key={aws_secret}"),
            vec![aws_secret.to_string()],
        ),
        whole(&gcp),
        (format!("AccountKey={azure}"), vec![azure.clone()]),
        whole(&ghp),
        whole("xoxb-123456789012-abcdefABCDEF"),
        (
            format!(
                "-----BEGIN RSA PRIVATE KEY-----\n{}\n{}\n-----END RSA PRIVATE KEY-----",
                key_lines[0], key_lines[1]
            ),
            key_lines.iter().map(|s| s.to_string()).collect(),
        ),
        whole(JWT),
        (format!("Bearer {token}"), vec![token.to_string()]),
        whole("alice.smith@example.com"),
        whole("DE89 3704 0044 0532 0130 00"),
        whole("GB82WEST12345698765432"),
        whole(&user),
    ]
}

const WORDS: &[&str] = &[
    "lorem",
    "ipsum",
    "é",
    "日本語",
    "🙂",
    "12",
    "a-b",
    "foo.bar",
    "://",
    "x1",
    "Ωmega",
    "$",
    "AB",
    "ghp",
    "eyJ",
    "AKIA",
    "Bearer",
    "-----",
    "@",
];
const SEPARATORS: &[&str] = &[" ", "\n", "\r\n", "\t", " | "];
const COLOURS: &[&str] = &[
    "\x1b[31m",
    "\x1b[0m",
    "\x1b[1;32m",
    "\x1b]0;title\x07",
    "\x1b(B",
];

#[derive(Debug, Clone)]
enum Piece {
    Word(usize),
    Secret(usize, Option<(usize, usize)>),
    Colour(usize),
}

fn piece() -> impl Strategy<Value = Piece> {
    let n_secrets = secrets().len();
    prop_oneof![
        4 => (0..WORDS.len()).prop_map(Piece::Word),
        2 => (0..n_secrets, proptest::option::of((0usize..200, 0..COLOURS.len())))
            .prop_map(|(s, c)| Piece::Secret(s, c)),
        1 => (0..COLOURS.len()).prop_map(Piece::Colour),
    ]
}

/// The input, and the secret parts it contains.
fn build(pieces: &[Piece], seps: &[usize]) -> (Vec<u8>, Vec<String>) {
    let all = secrets();
    let mut input = String::new();
    let mut hidden = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        match p {
            Piece::Word(w) => input.push_str(WORDS[*w]),
            Piece::Colour(c) => input.push_str(COLOURS[*c]),
            Piece::Secret(s, colour) => {
                let (text, parts) = &all[*s];
                let mut text = text.clone();
                if let Some((at, c)) = colour {
                    let mut at = at % (text.len() + 1);
                    while !text.is_char_boundary(at) {
                        at -= 1;
                    }
                    text.insert_str(at, COLOURS[*c]);
                }
                input.push_str(&text);
                hidden.extend(parts.iter().cloned());
            }
        }
        input.push_str(SEPARATORS[seps.get(i).copied().unwrap_or(0) % SEPARATORS.len()]);
    }
    (input.into_bytes(), hidden)
}

fn cuts(len: usize, points: &[usize]) -> Vec<usize> {
    let mut c: Vec<usize> = points.iter().map(|p| p % (len + 1)).collect();
    c.push(0);
    c.push(len);
    c.sort_unstable();
    c.dedup();
    c
}

proptest! {
    // No regression files written into the tree (CI runs from a clean clone).
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_split_gives_the_output_of_one_push(
        pieces in proptest::collection::vec(piece(), 0..40),
        seps in proptest::collection::vec(0usize..10, 40),
        points in proptest::collection::vec(0usize..100_000, 0..30),
    ) {
        let rules = all_rules();
        let (input, _) = build(&pieces, &seps);
        let (whole, whole_hits) = mask_whole(&rules, &input);
        let mut m = Masker::new(Arc::clone(&rules));
        let now = Instant::now();
        let mut out = Vec::new();
        let mut hits = BTreeMap::new();
        let c = cuts(input.len(), &points);
        for w in c.windows(2) {
            let r = m.push(&input[w[0]..w[1]], now, false);
            add_hits(&mut hits, &r);
            out.extend(r.out);
        }
        let r = m.finish();
        add_hits(&mut hits, &r);
        out.extend(r.out);
        prop_assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&whole));
        prop_assert_eq!(hits, whole_hits);
    }

    #[test]
    fn no_secret_ever_goes_out_raw(
        pieces in proptest::collection::vec(piece(), 0..40),
        seps in proptest::collection::vec(0usize..10, 40),
        points in proptest::collection::vec(0usize..100_000, 0..60),
        pauses in proptest::collection::vec(any::<bool>(), 60),
    ) {
        let rules = all_rules();
        let (input, hidden) = build(&pieces, &seps);
        let mut m = Masker::new(Arc::clone(&rules));
        let mut now = Instant::now();
        let mut out = Vec::new();
        let c = cuts(input.len(), &points);
        for (i, w) in c.windows(2).enumerate() {
            out.extend(m.push(&input[w[0]..w[1]], now, true).out);
            // The writer pauses longer than the hold: what is held goes out.
            if pauses.get(i).copied().unwrap_or(false) {
                if let Some(d) = m.deadline() {
                    now = d;
                    out.extend(m.release(now).out);
                }
            }
            now += Duration::from_millis(1);
        }
        out.extend(m.finish().out);
        let shown = text_of(&out);
        for secret in &hidden {
            prop_assert!(!shown.contains(secret.as_str()), "{:?} shown in {:?}", secret, shown);
        }
        prop_assert_eq!(display_width(&out), display_width(&input));
    }
}

#[test]
#[ignore = "throughput figures; run in release: cargo test --release -p usher-agent --lib guard::mask::tests::throughput -- --ignored --nocapture"]
fn throughput() {
    let rules = compile(
        &[
            "credit_card",
            "aws_access_key",
            "gcp_api_key",
            "azure_key",
            "github_token",
            "private_key",
            "jwt",
            "bearer_token",
            "email",
            "iban",
        ],
        &["secret-[0-9a-f]{32}"],
    );
    let corpora: [(&str, String); 4] = [
        (
            "log lines",
            "2026-12-03T12:00:00Z INFO request handled path=/api/v1/items/42 status=200 \
             bytes=1534 took=12ms user-agent=\"curl/8.5\" \x1b[32mok\x1b[0m\n"
                .to_string(),
        ),
        (
            "prose",
            "The quick brown fox jumps over the lazy dog, 1234 times; naïve café façade. \n"
                .to_string(),
        ),
        (
            "ls --color",
            "\x1b[0m\x1b[01;34mbin\x1b[0m  \x1b[01;36mlib\x1b[0m  \x1b[01;32mrun.sh\x1b[0m  \r\n"
                .to_string(),
        ),
        (
            "base64",
            "TWFueSBoYW5kcyBtYWtlIGxpZ2h0IHdvcmsuIE1hbnkgaGFuZHMgbWFrZSBsaWdodCB3b3JrLiBNYW55\n"
                .to_string(),
        ),
    ];
    for (name, line) in corpora {
        let block: Vec<u8> = line.repeat(64 * 1024 / line.len() + 1).into_bytes();
        let total = 256usize << 20;
        let mut m = Masker::new(Arc::clone(&rules));
        let now = Instant::now();
        let start = Instant::now();
        let mut sent = 0;
        let mut out = 0;
        while sent < total {
            out += m.push(&block, now, false).out.len();
            sent += block.len();
        }
        out += m.finish().out.len();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(out, sent, "{name}: nothing to mask, nothing lost");
        println!(
            "mask throughput, {name}: {:.0} MB/s ({} MiB in {:.2} s)",
            sent as f64 / secs / 1e6,
            sent >> 20,
            secs
        );
    }
    // Keystrokes: one byte per read, each echoed at once.
    let mut m = Masker::new(rules);
    let typed = b"ls -la /var/log && grep -r error . | tail -n 20\r";
    let now = Instant::now();
    let start = Instant::now();
    let n = 100_000;
    for i in 0..n {
        let b = typed[i % typed.len()];
        assert_eq!(m.push(&[b], now, true).out, [b]);
    }
    println!(
        "mask latency per keystroke: {:.2} us",
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}
