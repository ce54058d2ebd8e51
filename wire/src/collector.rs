//! The collector's answers to the agents' shipping requests (collector/API.md), as both
//! sides read them: the collector serialises these, the shipper and the test uploader
//! decide on them.

use serde::{Deserialize, Serialize};

/// `GET /api/v1/sessions/{id}/streams/{stream}`: what is stored durably; an upload
/// resumes there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub next_seq: u64,
    /// `h(next_seq - 1)`, or the genesis when nothing is stored.
    pub last_hash: String,
}

/// `PUT …/chunks/{seq}` accepted: `201 {"stored": true, "next_seq": N+1}`, or
/// `200 {"stored": false, "duplicate": true}` for a chunk already stored with that hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkAccepted {
    pub stored: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_seq: Option<u64>,
}

/// Every refusal's body: a code to decide on, and words for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: ErrorCode,
    /// For a person; never parsed.
    pub error: String,
    /// With `gap` and with a chunk refused as tampered: where the stored stream ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_seq: Option<u64>,
}

/// Why the collector refused, as the `code` of its error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed (ids, headers, JSON).
    BadRequest,
    /// 401: no known token.
    Unauthorized,
    /// 403: another host's session or metadata.
    Forbidden,
    /// 404.
    NotFound,
    /// 409: a chunk number past the end of the stored stream; resume at `next_seq`.
    Gap,
    /// 409 or 422: the chain does not hold, or the seal does not match; the session is
    /// flagged.
    Tampered,
    /// 413: a chunk over 4 MiB.
    TooLarge,
    /// 409 (workflow): the request is no longer pending, or already reviewed by this person.
    Conflict,
    /// 429: too many requests from this principal or address; try again later.
    RateLimited,
    /// 500.
    Internal,
    /// A code this side does not know (a newer collector).
    #[serde(other)]
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_carries_its_code_words_and_resume_point() {
        let gap = Refusal {
            code: ErrorCode::Gap,
            error: "gap".into(),
            next_seq: Some(7),
        };
        let json = serde_json::to_value(&gap).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"code": "gap", "error": "gap", "next_seq": 7})
        );
        assert_eq!(serde_json::from_value::<Refusal>(json).unwrap(), gap);
    }

    #[test]
    fn an_unknown_code_is_read_as_unknown() {
        let r: Refusal =
            serde_json::from_str(r#"{"code": "quota", "error": "over quota"}"#).unwrap();
        assert_eq!(r.code, ErrorCode::Unknown);
        assert_eq!(r.next_seq, None);
    }

    #[test]
    fn chunk_answers_keep_their_documented_shapes() {
        let stored = ChunkAccepted {
            stored: true,
            duplicate: false,
            next_seq: Some(3),
        };
        assert_eq!(
            serde_json::to_value(&stored).unwrap(),
            serde_json::json!({"stored": true, "next_seq": 3})
        );
        let duplicate = ChunkAccepted {
            stored: false,
            duplicate: true,
            next_seq: None,
        };
        assert_eq!(
            serde_json::to_value(&duplicate).unwrap(),
            serde_json::json!({"stored": false, "duplicate": true})
        );
    }
}
