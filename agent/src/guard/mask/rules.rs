//! The detectors: what each one matches, how a match is validated, which part of it is
//! the secret, and what counts as evidence that a held prefix is worth waiting for.

use super::MaskConfigError;
use regex_syntax::hir::literal::{ExtractKind, Extractor};

/// How a candidate is checked once the expression matched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    None,
    Luhn,
    Iban,
    Jwt,
}

/// Which part of a match is the secret (the rest is a label that stays readable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Secret {
    Whole,
    /// After the first `=` (`AccountKey=...`).
    AfterEquals,
    /// After the keyword and the blanks that follow it (`Bearer <token>`).
    AfterBlank,
    /// The last N bytes (the value after a label).
    Last(usize),
    /// Nothing in the match itself: it opens a private-key block.
    BlockStart,
}

/// What makes a held prefix of a candidate worth holding up to `HOLD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Evidence {
    /// The candidate starts with one of these literals (a key format's fixed prefix).
    Prefix(Vec<Vec<u8>>),
    /// At least this many ASCII digits (a card number's start).
    Digits(usize),
    /// This byte was seen (`@` of an e-mail address).
    Byte(u8),
    /// Two capital letters and two digits (an IBAN's country and check digits).
    IbanStart,
    /// Nothing: held only while more input is already waiting.
    None,
}

#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub name: String,
    pub pattern: String,
    pub check: Check,
    pub secret: Secret,
    pub evidence: Evidence,
}

fn prefixes(list: &[&str]) -> Evidence {
    Evidence::Prefix(list.iter().map(|p| p.as_bytes().to_vec()).collect())
}

/// The built-in detectors, by the name a profile uses. Every expression is ASCII-only
/// (`(?-u:...)`), so the lazy DFAs never give up on non-ASCII text.
pub(super) const DETECTORS: &[&str] = &[
    "credit_card",
    "aws_access_key",
    "aws_secret_key",
    "gcp_api_key",
    "azure_key",
    "github_token",
    "slack_token",
    "private_key",
    "jwt",
    "bearer_token",
    "email",
    "iban",
];

pub(super) fn builtin(name: &str) -> Option<Rule> {
    let (pattern, check, secret, evidence) = match name {
        // 13-19 digits: contiguous, in groups of four (Visa, Mastercard, ...), or 4-6-5
        // (Amex); one space or dash between groups.
        "credit_card" => (
            r"(?-u:\b(?:[0-9]{13,19}|[0-9]{4}(?:[ \-][0-9]{4}){2,3}(?:[ \-][0-9]{1,4})?|[0-9]{4}[ \-][0-9]{6}[ \-][0-9]{4,5})\b)",
            Check::Luhn,
            Secret::Whole,
            Evidence::Digits(6),
        ),
        "aws_access_key" => (
            r"(?-u:\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|A3T[A-Z0-9])[A-Z0-9]{16}\b)",
            Check::None,
            Secret::Whole,
            prefixes(&[
                "AKIA", "ASIA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA", "A3T",
            ]),
        ),
        "aws_secret_key" => (
            r#"(?-u:(?i:aws_secret_access_key|aws_secret_key|secret_access_key)["']?[ \t]*[:=][ \t]*["']?[A-Za-z0-9/+]{40})"#,
            Check::None,
            Secret::Last(40),
            prefixes(&["aws_secret", "AWS_SECRET", "secret_acce", "SECRET_ACCE"]),
        ),
        "gcp_api_key" => (
            r"(?-u:AIza[0-9A-Za-z_\-]{35})",
            Check::None,
            Secret::Whole,
            prefixes(&["AIza"]),
        ),
        // Storage account keys (64 bytes, base64) and Service Bus / Event Hubs keys
        // (32 bytes) in connection strings.
        "azure_key" | "azure" => (
            r"(?-u:AccountKey=[A-Za-z0-9+/]{86}==|SharedAccessKey=[A-Za-z0-9+/]{43}=)",
            Check::None,
            Secret::AfterEquals,
            prefixes(&["AccountKey=", "SharedAccessKey="]),
        ),
        "github_token" => (
            r"(?-u:\b(?:(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})\b)",
            Check::None,
            Secret::Whole,
            prefixes(&["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"]),
        ),
        "slack_token" => (
            r"(?-u:\bxox[baprs]-[0-9A-Za-z]{4,}(?:-[0-9A-Za-z]+){1,5})",
            Check::None,
            Secret::Whole,
            prefixes(&["xoxb-", "xoxa-", "xoxp-", "xoxr-", "xoxs-"]),
        ),
        "private_key" => (
            r"(?-u:-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY-----)",
            Check::None,
            Secret::BlockStart,
            prefixes(&["-----BEGIN"]),
        ),
        "jwt" => (
            r"(?-u:\beyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{2,}\.[A-Za-z0-9_\-]*)",
            Check::Jwt,
            Secret::Whole,
            prefixes(&["eyJ"]),
        ),
        "bearer_token" => (
            r"(?-u:\b[Bb]earer[ \t]+[A-Za-z0-9\-._~+/]{16,}=*)",
            Check::None,
            Secret::AfterBlank,
            prefixes(&["Bearer ", "bearer ", "Bearer\t", "bearer\t"]),
        ),
        "email" => (
            r"(?-u:[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,})",
            Check::None,
            Secret::Whole,
            Evidence::Byte(b'@'),
        ),
        "iban" => (
            r"(?-u:\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b)",
            Check::Iban,
            Secret::Whole,
            Evidence::IbanStart,
        ),
        _ => return None,
    };
    let canonical = if name == "azure" { "azure_key" } else { name };
    Some(Rule {
        name: canonical.to_string(),
        pattern: pattern.to_string(),
        check,
        secret,
        evidence,
    })
}

const USER_PREFIXES_MAX: usize = 64;
const USER_PREFIX_MIN: usize = 3;

/// A user pattern: refused when it does not parse or can match nothing at all (an empty
/// match would mask nothing and hold everything).
pub(super) fn user_pattern(pattern: &str) -> Result<Rule, MaskConfigError> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .map_err(|e| MaskConfigError::BadPattern(pattern.to_string(), e.to_string()))?;
    if hir.properties().minimum_len().unwrap_or(0) == 0 {
        return Err(MaskConfigError::EmptyMatch(pattern.to_string()));
    }
    // A literal prefix is evidence when it is one (a few spellings of a word like
    // `secret-`), not a class spelled out (`[0-9]{10}` gives "00".."99").
    let literals = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let evidence = match literals.literals() {
        Some(lits)
            if !lits.is_empty()
                && lits.len() <= USER_PREFIXES_MAX
                && lits.iter().all(|l| l.as_bytes().len() >= USER_PREFIX_MIN) =>
        {
            Evidence::Prefix(lits.iter().map(|l| l.as_bytes().to_vec()).collect())
        }
        _ => Evidence::None,
    };
    Ok(Rule {
        name: format!("pattern:{pattern}"),
        pattern: pattern.to_string(),
        check: Check::None,
        secret: Secret::Whole,
        evidence,
    })
}

impl Rule {
    /// The secret in a match `m` (offsets into `m`), if the match is really one.
    ///
    /// Numbers in groups are matched greedily, so `4111 1111 1111 1111 12/25` matches with
    /// the `12` of the expiry date: when the whole fails its check, trailing groups are
    /// dropped until it passes.
    pub fn secret_in(&self, m: &[u8]) -> Option<(usize, usize)> {
        let valid_len = match self.check {
            Check::None => m.len(),
            Check::Jwt => jwt(m).then_some(m.len())?,
            Check::Luhn => longest_valid(m, luhn)?,
            Check::Iban => longest_valid(m, iban)?,
        };
        let m = &m[..valid_len];
        match self.secret {
            Secret::Whole => Some((0, m.len())),
            Secret::AfterEquals => m.iter().position(|&b| b == b'=').map(|i| (i + 1, m.len())),
            Secret::AfterBlank => {
                let word = m.iter().position(|&b| b == b' ' || b == b'\t')?;
                let blanks = m[word..].iter().take_while(|&&b| b == b' ' || b == b'\t');
                Some((word + blanks.count(), m.len()))
            }
            Secret::Last(n) => Some((m.len().saturating_sub(n), m.len())),
            // The header line stays readable; the block after it is masked.
            Secret::BlockStart => Some((m.len(), m.len())),
        }
    }

    /// Whether `partial` (text from a candidate's start to the end of what was seen, still
    /// a prefix of a possible match) carries this rule's evidence.
    pub fn evidence_in(&self, partial: &[u8]) -> bool {
        match &self.evidence {
            Evidence::Prefix(list) => list.iter().any(|p| partial.starts_with(p)),
            Evidence::Digits(n) => partial.iter().filter(|b| b.is_ascii_digit()).count() >= *n,
            Evidence::Byte(b) => partial.contains(b),
            Evidence::IbanStart => {
                partial.len() >= 4
                    && partial[..2].iter().all(u8::is_ascii_uppercase)
                    && partial[2..4].iter().all(u8::is_ascii_digit)
            }
            Evidence::None => false,
        }
    }
}

/// The longest prefix of `m`, whole or cut before a separator, that passes `check`.
fn longest_valid(m: &[u8], check: fn(&[u8]) -> bool) -> Option<usize> {
    let mut len = m.len();
    loop {
        if check(&m[..len]) {
            return Some(len);
        }
        len = m[..len].iter().rposition(|&b| b == b' ' || b == b'-')?;
    }
}

fn luhn(candidate: &[u8]) -> bool {
    let digits: Vec<u32> = candidate
        .iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| u32::from(b - b'0'))
        .collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 {
                    d2 - 9
                } else {
                    d2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616: move the country code and check digits to the end, letters as 10..35, the
/// number mod 97 must be 1.
fn iban(candidate: &[u8]) -> bool {
    let compact: Vec<u8> = candidate.iter().copied().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let mut rem: u32 = 0;
    for &b in compact[4..].iter().chain(&compact[..4]) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// The header must be base64url of a JSON object with an `alg`.
fn jwt(candidate: &[u8]) -> bool {
    use base64::Engine as _;
    let Some(header) = candidate.split(|&b| b == b'.').next() else {
        return false;
    };
    let trimmed: Vec<u8> = header.iter().copied().filter(|&b| b != b'=').collect();
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&trimmed) else {
        return false;
    };
    matches!(
        serde_json::from_slice::<serde_json::Value>(&json),
        Ok(serde_json::Value::Object(map)) if map.contains_key("alg")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_and_iban_checks() {
        assert!(luhn(b"4111111111111111"));
        assert!(luhn(b"4111 1111 1111 1111"));
        assert!(!luhn(b"4111111111111112"));
        assert!(luhn(b"378282246310005"));
        assert_eq!(longest_valid(b"4111 1111 1111 1111 12", luhn), Some(19));
        assert_eq!(longest_valid(b"4111 1111 1111 1112 12", luhn), None);
        assert!(iban(b"DE89370400440532013000"));
        assert!(iban(b"GB82 WEST 1234 5698 7654 32"));
        assert!(!iban(b"GB83 WEST 1234 5698 7654 32"));
    }

    #[test]
    fn jwt_header_must_name_an_algorithm() {
        assert!(jwt(
            b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxIn0.sig"
        ));
        // {"typ":"JWT"}
        assert!(!jwt(b"eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiIxIn0.sig"));
        assert!(!jwt(b"eyJnotbase64!.x.y"));
    }

    #[test]
    fn user_patterns_are_checked() {
        assert!(matches!(
            user_pattern("secret-("),
            Err(MaskConfigError::BadPattern(..))
        ));
        assert!(matches!(
            user_pattern("a*"),
            Err(MaskConfigError::EmptyMatch(..))
        ));
        let r = user_pattern("secret-[0-9a-f]{32}").unwrap();
        assert!(r.evidence_in(b"secret-0"));
        assert!(!r.evidence_in(b"secre"));
        assert_eq!(user_pattern("[0-9]{10}").unwrap().evidence, Evidence::None);
    }
}
